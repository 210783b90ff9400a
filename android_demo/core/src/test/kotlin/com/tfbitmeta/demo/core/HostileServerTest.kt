package com.tfbitmeta.demo.core

import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertInstanceOf
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.DynamicTest
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestFactory
import java.io.IOException
import java.io.InputStream
import java.io.OutputStream
import java.net.InetAddress
import java.net.ServerSocket
import java.net.Socket
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit

/**
 * The fallback client against servers that misbehave on purpose (a loopback [FakeServer] written here): trickling,
 * oversize, deeply nested and impossible answers must all give OFFLINE with a reason, within the deadline.
 */
class HostileServerTest {
    private val body = "{}".toByteArray()
    private val good = "{\"outputs\":[[0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1]]}"

    private fun predict(server: FakeServer, timeoutMs: Int = 1000): Pair<ServerResult, Double> {
        val t0 = System.nanoTime()
        val r = FallbackClient(server.url, "token-0123456789abcdef", timeoutMs).predict("backend_2_split3", body, 10)
        return r to (System.nanoTime() - t0) / 1e9
    }

    private fun workers() = Thread.getAllStackTraces().keys.count { it.name == "tfbitmeta-fallback" && it.isAlive }

    private fun offline(r: ServerResult): String {
        assertInstanceOf(ServerResult.Offline::class.java, r, r.toString())
        return (r as ServerResult.Offline).reason
    }

    @Test
    fun `a well-formed answer from the fake server is accepted (the harness itself works)`() {
        FakeServer { it.write(http(good)) }.use { s ->
            val (r, _) = predict(s)
            assertInstanceOf(ServerResult.Answer::class.java, r, r.toString())
            assertArrayEquals(DoubleArray(10) { 0.1 }, (r as ServerResult.Answer).probs, 1e-12)
        }
    }

    @TestFactory
    fun `a server trickling one byte per 300 ms or stalling is OFFLINE after the deadline`(): List<DynamicTest> =
        listOf(
            Triple("trickling the whole answer", false, 300L),
            Triple("trickling the body after prompt headers", true, 300L),
            Triple("stalling the body after prompt headers", true, 0L),
        ).map { (what, promptHeaders, everyMs) ->
            DynamicTest.dynamicTest(what) {
                val answer = http(good)
                val head = if (promptHeaders) String(answer).indexOf("\r\n\r\n") + 4 else 0
                val rest = answer.copyOfRange(head, answer.size)
                FakeServer { out ->
                    out.write(answer, 0, head); out.flush()
                    if (everyMs > 0) trickle(out, rest, everyMs) else { Thread.sleep(20_000); out.write(rest) }
                }.use { s ->
                    val (r, secs) = predict(s, timeoutMs = 1000)
                    val reason = offline(r)
                    assertTrue("within 1.0 s" in reason, reason)
                    assertTrue(secs < 1.0 + 1.0, "OFFLINE after $secs s, deadline 1 s")
                    // No worker thread outlives the call by more than one read (a trickled byte, or the 1 s read
                    // timeout of a stalled body). The slack is for a loaded 2-core machine; the worker used to wait
                    // for the JDK's keep-alive cleaner to drain the whole trickle (FallbackClient.Exchange).
                    val t1 = System.nanoTime()
                    while (workers() > 0 && System.nanoTime() - t1 < 10_000_000_000L) Thread.sleep(20)
                    val lingered = (System.nanoTime() - t1) / 1e9
                    assertEquals(0, workers(), "fallback worker threads still running after $lingered s")
                    assertTrue(lingered < 1.0 + 4.0, "the worker outlived the call by $lingered s")
                    // headers still arriving: disconnect() closes the socket (once the body is being read, the
                    // worker stops by itself and the JDK's keep-alive cleaner may drain the rest)
                    if (!promptHeaders) assertTrue(s.hungUp.await(3, TimeUnit.SECONDS), "the connection is still open")
                    println("$what: OFFLINE after %.2f s, worker gone %.2f s later: %s".format(secs, lingered, reason))
                }
            }
        }

    @TestFactory
    fun `an answer above 1 MiB is refused`(): List<DynamicTest> =
        listOf(true, false).map { withLength ->
            DynamicTest.dynamicTest(if (withLength) "with Content-Length" else "without Content-Length") {
                // valid JSON with valid probabilities, padded with whitespace past the cap
                val big = good + " ".repeat((1 shl 20) + 16)
                FakeServer { it.write(http(big, withLength = withLength)) }.use { s ->
                    val reason = offline(predict(s, timeoutMs = 5000).first)
                    assertTrue("1048576-byte limit" in reason, reason)
                }
            }
        }

    @TestFactory
    fun `deeply nested JSON is OFFLINE, not a StackOverflowError`(): List<DynamicTest> =
        listOf("[".repeat(100_000), "{\"outputs\":" + "[".repeat(50_000) + "]".repeat(50_000) + "}",
            "{\"a\":".repeat(20_000) + "1" + "}".repeat(20_000)).map { text ->
            DynamicTest.dynamicTest(text.take(12)) {
                FakeServer { it.write(http(text)) }.use { s ->
                    val reason = offline(predict(s).first)
                    assertTrue("nested deeper than" in reason, reason)
                }
            }
        }

