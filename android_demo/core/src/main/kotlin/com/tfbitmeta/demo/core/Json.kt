package com.tfbitmeta.demo.core

/**
 * A small JSON reader/writer (no Android or third-party dependency).
 *
 * Numbers keep their source text ([JsonNumber.raw]) so that values read from the manifest (a quantization scale,
 * say) are written back exactly as Python's `json.dumps` wrote them: the feature payload must match the Python
 * runtime byte for byte. The writer emits compact JSON with sorted object keys, like
 * `json.dumps(obj, sort_keys=True, separators=(",", ":"))`.
 */
sealed class JsonValue

data class JsonString(val value: String) : JsonValue()
data class JsonNumber(val raw: String) : JsonValue() {
    val double: Double get() = raw.toDouble()
    val long: Long
        get() = raw.toLongOrNull() ?: throw JsonException("$raw is not an integer")
}
data class JsonBool(val value: Boolean) : JsonValue()
object JsonNull : JsonValue()
data class JsonArray(val items: List<JsonValue>) : JsonValue()
data class JsonObject(val fields: Map<String, JsonValue>) : JsonValue() {
    operator fun get(key: String): JsonValue? = fields[key]
}

class JsonException(message: String) : Exception(message)

object Json {
    /**
     * Deepest nesting of arrays and objects [parse] accepts. The project's JSON (manifest, server answers) nests a
     * handful of levels; the bound keeps the recursive reader far from any thread's stack limit, so hostile input is
     * a [JsonException], never a StackOverflowError (docs/android.md).
     */
    const val MAX_DEPTH = 64

    fun parse(text: String): JsonValue {
        val p = Parser(text)
        p.ws()
        val v = p.value()
        p.ws()
        if (p.i != text.length) throw JsonException("trailing characters at offset ${p.i}")
        return v
    }

    fun write(v: JsonValue): String = StringBuilder().also { write(v, it) }.toString()

    private fun write(v: JsonValue, sb: StringBuilder) {
        when (v) {
            is JsonString -> quote(v.value, sb)
            is JsonNumber -> sb.append(v.raw)
            is JsonBool -> sb.append(if (v.value) "true" else "false")
            JsonNull -> sb.append("null")
            is JsonArray -> {
                sb.append('[')
                v.items.forEachIndexed { k, item -> if (k > 0) sb.append(','); write(item, sb) }
                sb.append(']')
            }
            is JsonObject -> {
                sb.append('{')
                v.fields.keys.sorted().forEachIndexed { k, key ->
                    if (k > 0) sb.append(',')
                    quote(key, sb); sb.append(':'); write(v.fields.getValue(key), sb)
                }
                sb.append('}')
            }
        }
    }

    /** Python's `json.dumps` escaping with `ensure_ascii=True`. */
    private fun quote(s: String, sb: StringBuilder) {
        sb.append('"')
        for (c in s) {
            when {
                c == '"' -> sb.append("\\\"")
                c == '\\' -> sb.append("\\\\")
                c == '\n' -> sb.append("\\n")
                c == '\r' -> sb.append("\\r")
                c == '\t' -> sb.append("\\t")
                c == '\b' -> sb.append("\\b")
                c == '\u000c' -> sb.append("\\f")
                c < ' ' || c.code > 126 -> sb.append(String.format("\\u%04x", c.code))
                else -> sb.append(c)
            }
        }
        sb.append('"')
    }

    private class Parser(val s: String) {
        var i = 0
        var depth = 0

        fun ws() { while (i < s.length && s[i] in " \t\r\n") i++ }

        fun fail(what: String): Nothing = throw JsonException("$what at offset $i")

        fun value(): JsonValue {
            if (i >= s.length) fail("unexpected end")
            return when (val c = s[i]) {
                '{' -> obj()
                '[' -> arr()
                '"' -> JsonString(str())
                't' -> lit("true", JsonBool(true))
                'f' -> lit("false", JsonBool(false))
                'n' -> lit("null", JsonNull)
                else -> if (c == '-' || c.isDigit()) num() else fail("unexpected '$c'")
            }
        }

