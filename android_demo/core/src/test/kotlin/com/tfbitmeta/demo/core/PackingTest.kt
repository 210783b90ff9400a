package com.tfbitmeta.demo.core

import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.DynamicTest
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestFactory
import java.util.Base64

/** k-bit packed feature codes: the Kotlin packer against the Python server's own (`serve.payload.pack_codes`). */
class PackingTest {
    @TestFactory
    fun `codes pack to the bytes of the Python packer at every k`(): List<DynamicTest> =
        TestData.golden["packing"].arr("packing").map { it.obj("v") }.map { v ->
            val k = v["bits"].int("bits")
            val codes = v["codes"].arr("codes").map { it.int("c") }.toIntArray()
            DynamicTest.dynamicTest("k=$k, ${codes.size} codes") {
                val want = Base64.getDecoder().decode(v["b64"].str("b64"))
                assertEquals((codes.size * k + 7) / 8, want.size)
                assertArrayEquals(want, Packing.pack(codes, k))
            }
        }.also { assert(it.size >= 8 * 4) }

    @Test
    fun `bit order is least significant first`() {
        // values 1, 2, 3, 0 at 2 bits: 01 | 10 << 2 | 11 << 4 | 00 << 6 = 0b00111001
        assertArrayEquals(byteArrayOf(0x39), Packing.pack(intArrayOf(1, 2, 3, 0), 2))
        // 3 bits: 5 = 101 in bits 0-2, 6 = 110 in bits 3-5, 7 = 111 in bits 6-8 (crosses into byte 1)
        assertArrayEquals(byteArrayOf(0xf5.toByte(), 0x01), Packing.pack(intArrayOf(5, 6, 7), 3))
        assertThrows(IllegalArgumentException::class.java) { Packing.pack(intArrayOf(4), 2) }
        assertThrows(IllegalArgumentException::class.java) { Packing.pack(intArrayOf(1), 9) }
    }

    @TestFactory
    fun `unpacked int8 payload bytes equal the Python runtime's`(): List<DynamicTest> = TestData.cases.map { c ->
        DynamicTest.dynamicTest("${c["bits"].str("b")} ${c["image"].str("i")}") {
            val want = TestData.bytes(c["request_int8"].str("r"))
            val got = FeatureEncoder.encodeRequest(TestData.features(c), TestData.front(c), packed = false)
            assertEquals(String(want), String(got))
        }
    }

    @TestFactory
    fun `a front end below 8 activation bits sends its codes packed at its bits`(): List<DynamicTest> =
        TestData.cases.map { c ->
            DynamicTest.dynamicTest("${c["bits"].str("b")} ${c["image"].str("i")}") {
                val f = TestData.front(c)
                val tensor = Json.parse(String(FeatureEncoder.encodeRequest(TestData.features(c), f)))
                    .obj("r")["inputs"].obj("inputs")["features"].obj("features")
                val bits = tensor["bits"]
                if (f.featureQuantization != null && f.bitsA < 8) {
                    assertEquals(f.bitsA, bits.int("bits"))
                    assertEquals(c["packed_bits"].int("packed_bits"), f.bitsA)
                    assertEquals((f.featureCount * f.bitsA + 7) / 8, Base64.getDecoder().decode(tensor["b64"].str("b64")).size)
                } else {
                    assertNull(bits)
                    assertEquals(JsonNull, c["packed_bits"])
                }
            }
        }
}
