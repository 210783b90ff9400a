package com.tfbitmeta.demo.core

import java.io.ByteArrayOutputStream
import java.io.InputStream
import java.math.BigDecimal
import java.math.MathContext
import java.net.HttpURLConnection
import java.net.MalformedURLException
import java.net.SocketTimeoutException
import java.net.URL
import java.util.concurrent.Callable
import java.util.concurrent.ExecutionException
import java.util.concurrent.FutureTask
import java.util.concurrent.TimeUnit
import java.util.concurrent.TimeoutException
import kotlin.math.abs

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
 * payload and `Authorization: Bearer <token>`. Never throws for network or server trouble: a closed port, no
 * complete answer within [timeoutMs], a non-200 answer or an unusable body all become [ServerResult.Offline] with a
 * reason, like the Python runtime's `_fall_back` (tfbitmeta/device/runtime.py), whose rules these are:
 * - [timeoutMs] is a deadline for the whole exchange (connect, send, every byte of the answer), so a server
 *   trickling a byte at a time cannot stretch it: the exchange runs on a worker thread, and the call returns at the
 *   deadline. While the request is sent and the headers are read, the worker's connection is closed then; once it
 *   reads the body, the worker stops by itself at its next read (each is bounded by the read timeout, and it checks
 *   the deadline after every read);
 * - at most [maxResponseBytes] (1 MiB) of answer are read (a larger Content-Length is refused unread);
 * - JSON nested deeper than [Json.MAX_DEPTH] is refused;
 * - the answer must hold one row of one probability per class, each finite and in [0, 1] within
 *   [PROB_TOLERANCE], summing to 1 within [SUM_TOLERANCE].
 * Blocking: call it off the main thread.
 */