        fun lit(word: String, v: JsonValue): JsonValue {
            if (!s.startsWith(word, i)) fail("bad literal")
            i += word.length
            return v
        }

        fun num(): JsonValue {
            val m = NUMBER.find(s, i)
            if (m == null || m.range.first != i) fail("bad number")
            i = m.range.last + 1
            return JsonNumber(m.value)
        }

        fun str(): String {
            i++ // opening quote
            val sb = StringBuilder()
            while (true) {
                if (i >= s.length) fail("unterminated string")
                val c = s[i++]
                when {
                    c == '"' -> return sb.toString()
                    c == '\\' -> {
                        if (i >= s.length) fail("bad escape")
                        when (val e = s[i++]) {
                            '"', '\\', '/' -> sb.append(e)
                            'b' -> sb.append('\b'); 'f' -> sb.append('\u000c'); 'n' -> sb.append('\n')
                            'r' -> sb.append('\r'); 't' -> sb.append('\t')
                            'u' -> {
                                val hex = if (i + 4 <= s.length) s.substring(i, i + 4) else ""
                                if (hex.length != 4 || !hex.all { it in HEX }) fail("bad \\u escape")
                                sb.append(hex.toInt(16).toChar())
                                i += 4
                            }
                            else -> fail("bad escape \\$e")
                        }
                    }
                    c < ' ' -> fail("control character in string")
                    else -> sb.append(c)
                }
            }
        }

        /** One level deeper for [body]; beyond [MAX_DEPTH] fails before recursing further. */
        fun nested(body: () -> JsonValue): JsonValue {
            if (++depth > MAX_DEPTH) fail("nested deeper than $MAX_DEPTH levels")
            return body().also { depth-- }
        }

        fun arr(): JsonValue = nested(::items)

        fun obj(): JsonValue = nested(::fields)

        private fun items(): JsonValue {
            i++
            val items = ArrayList<JsonValue>()
            ws()
            if (i < s.length && s[i] == ']') { i++; return JsonArray(items) }
            while (true) {
                ws(); items.add(value()); ws()
                if (i >= s.length) fail("unterminated array")
                when (s[i++]) { ',' -> continue; ']' -> return JsonArray(items); else -> { i--; fail("expected , or ]") } }
            }
        }

        private fun fields(): JsonValue {
            i++
            val fields = LinkedHashMap<String, JsonValue>()
            ws()
            if (i < s.length && s[i] == '}') { i++; return JsonObject(fields) }
            while (true) {
                ws()
                if (i >= s.length || s[i] != '"') fail("expected a key")
                val key = str()
                ws()
                if (i >= s.length || s[i] != ':') fail("expected :")
                i++; ws()
                fields[key] = value()
                ws()
                if (i >= s.length) fail("unterminated object")
                when (s[i++]) { ',' -> continue; '}' -> return JsonObject(fields); else -> { i--; fail("expected , or }") } }
            }
        }

        companion object {
            const val HEX = "0123456789abcdefABCDEF"
            val NUMBER = Regex("-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?")
        }
    }
}

// -- typed access helpers (throw JsonException with the key's name) ------------------------------------
fun JsonValue?.obj(what: String): JsonObject = this as? JsonObject ?: throw JsonException("$what must be an object")
fun JsonValue?.arr(what: String): List<JsonValue> = (this as? JsonArray)?.items ?: throw JsonException("$what must be a list")
fun JsonValue?.str(what: String): String = (this as? JsonString)?.value ?: throw JsonException("$what must be a string")
fun JsonValue?.num(what: String): JsonNumber = this as? JsonNumber ?: throw JsonException("$what must be a number")
fun JsonValue?.int(what: String): Int = num(what).long.let {
    if (it < Int.MIN_VALUE || it > Int.MAX_VALUE) throw JsonException("$what: $it is not a 32-bit integer") else it.toInt()
}
fun JsonValue?.dbl(what: String): Double = num(what).double
