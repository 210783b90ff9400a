package com.tfbitmeta.demo.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class JsonTest {
    @Test
    fun `numbers keep their text and keys are written sorted and compact`() {
        val v = Json.parse("""{"b": 0.3333333432674408, "a": [1, -128, 1e-05, true, null], "c": "x\"y"}""")
        assertEquals("""{"a":[1,-128,1e-05,true,null],"b":0.3333333432674408,"c":"x\"y"}""", Json.write(v))
    }

    @Test
    fun `strings are escaped like Python json dumps`() {
        // json.dumps("é\n\u0001/") == '"\\u00e9\\n\\u0001/"'
        assertEquals("\"\\u00e9\\n\\u0001/\"", Json.write(JsonString("é\n\u0001/")))
        assertEquals("é\n", (Json.parse("\"\\u00e9\\n\"") as JsonString).value)
    }

    @Test
    fun `malformed JSON is refused`() {
        for (bad in listOf("", "{", "[1,]", "{\"a\" 1}", "01", "[1] x", "\"abc", "nul")) {
            assertThrows(JsonException::class.java, { Json.parse(bad) }, bad)
        }
    }

    @Test
    fun `nesting deeper than the limit is a parse error, not a StackOverflowError`() {
        val limit = 64   // Json.MAX_DEPTH (docs/android.md)
        Json.parse("[".repeat(limit) + "]".repeat(limit))
        Json.parse("{\"a\":".repeat(limit) + "1" + "}".repeat(limit))
        for (bad in listOf("[".repeat(limit + 1) + "]".repeat(limit + 1), "[".repeat(1_000_000),
            "{\"a\":".repeat(200_000), "[{\"a\":".repeat(100_000))) {
            val e = assertThrows(JsonException::class.java, { Json.parse(bad) }, bad.take(20))
            assertTrue(e.message!!.startsWith("nested deeper than $limit levels at offset "), e.message)
        }
    }

    @Test
    fun `escapes need four hex digits and integers must fit`() {
        for (bad in listOf("\"\\u+041\"", "\"\\u-041\"", "\"\\u00g1\"", "[1] ]", "{} {}", "[1]\u0000")) {
            assertThrows(JsonException::class.java, { Json.parse(bad) }, bad)
        }
        assertThrows(JsonException::class.java) { Json.parse("4294967297").int("n") }
        assertThrows(JsonException::class.java) { Json.parse("1.5").int("n") }
        assertEquals(-2147483648, Json.parse("-2147483648").int("n"))
    }
}
