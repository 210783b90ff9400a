package com.tfbitmeta.demo.core

import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.DynamicTest
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestFactory
import java.io.File

/** The Kotlin core against the Python device runtime's golden vectors: same choices, bytes, decisions, parses. */
class GoldenTest {
    private val m get() = TestData.manifest

    @Test
    fun `manifest parses as the Python runtime reads it`() {
        assertEquals(TestData.golden["manifest_sha256"].str("sha"), Sha256.hex(TestData.manifestText.toByteArray()))
        assertEquals(TestData.golden["labels"].arr("labels").map { it.str("l") }, m.labels)
        assertTrue(m.frontEnds.size >= 2, "front ends: ${m.frontEnds}")
        for (c in TestData.cases) {
            val f = TestData.front(c)
            assertEquals(c["front_end"].str("f"), f.path)
            assertEquals(c["front_end_sha256"].str("s"), f.sha256)
            assertEquals(c["backend"].str("b"), f.backend)
            assertEquals(c["exit_threshold"].dbl("t"), f.exitThreshold)
        }
    }

    @Test
    fun `every front end passes its sha256 check and a changed byte is refused`() {
        for (f in m.frontEnds) {
            val bytes = File(TestData.modelsDir, f.path).readBytes()
            assertEquals(f.bytes, bytes.size.toLong())
            Sha256.verified(f, bytes)
            val bad = bytes.copyOf().also { it[it.size - 1] = (it[it.size - 1].toInt() xor 1).toByte() }
            val e = assertThrows(ManifestException::class.java) { Sha256.verified(f, bad) }
            assertTrue("sha256" in e.message!!)
        }
    }

    @Test
    fun `bitwidth choice by memory budget and default match Python`() {
        assertEquals(TestData.golden["default_front_end"].str("d"), Bitwidth.best(m.frontEnds).path)
        val choices = TestData.golden["choices"].arr("choices").map { it.obj("c") }
        assertTrue(choices.size >= 3)
        for (c in choices) {
            val budget = c["memory_budget"].num("b").long
            val want = c["front_end"]
            if (want == JsonNull) {
                assertThrows(ManifestException::class.java) { Bitwidth.byMemoryBudget(m.frontEnds, budget) }
            } else {
                assertEquals(want.str("f"), Bitwidth.byMemoryBudget(m.frontEnds, budget).path, "budget $budget")
            }
        }
    }

    @Test
    fun `auto picks low bits on a small device and high bits on a large one`() {
        val small = Bitwidth.choose(m.frontEnds, BitsChoice.Auto(64L shl 20, 2))   // 64 MiB, 2 cores
        val large = Bitwidth.choose(m.frontEnds, BitsChoice.Auto(16L shl 30, 8))   // 16 GiB, 8 cores
        assertEquals(m.frontEnds.minOf { it.bytes }, small.bytes)
        assertEquals(Bitwidth.byMemoryBudget(m.frontEnds, (16L shl 30) / 4096).path, large.path)
        assertTrue(large.bitsW >= small.bitsW)
        assertEquals(Bitwidth.parse("w2a4"), 2 to 4)
        assertEquals(Bitwidth.parse("fp"), 32 to 32)
        assertThrows(ManifestException::class.java) { Bitwidth.parse("banana") }
    }

    @TestFactory
    fun `feature payload bytes equal the Python runtime's`(): List<DynamicTest> = TestData.cases.map { c ->
        DynamicTest.dynamicTest("${c["bits"].str("b")} ${c["image"].str("i")}") {
            val feats = TestData.features(c)
            assertEquals(c["features_sha256"].str("s"), Sha256.hex(TestData.bytes(c["features"].str("f"))))
            val want = TestData.bytes(c["request"].str("r"))
            val got = FeatureEncoder.encodeRequest(feats, TestData.front(c))
            assertEquals(String(want), String(got))
            assertArrayEquals(want, got)
        }
    }

    @TestFactory
    fun `early-exit decisions equal the Python runtime's`(): List<DynamicTest> = TestData.cases.map { c ->
        DynamicTest.dynamicTest("${c["bits"].str("b")} ${c["image"].str("i")}") {
            val probs = TestData.exitProbs(c)
            val f = TestData.front(c)
            val d = EarlyExit.decide(probs, EarlyExit.threshold(f, null))
            assertEquals(c["fallback_max_softmax"], JsonBool(d.fallBack))
            assertEquals(c["exit_label"].int("l"), d.label)
            // the device's decision: the client's router when the manifest names one, else max-softmax
            val a = Classifier(m, null, TestData.routerFiles).decide(f, FrontEndOutput(probs, TestData.features(c)), null, 0.0)
            assertEquals(c["fallback"], JsonBool(a.fellBack))
            assertEquals(c["route"].str("r"), a.route)
            assertEquals(c["route_threshold"].dbl("t"), a.threshold)
            val want = c["route_score"].dbl("s")
            assertEquals(want, a.routeScore!!, 1e-6 * maxOf(1.0, Math.abs(want)))
            for ((t, want) in c["fallback_at_threshold"].obj("fat").fields) {
                assertEquals(want, JsonBool(EarlyExit.decide(probs, t.toDouble()).fallBack), "threshold $t")
            }
        }
    }

