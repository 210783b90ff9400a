package com.tfbitmeta.demo.core

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * Golden vectors written by `tools/make_golden.py` (the Python device runtime + a real server) and the models they
 * came from. The pytest test `tests/test_android.py` sets these variables; they are required, never defaulted.
 */
object TestData {
    private fun dir(name: String): File {
        val v = System.getenv(name) ?: error("$name is not set (run through tests/test_android.py)")
        return File(v).also { require(it.isDirectory) { "$name=$v is not a folder" } }
    }

    val goldenDir: File by lazy { dir("TFBITMETA_GOLDEN") }
    val modelsDir: File by lazy { dir("TFBITMETA_MODELS") }
    val serverUrl: String by lazy { System.getenv("TFBITMETA_SERVER") ?: error("TFBITMETA_SERVER is not set") }
    val token: String by lazy { System.getenv("TFBITMETA_TOKEN") ?: error("TFBITMETA_TOKEN is not set") }

    val golden: JsonObject by lazy { Json.parse(File(goldenDir, "golden.json").readText()).obj("golden") }
    val manifestText: String by lazy { File(modelsDir, "manifest.json").readText() }
    /** The golden vectors of a federated export are those of one client (`client` in golden.json). */
    val manifest: Manifest by lazy {
        val client = golden["client"].let { if (it == null || it == JsonNull) null else it.int("client") }
        Manifest.parse(manifestText).forClient(client)
    }
    val cases: List<JsonObject> by lazy { golden["cases"].arr("cases").map { it.obj("case") } }

    fun bytes(name: String): ByteArray = File(goldenDir, name).readBytes()

    fun features(case: JsonObject): FloatArray {
        val raw = bytes(case["features"].str("features"))
        val fb = ByteBuffer.wrap(raw).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
        return FloatArray(fb.remaining()).also { fb.get(it) }
    }

    fun exitProbs(case: JsonObject): FloatArray =
        case["exit_probs"].arr("exit_probs").map { it.dbl("p").toFloat() }.toFloatArray()

    fun front(case: JsonObject): FrontEnd = Bitwidth.byName(manifest.frontEnds, case["bits"].str("bits"))

    /** Router files of a federated export, next to its front ends. */
    val routerFiles = RouterFiles { path -> File(modelsDir, path).readBytes() }
}

/** Returns the golden front end outputs, as the TFLite interpreter did in Python. */
class GoldenEngine(private val out: FrontEndOutput) : FrontEndEngine {
    var calls = 0
    override fun run(pixels: FloatArray): FrontEndOutput { calls++; return out }
    override fun close() {}
}
