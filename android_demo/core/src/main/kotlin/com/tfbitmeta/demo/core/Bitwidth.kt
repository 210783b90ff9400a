package com.tfbitmeta.demo.core

/** What the user asked for: a bitwidth by name ("2", "4", "8", "fp", "w2a4"), or "auto". */
sealed class BitsChoice {
    data class Named(val name: String) : BitsChoice()
    /** From the device: total memory in bytes and the number of cores. */
    data class Auto(val totalMemoryBytes: Long, val cores: Int) : BitsChoice()
}

object Bitwidth {
    /**
     * The memory budget "auto" gives the front end: 1/4096 of the device's memory (256 KiB on a 1 GiB phone,
     * 2 MiB on an 8 GiB one), halved on devices with fewer than 4 cores, so weak devices get low-bit models.
     */
    fun autoBudget(totalMemoryBytes: Long, cores: Int): Long {
        val budget = totalMemoryBytes / 4096
        return if (cores < 4) budget / 2 else budget
    }

    /** Python `DeviceRuntime.choose(bits)`: the front end with these bits (w and a), at [exit] if given. */
    fun byName(fronts: List<FrontEnd>, name: String, exit: Int? = null): FrontEnd {
        val (w, a) = parse(name)
        return fronts.firstOrNull { it.bitsW == w && it.bitsA == a && (exit == null || it.exit == exit) }
            ?: throw ManifestException("no front end for $name (have ${fronts.map { it.bitsName }.distinct().sorted()})")
    }

    /** Python `DeviceRuntime.choose(memory_budget=N)`: the largest file within N bytes (ties: higher bits). */
    fun byMemoryBudget(fronts: List<FrontEnd>, budget: Long, exit: Int? = null): FrontEnd {
        val cands = fronts.filter { exit == null || it.exit == exit }
        val fitting = cands.filter { it.bytes <= budget }
        if (fitting.isEmpty()) {
            throw ManifestException("no front end fits in $budget bytes (smallest: ${cands.minOf { it.bytes }} bytes)")
        }
        return fitting.maxWith(compareBy<FrontEnd>({ it.bytes }, { it.bitsW }, { it.bitsA }))
    }

    /** Python `DeviceRuntime.choose()` with nothing asked: the highest bitwidth. */
    fun best(fronts: List<FrontEnd>, exit: Int? = null): FrontEnd =
        fronts.filter { exit == null || it.exit == exit }.maxWith(compareBy<FrontEnd>({ it.bitsW }, { it.bitsA }))

    /** "auto" picks by memory budget; if nothing fits, the smallest front end (a demo should still run). */
    fun choose(fronts: List<FrontEnd>, choice: BitsChoice, exit: Int? = null): FrontEnd = when (choice) {
        is BitsChoice.Named -> byName(fronts, choice.name, exit)
        is BitsChoice.Auto -> {
            val budget = autoBudget(choice.totalMemoryBytes, choice.cores)
            try {
                byMemoryBudget(fronts, budget, exit)
            } catch (e: ManifestException) {
                fronts.filter { exit == null || it.exit == exit }.minBy { it.bytes }
            }
        }
    }

    /** "4" -> (4, 4), "w2a4" or "2/4" -> (2, 4), "fp" -> (32, 32): Python's `parse_config`. */
    fun parse(name: String): Pair<Int, Int> {
        val s = name.trim().lowercase()
        fun one(t: String): Int = if (t in setOf("fp", "fp32", "32", "float", "none")) 32 else t.toIntOrNull()?.takeIf { it in 1..32 }
            ?: throw ManifestException("bad bitwidth '$name'")
        val m = Regex("w(\\w+)a(\\w+)").matchEntire(s)
        return when {
            m != null -> one(m.groupValues[1]) to one(m.groupValues[2])
            "/" in s -> s.split("/", limit = 2).let { one(it[0]) to one(it[1]) }
            else -> one(s).let { it to it }
        }
    }
}