class FallbackClient(
    baseUrl: String,
    private val token: String?,
    private val timeoutMs: Int = 2000,
    private val maxResponseBytes: Int = MAX_RESPONSE_BYTES,
) {
    val baseUrl: String = baseUrl.trim().trimEnd('/')

    fun predict(backend: String, body: ByteArray, numLabels: Int): ServerResult {
        val t0 = System.nanoTime()
        fun ms() = (System.nanoTime() - t0) / 1e6
        val deadline = t0 + timeoutMs * 1_000_000L
        val url = try {
            URL("$baseUrl/v1/models/$backend:predict")
        } catch (e: MalformedURLException) {  // e.g. a URL typed in the settings without http://
            return ServerResult.Offline("bad server URL: ${e.message}", ms())
        }
        val exchange = Exchange(url, body, deadline)
        val task = FutureTask(exchange)
        Thread(task, "tfbitmeta-fallback").apply { isDaemon = true }.start()
        val (code, answer) = try {
            task.get(maxOf(0L, deadline - System.nanoTime()), TimeUnit.NANOSECONDS)
        } catch (e: TimeoutException) {
            exchange.abort()
            return ServerResult.Offline(timedOut(), ms())
        } catch (e: InterruptedException) {
            exchange.abort()
            Thread.currentThread().interrupt()
            return ServerResult.Offline("interrupted while waiting for the server", ms())
        } catch (e: ExecutionException) {
            val reason = when (val c = e.cause) {
                is SocketTimeoutException -> timedOut()
                is TooLarge -> "unusable server response: ${c.message}"
                is IllegalArgumentException -> "bad server URL: ${c.message}"
                is Exception -> "server unreachable: ${c.javaClass.simpleName}: ${c.message}"
                else -> throw c ?: e   // an Error (out of memory...) is not a network condition
            }
            return ServerResult.Offline(reason, ms())
        }
        val text = String(answer, Charsets.UTF_8)
        if (code != 200) return ServerResult.Offline("server answered $code: ${errorMessage(text)}", ms())
        return try {
            val probs = parseResponse(text, numLabels)
            ServerResult.Answer(probs, argmax(probs), ms())
        } catch (e: JsonException) {
            ServerResult.Offline("unusable server response: ${e.message}", ms())
        }
    }

    private fun timedOut() = "server did not answer within ${timeoutMs / 1000.0} s"

    /**
     * One POST on the worker thread: (status, body) with the body capped. [abort] closes the connection while the
     * request is sent and the headers are read; once the worker reads the body it is left alone. The JDK hands a
     * half-read keep-alive body that another thread closes to its "Keep-Alive-SocketCleaner", which holds the
     * stream's lock while it drains the rest; a worker entering its next read then waited for the whole trickle
     * (over 10 s, seen twice in CI). Only the worker touches the body stream, so it stops at its next read instead.
     */
    private inner class Exchange(val url: URL, val body: ByteArray, val deadline: Long) : Callable<Pair<Int, ByteArray>> {
        private val lock = Any()
        private var conn: HttpURLConnection? = null   // guarded by lock
        private var readingBody = false               // guarded by lock
        private var closedByAbort = false             // guarded by lock
        @Volatile private var aborted = false

        fun abort() = synchronized(lock) {
            aborted = true
            if (!readingBody) {
                closedByAbort = true
                // HttpURLConnection.disconnect() closes the socket a blocked write or header read waits on; off the
                // caller's thread in case an implementation makes it wait for that read.
                conn?.let { c -> Thread { c.disconnect() }.apply { isDaemon = true }.start() }
            }
        }

        private fun remainingMs(): Int {
            val left = (deadline - System.nanoTime()) / 1_000_000L
            if (left <= 0 || aborted) throw SocketTimeoutException("deadline passed")
            return left.coerceAtMost(Int.MAX_VALUE.toLong()).toInt()
        }

        override fun call(): Pair<Int, ByteArray> {
            val c = url.openConnection() as HttpURLConnection
            synchronized(lock) { conn = c }
            try {
                c.requestMethod = "POST"
                c.instanceFollowRedirects = false   // a redirect is an answer (non-200), as for the Python client
                c.connectTimeout = remainingMs()
                c.readTimeout = remainingMs()
                c.doOutput = true
                c.useCaches = false
                c.setRequestProperty("Content-Type", "application/json")
                if (!token.isNullOrBlank()) c.setRequestProperty("Authorization", "Bearer ${token.trim()}")
                c.setFixedLengthStreamingMode(body.size)
                c.outputStream.use { it.write(body) }
                val code = c.responseCode
                synchronized(lock) {
                    remainingMs()   // aborted while the headers were read: abort() has closed the connection
                    readingBody = true
                }
                if (code != 200) {
                    // only the message matters: a bounded prefix of the error body
                    val err = if (code >= 400) c.errorStream else c.inputStream
                    return code to (err?.use { read(it, ERROR_BODY_BYTES, truncate = true) } ?: ByteArray(0))
                }
                val length = c.contentLengthLong
                if (length > maxResponseBytes) throw TooLarge("answer of $length bytes exceeds the $maxResponseBytes-byte limit")
                return code to c.inputStream.use { read(it, maxResponseBytes, truncate = false) }
            } finally {
                if (!synchronized(lock) { closedByAbort }) c.disconnect()
            }
        }

        /** At most [cap] + 1 bytes; past [cap]: the first [cap] ([truncate]) or [TooLarge]. */
        private fun read(input: InputStream, cap: Int, truncate: Boolean): ByteArray {
            val out = ByteArrayOutputStream()
            val buf = ByteArray(16 shl 10)
            while (true) {
                val n = input.read(buf, 0, minOf(buf.size, cap + 1 - out.size()))
                remainingMs()                                  // a read that returned after the deadline
                if (n < 0) return out.toByteArray()
                out.write(buf, 0, n)
                if (out.size() > cap) {
                    if (truncate) return out.toByteArray().copyOf(cap)
                    throw TooLarge("answer exceeds the $cap-byte limit")
                }
            }
        }
    }

    private class TooLarge(message: String) : Exception(message)

    companion object {
        /** As the Python device runtime (device/runtime.py): a predict answer is a few hundred bytes per row. */
        const val MAX_RESPONSE_BYTES = 1 shl 20
        const val PROB_TOLERANCE = 1e-3
        /** int8 softmax outputs have 1/256 steps: 10 classes sum to 1 +- ~0.02 */
        const val SUM_TOLERANCE = 0.05
        private const val ERROR_BODY_BYTES = 64 shl 10

        /**
         * `{"outputs": [[p...]]}` or `{"predictions": [[p...]]}` -> the one row, clipped to [0, 1]; [JsonException]
         * unless it holds [numLabels] numbers, each finite and in [0, 1] within [PROB_TOLERANCE], summing to 1
         * within [SUM_TOLERANCE] (Python `check_probabilities`).
         */
        fun parseResponse(text: String, numLabels: Int): DoubleArray {
            val root = Json.parse(text).obj("response")
            val rows = (root["outputs"] ?: root["predictions"]
                ?: throw JsonException("expected {\"outputs\": [[one probability per class]]}")).arr("outputs")
            if (rows.size != 1) throw JsonException("expected one row of probabilities, got ${rows.size} rows")
            val row = rows[0].arr("outputs[0]").map { it.dbl("outputs[0][]") }
            if (row.size != numLabels) throw JsonException("expected $numLabels probabilities, got ${row.size}")
            if (row.any { !it.isFinite() || it < -PROB_TOLERANCE || it > 1 + PROB_TOLERANCE }) {
                throw JsonException("probabilities not finite or outside [0, 1]")
            }
            val sum = row.sum()
            if (abs(sum - 1) > SUM_TOLERANCE) throw JsonException("probabilities sum to ${fourDigits(sum)}, not 1")
            return DoubleArray(row.size) { row[it].coerceIn(0.0, 1.0) }
        }

        private fun fourDigits(x: Double): String =
            BigDecimal(x).round(MathContext(4)).stripTrailingZeros().toPlainString()

        fun errorMessage(body: String): String = try {
            Json.parse(body).obj("error")["error"].str("error").take(200)
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
