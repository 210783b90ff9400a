package com.tfbitmeta.demo.core

import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertInstanceOf
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.DynamicTest
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestFactory
import java.net.ServerSocket
import kotlin.math.abs

/**
 * Live contract tests against the real Python fallback server (`tfbitmeta serve`, started on 127.0.0.1 with a
 * bearer token by tests/test_android.py) serving the same models the golden vectors came from.
 */
class ServerContractTest {
    private val m get() = TestData.manifest
    private fun client(token: String? = TestData.token, url: String = TestData.serverUrl, timeoutMs: Int = 5000) =
        FallbackClient(url, token, timeoutMs)

    @TestFactory
    fun `the server answers the golden payloads with the golden probabilities`(): List<DynamicTest> =
        TestData.cases.map { c ->
            DynamicTest.dynamicTest("${c["bits"].str("b")} ${c["image"].str("i")}") {
                val f = TestData.front(c)
                val body = FeatureEncoder.encodeRequest(TestData.features(c), f)
                val r = client().predict(f.backend, body, m.labels.size)
                assertInstanceOf(ServerResult.Answer::class.java, r, r.toString())
                r as ServerResult.Answer
                val want = c["server_probs"].arr("sp").map { it.dbl("p") }
                val tol = TestData.golden["tolerance"].obj("tol")["server_probs"].dbl("tol")
                want.forEachIndexed { i, p -> assertTrue(abs(p - r.probs[i]) <= tol, "class $i: $p vs ${r.probs[i]}") }
                assertEquals(c["server_label"].int("l"), r.label)
            }
        }

    @TestFactory
    fun `the server answers the packed payload exactly as the int8 one`(): List<DynamicTest> =
        TestData.cases.map { c ->
            DynamicTest.dynamicTest("${c["bits"].str("b")} ${c["image"].str("i")}") {
                val f = TestData.front(c)
                val packed = FeatureEncoder.encodeRequest(TestData.features(c), f)
                val int8 = TestData.bytes(c["request_int8"].str("r"))
                if (f.featureQuantization != null && f.bitsA < 8) {
                    assertTrue("\"bits\":${f.bitsA}," in String(packed), String(packed).take(200))
                    assertTrue(packed.size < int8.size, "${packed.size} vs ${int8.size} bytes")
                }
                val a = client().predict(f.backend, packed, m.labels.size)
                val b = client().predict(f.backend, int8, m.labels.size)
                assertInstanceOf(ServerResult.Answer::class.java, a, a.toString())
                assertInstanceOf(ServerResult.Answer::class.java, b, b.toString())
                assertArrayEquals((b as ServerResult.Answer).probs, (a as ServerResult.Answer).probs, 0.0)
            }
        }

    @Test
    fun `the full pipeline falls back to the server and reports both answers`() {
        val c = TestData.cases.first { it["fallback"] == JsonBool(true) }
        val engine = GoldenEngine(FrontEndOutput(TestData.exitProbs(c), TestData.features(c)))
        val a = Classifier(m, client(), TestData.routerFiles).classify(TestData.front(c), engine, FloatArray(m.height * m.width * m.channels))
        assertEquals("server", a.decision)
        assertEquals(m.labels[c["server_label"].int("l")], a.label)
        assertEquals(a.serverLabel, a.label)
        assertEquals(m.labels[c["exit_label"].int("l")], a.localLabel)
        assertNotNull(a.serverLatencyMs)
        assertEquals(1, engine.calls)
    }

    @Test
    fun `a confident exit does not ask the server`() {
        val c = TestData.cases.first()
        val closed = "http://127.0.0.1:${freePort()}"
        val a = Classifier(m, client(url = closed), TestData.routerFiles).classify(TestData.front(c),
            GoldenEngine(FrontEndOutput(TestData.exitProbs(c), TestData.features(c))), FloatArray(1), thresholdOverride = 0.0)
        assertEquals("early_exit", a.decision)
        assertNull(a.serverLatencyMs)
        assertNull(a.offlineReason)
    }

    @Test
    fun `missing or wrong token is refused and answered offline`() {
        val c = TestData.cases.first()
        val f = TestData.front(c)
        val body = TestData.bytes(c["request"].str("r"))
        for (token in listOf(null, "wrong-token-0123456789")) {
            val r = client(token = token).predict(f.backend, body, m.labels.size)
            assertInstanceOf(ServerResult.Offline::class.java, r)
            assertTrue("401" in (r as ServerResult.Offline).reason, r.reason)
        }
    }

    @Test
    fun `unknown model and malformed payload come back as offline with the server's message`() {
        val c = TestData.cases.first()
        val f = TestData.front(c)
        val r1 = client().predict("backend_nope_split9", TestData.bytes(c["request"].str("r")), m.labels.size)
        assertTrue((r1 as ServerResult.Offline).reason.startsWith("server answered 404"), r1.reason)
        val r2 = client().predict(f.backend, "{\"inputs\": [[1, 2]]}".toByteArray(), m.labels.size)
        assertTrue((r2 as ServerResult.Offline).reason.startsWith("server answered 400"), r2.reason)
        assertTrue("shape" in r2.reason, r2.reason)
    }

    @Test
    fun `server down gives the local answer marked offline`() {
        val c = TestData.cases.first { it["fallback"] == JsonBool(true) }
        val a = Classifier(m, client(url = "http://127.0.0.1:${freePort()}"), TestData.routerFiles).classify(TestData.front(c),
            GoldenEngine(FrontEndOutput(TestData.exitProbs(c), TestData.features(c))), FloatArray(1))
        assertEquals("offline", a.decision)
        assertTrue("unreachable" in a.offlineReason!!, a.offlineReason)
        assertEquals(a.localLabel, a.label)
    }

    @Test
    fun `a server that never answers times out to offline`() {
        ServerSocket(0, 8, java.net.InetAddress.getLoopbackAddress()).use { silent ->
            val c = TestData.cases.first()
            val t0 = System.nanoTime()
            val r = client(url = "http://127.0.0.1:${silent.localPort}", timeoutMs = 500)
                .predict(TestData.front(c).backend, TestData.bytes(c["request"].str("r")), m.labels.size)
            val s = (System.nanoTime() - t0) / 1e9
            assertTrue("within 0.5 s" in (r as ServerResult.Offline).reason, r.reason)
            assertTrue(s < 5, "took $s s")
        }
    }

    private fun freePort(): Int = ServerSocket(0).use { it.localPort }
}