    @TestFactory
    fun `server responses parse to the Python runtime's probabilities`(): List<DynamicTest> = TestData.cases.map { c ->
        DynamicTest.dynamicTest("${c["bits"].str("b")} ${c["image"].str("i")}") {
            val text = String(TestData.bytes(c["response"].str("r")))
            val p = FallbackClient.parseResponse(text, m.labels.size)
            val want = c["server_probs"].arr("sp").map { it.dbl("p") }.toDoubleArray()
            assertArrayEquals(want, p, 0.0)
            assertEquals(c["server_label"].int("l"), FallbackClient.argmax(p))
        }
    }

    @Test
    fun `without a server a fallback case answers locally, marked offline`() {
        val c = TestData.cases.first { it["fallback"] == JsonBool(true) }
        val a = Classifier(m, null, TestData.routerFiles).classify(TestData.front(c), GoldenEngine(FrontEndOutput(TestData.exitProbs(c), TestData.features(c))),
            FloatArray(m.height * m.width * m.channels))
        assertEquals("offline", a.decision)
        assertEquals(m.labels[c["exit_label"].int("l")], a.label)
        assertEquals(a.localLabel, a.label)
        assertNull(a.serverLabel)
    }

    @Test
    fun `a router file that does not match the manifest is refused`() {
        val f = m.frontEnds.firstOrNull { it.router?.score == "mahalanobis" } ?: return  // a MEBQAT export has none
        val good = File(TestData.modelsDir, f.router!!.path!!).readBytes()
        val flipped = good.copyOf().also { it[0] = (it[0].toInt() xor 1).toByte() }
        for ((bytes, why) in listOf(flipped to "sha256", good.copyOf(good.size - 4) to "sha256")) {
            val e = assertThrows(ManifestException::class.java) {
                Classifier(m, null, RouterFiles { bytes }).router(f)
            }
            assertTrue(why in e.message!!, e.message)
        }
        val e = assertThrows(ManifestException::class.java) { Classifier(m, null).router(f) }
        assertTrue("no router files" in e.message!!, e.message)
        // a wrong shape in the manifest with the right bytes: the size check catches it
        val wrong = f.router!!.copy(rank = f.router!!.rank + 1)
        assertTrue("need" in assertThrows(ManifestException::class.java) { MahalanobisRouter.fromBytes(wrong, good) }.message!!)
    }

    @Test
    fun `row-format predictions parse like columnar outputs`() {
        val row = "[0.1,0.2,0.05,0.05,0.1,0.1,0.1,0.1,0.1,0.1]"
        val a = FallbackClient.parseResponse("{\"predictions\": [$row]}", 10)
        val b = FallbackClient.parseResponse("{\"outputs\": [$row]}", 10)
        assertArrayEquals(a, b, 0.0)
        assertEquals(1, FallbackClient.argmax(a))
        assertEquals("bad thing", FallbackClient.errorMessage("{\"error\": \"bad thing\", \"code\": \"x\"}"))
    }

    @Test
    fun `bad server responses are refused`() {
        for (bad in listOf("{}", "{\"outputs\": []}", "{\"outputs\": [[0.5]]}", "[1]", "nonsense",
            "{\"outputs\": [[1,2,3,4,5,6,7,8,9,\"x\"]]}")) {
            assertThrows(JsonException::class.java, { FallbackClient.parseResponse(bad, 10) }, bad)
        }
    }

    @Test
    fun `pixels convert to luma as PIL does`() {
        val px = Pixels.fromArgb(intArrayOf(0xff808080.toInt(), 0xffff0000.toInt(), 0xff00ff00.toInt(), 0xff0000ff.toInt()), 1)
        assertArrayEquals(floatArrayOf(128f, 76f, 150f, 29f), px)   // PIL Image.convert("L") of the same pixels
        assertArrayEquals(floatArrayOf(255f, 0f, 0f), Pixels.fromArgb(intArrayOf(0xffff0000.toInt()), 3))
    }
}
