package com.tfbitmeta.demo.core

import java.io.IOException
import java.net.HttpURLConnection
import java.net.SocketTimeoutException
import java.net.URL

/** What the server said: probabilities, or why the device must answer on its own (offline). */
sealed class ServerResult {
    abstract val latencyMs: Double

    data class Answer(val probs: DoubleArray, val label: Int, val latencyMs0: Double) : ServerResult() {
        override val latencyMs: Double get() = latencyMs0
    }

    data class Offline(val reason: String, val latencyMs0: Double) : ServerResult() {
        override val latencyMs: Double get() = latencyMs0
    }
}

/**
 * TF-Serving-REST client for the fallback server: `POST {base}/v1/models/{backend}:predict` with the feature
 * payload and `Authorization: Bearer <token>`. Never throws for network or server trouble: a closed port, a
 * timeout, a non-200 answer or a malformed body all become [ServerResult.Offline] with a reason, like the Python
 * runtime's `_fall_back`. Blocking: call it off the main thread.
 */
class FallbackClient(
    baseUrl: String,
    private val token: String?,
    private val timeoutMs: Int = 2000,
) {
    val baseUrl: String = baseUrl.trim().trimEnd('/')

    fun predict(backend: String, body: ByteArray, numLabels: Int): ServerResult {
        val t0 = System.nanoTime()
        fun ms() = (System.nanoTime() - t0) / 1e6
        var conn: HttpURLConnection? = null
        return try {
            conn = (URL("$baseUrl/v1/models/$backend:predict").openConnection() as HttpURLConnection).apply {
                requestMethod = "POST"
                connectTimeout = timeoutMs
                readTimeout = timeoutMs
                doOutput = true
                useCaches = false
                setRequestProperty("Content-Type", "application/json")
                if (!token.isNullOrBlank()) setRequestProperty("Authorization", "Bearer ${token.trim()}")
                setFixedLengthStreamingMode(body.size)
            }
            conn.outputStream.use { it.write(body) }
            val code = conn.responseCode
            if (code != 200) {
                val msg = conn.errorStream?.use { String(it.readBytes(), Charsets.UTF_8) } ?: ""
                return ServerResult.Offline("server answered $code: ${errorMessage(msg)}", ms())
            }
            val text = conn.inputStream.use { String(it.readBytes(), Charsets.UTF_8) }
            val probs = parseResponse(text, numLabels)
            ServerResult.Answer(probs, argmax(probs), ms())
        } catch (e: SocketTimeoutException) {
            ServerResult.Offline("server did not answer within ${timeoutMs / 1000.0} s", ms())
        } catch (e: IOException) {
            ServerResult.Offline("server unreachable: ${e.javaClass.simpleName}: ${e.message}", ms())
        } catch (e: JsonException) {
            ServerResult.Offline("unusable server response: ${e.message}", ms())
        } catch (e: IllegalArgumentException) {  // e.g. a malformed URL typed in the settings
            ServerResult.Offline("bad server URL: ${e.message}", ms())
        } finally {
            conn?.disconnect()
        }
    }

    companion object {
        /** `{"outputs": [[p...]]}` or `{"predictions": [[p...]]}` -> the first row, checked for size and finiteness. */
        fun parseResponse(text: String, numLabels: Int): DoubleArray {
            val root = Json.parse(text).obj("response")
            val rows = (root["outputs"] ?: root["predictions"]
                ?: throw JsonException("no 'outputs' or 'predictions'")).arr("outputs")
            if (rows.isEmpty()) throw JsonException("empty outputs")
            val row = rows[0].arr("outputs[0]").map { it.dbl("outputs[0][]") }
            if (row.size != numLabels) throw JsonException("probabilities of shape (${row.size},), expected ($numLabels,)")
            if (row.any { !it.isFinite() }) throw JsonException("non-finite probabilities")
            return row.toDoubleArray()
        }

        fun errorMessage(body: String): String = try {
            Json.parse(body).obj("error")["error"].str("error")
        } catch (e: JsonException) {
            body.take(200)
        }

        fun argmax(p: DoubleArray): Int {
            var k = 0
            for (i in p.indices) if (p[i] > p[k]) k = i
            return k
        }
    }
}
