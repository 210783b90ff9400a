package com.tfbitmeta.demo.app

import com.tfbitmeta.demo.core.Json
import com.tfbitmeta.demo.core.JsonObject
import com.tfbitmeta.demo.core.Manifest
import com.tfbitmeta.demo.core.arr
import com.tfbitmeta.demo.core.obj
import com.tfbitmeta.demo.core.str
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * What tests/test_android.py hands the Robolectric tests: the models the app's assets were filled from
 * (TFBITMETA_MODELS), golden vectors of the Python runtime (TFBITMETA_GOLDEN), the live fallback server
 * (TFBITMETA_SERVER, TFBITMETA_TOKEN) and the bitwidth whose bundled file was corrupted (TFBITMETA_TAMPERED).
 */
object AppTestData {
    private fun env(name: String): String = System.getenv(name) ?: error("$name is not set (run through tests/test_android.py)")

    val manifestText: String by lazy { File(env("TFBITMETA_MODELS"), "manifest.json").readText() }
    val manifest: Manifest by lazy { Manifest.parse(manifestText) }
    val serverUrl: String by lazy { env("TFBITMETA_SERVER") }
    val token: String by lazy { env("TFBITMETA_TOKEN") }
    val tampered: String by lazy { env("TFBITMETA_TAMPERED") }
    val cases: List<JsonObject> by lazy {
        Json.parse(File(env("TFBITMETA_GOLDEN"), "golden.json").readText()).obj("golden")["cases"].arr("cases").map { it.obj("case") }
    }

    /** The case's float32 little-endian `features` file. */
    fun features(case: JsonObject): FloatArray {
        val name = case["features"].str("features")
        val fb = ByteBuffer.wrap(File(env("TFBITMETA_GOLDEN"), name).readBytes()).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
        return FloatArray(fb.remaining()).also { fb.get(it) }
    }
}
