package com.tfbitmeta.demo.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertThrows
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
}