    @TestFactory
    fun `impossible probabilities are OFFLINE with the reason`(): List<DynamicTest> = listOf(
        "[[-0.5,1.5,0,0,0,0,0,0,0,0]]" to "outside [0, 1]",
        "[[1e30,0,0,0,0,0,0,0,0,0]]" to "outside [0, 1]",
        "[[NaN,0,0,0,0,0,0,0,0,1]]" to "unexpected 'N'",
        "[[1e999,0,0,0,0,0,0,0,0,0]]" to "not finite",
        "[[0.05,0.05,0.05,0.05,0.05,0.05,0.05,0.05,0.05,0.05]]" to "sum to 0.5",
        "[[0.2,0.2,0.2,0.2,0.2,0.2,0.2,0.2,0.2,0.2]]" to "sum to 2",
        "[[0.2,0.2,0.2,0.2,0.2]]" to "expected 10 probabilities",
        "[[0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1],[0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1]]" to "one row",
        "[[true,0,0,0,0,0,0,0,0,0]]" to "must be a number",
    ).map { (rows, why) ->
        DynamicTest.dynamicTest(rows.take(40)) {
            FakeServer { it.write(http("{\"outputs\":$rows}")) }.use { s ->
                val reason = offline(predict(s).first)
                assertTrue(reason.startsWith("unusable server response") && why in reason, reason)
            }
        }
    }

    @Test
    fun `a non-2xx answer is OFFLINE with the server's message, also when its body is huge`() {
        FakeServer { it.write(http("{\"error\":\"overloaded, retry later\",\"code\":\"busy\"}", "503 Service Unavailable")) }
            .use { s -> assertEquals("server answered 503: overloaded, retry later", offline(predict(s).first)) }
        FakeServer { it.write(http("x".repeat(8 shl 20), "500 Internal Server Error")) }.use { s ->
            val reason = offline(predict(s, timeoutMs = 5000).first)
            assertTrue(reason.startsWith("server answered 500: xxx") && reason.length < 300, reason.take(300))
        }
    }

    @Test
    fun `the tolerances are Python's`() {
        // device/runtime.py: PROB_TOLERANCE 1e-3 per value, SUM_TOLERANCE 0.05 on the sum
        val ok = FallbackClient.parseResponse("{\"outputs\":[[-0.0009,0.1009,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.2]]}", 10)
        assertEquals(0.0, ok[0])   // clipped to [0, 1] like np.clip
        FallbackClient.parseResponse("{\"outputs\":[[0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.149]]}", 10)
        assertThrows<JsonException>("{\"outputs\":[[-0.0011,0.1011,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.2]]}")
        assertThrows<JsonException>("{\"outputs\":[[0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.151]]}")
    }

    private inline fun <reified T : Throwable> assertThrows(text: String) {
        org.junit.jupiter.api.Assertions.assertThrows(T::class.java, { FallbackClient.parseResponse(text, 10) }, text)
    }

    companion object {
        fun http(body: String, status: String = "200 OK", withLength: Boolean = true): ByteArray =
            http(body.toByteArray(), status, withLength)

        fun http(body: ByteArray, status: String = "200 OK", withLength: Boolean = true): ByteArray {
            val head = "HTTP/1.1 $status\r\nContent-Type: application/json\r\n" +
                (if (withLength) "Content-Length: ${body.size}\r\n" else "Connection: close\r\n") + "\r\n"
            return head.toByteArray() + body
        }

        fun trickle(out: OutputStream, bytes: ByteArray, everyMs: Long = 300) {
            for (b in bytes) {
                out.write(b.toInt()); out.flush()
                Thread.sleep(everyMs)
            }
        }
    }
}

/**
 * An HTTP server on 127.0.0.1 that reads each request (head and Content-Length body) and lets [answer] write the
 * raw response bytes, one thread per connection; closing it stops accepting, and writers stop at the first error.
 */
class FakeServer(private val answer: (OutputStream) -> Unit) : AutoCloseable {
    private val socket = ServerSocket(0, 8, InetAddress.getLoopbackAddress())
    val url = "http://127.0.0.1:${socket.localPort}"
    /** Counted down when writing an answer fails because the client closed the connection. */
    val hungUp = CountDownLatch(1)

    init {
        Thread {
            while (true) {
                val s = try { socket.accept() } catch (e: IOException) { break }
                Thread { serve(s) }.apply { isDaemon = true }.start()
            }
        }.apply { isDaemon = true }.start()
    }

    private fun serve(s: Socket) = try {
        s.use {
            readRequest(it.getInputStream())
            answer(it.getOutputStream())
            it.getOutputStream().flush()
        }
    } catch (e: IOException) {
        hungUp.countDown()   // the client hung up (as a deadline or a size cap makes it do)
    } catch (e: InterruptedException) {
    }

    private fun readRequest(input: InputStream) {
        val head = StringBuilder()
        while (!head.endsWith("\r\n\r\n")) {
            val c = input.read()
            if (c < 0) return
            head.append(c.toChar())
        }
        val length = Regex("(?im)^content-length: *(\\d+)").find(head)?.groupValues?.get(1)?.toInt() ?: 0
        var left = length
        val buf = ByteArray(4096)
        while (left > 0) {
            val n = input.read(buf, 0, minOf(left, buf.size))
            if (n < 0) return
            left -= n
        }
    }

    override fun close() = socket.close()
}
