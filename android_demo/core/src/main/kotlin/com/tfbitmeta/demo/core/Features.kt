package com.tfbitmeta.demo.core

import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.Base64
import kotlin.math.round

/**
 * The feature payload, byte for byte as `tfbitmeta.serve.payload.encode_request` writes it:
 * `{"inputs":{"features":T},"signature_name":S}` with sorted keys and no spaces, where T is the front end's int8
 * tensor `{"b64","dtype","scale","shape","zero_point"}` when its features carry a quantization, else float32
 * little-endian `{"b64","dtype":"float32","shape"}`. The shape includes the batch dimension (1).
 * A front end with a < 8 activation bits sends its codes `q - zero_point` packed at a bits per value instead
 * (`"b64"` of [Packing.pack], plus `"bits": a`) when every code fits, as the Python device does ([packed] = false:
 * always the plain int8 bytes). Format: docs/serving.md, "Packed k-bit codes".
 */
object FeatureEncoder {
    fun encodeRequest(features: FloatArray, front: FrontEnd, packed: Boolean = true): ByteArray {
        require(features.size == front.featureCount) {
            "${features.size} features, but ${front.path} has ${front.featureCount}"
        }
        val shape = JsonArray((listOf(1) + front.featureShape).map { JsonNumber(it.toString()) })
        val q = front.featureQuantization
        val tensor = if (q != null) {
            val ints = quantize(features, q)
            val fields = mutableMapOf(
                "b64" to JsonString(b64(ints)),
                "dtype" to JsonString(q.dtype),
                "shape" to shape,
                "scale" to q.scale,
                "zero_point" to q.zeroPoint,
            )
            val k = front.bitsA
            val codes = codes(ints, q)
            if (packed && k < 8 && codes.all { it in 0 until (1 shl k) }) {
                fields["b64"] = JsonString(b64(Packing.pack(codes, k)))
                fields["bits"] = JsonNumber(k.toString())
            }
            JsonObject(fields)
        } else {
            val buf = ByteBuffer.allocate(4 * features.size).order(ByteOrder.LITTLE_ENDIAN)
            features.forEach { buf.putFloat(it) }
            JsonObject(mapOf("b64" to JsonString(b64(buf.array())), "dtype" to JsonString("float32"), "shape" to shape))
        }
        val body = JsonObject(mapOf(
            "signature_name" to JsonString(front.signature),
            "inputs" to JsonObject(mapOf("features" to tensor)),
        ))
        return Json.write(body).toByteArray(Charsets.UTF_8)
    }

    /** Python `payload.quantize`: round half to even in float32, add the zero point, clip to the dtype's range. */
    fun quantize(features: FloatArray, q: Quantization): ByteArray {
        val (lo, hi) = when (q.dtype) {
            "int8" -> -128 to 127
            "uint8" -> 0 to 255
            else -> throw IllegalArgumentException("unsupported feature dtype ${q.dtype}")
        }
        val scale = q.scale.double.toFloat()
        val zp = q.zeroPoint.long.toFloat()
        return ByteArray(features.size) { i ->
            val v = round((features[i] / scale).toDouble()).toFloat() + zp
            v.coerceIn(lo.toFloat(), hi.toFloat()).toInt().toByte()
        }
    }

    /** The integer tensor's values minus the zero point (a front end with a-bit activations: 0 .. 2^a - 1). */
    private fun codes(ints: ByteArray, q: Quantization): IntArray {
        val zp = q.zeroPoint.long.toInt()
        val unsigned = q.dtype == "uint8"
        return IntArray(ints.size) { (if (unsigned) ints[it].toInt() and 0xff else ints[it].toInt()) - zp }
    }

    private fun b64(bytes: ByteArray): String = Base64.getEncoder().encodeToString(bytes)
}

/** k-bit codes on the wire: `tfbitmeta.serve.payload.pack_codes`, the one definition of the format. */
object Packing {
    /**
     * [codes] (each in 0 until 2^[bits]) at [bits] bits per value: value i occupies stream bits i*k .. i*k + k - 1,
     * stream bit j being bit j mod 8 (least significant first) of byte j / 8; the last byte is zero-padded.
     */
    fun pack(codes: IntArray, bits: Int): ByteArray {
        require(bits in 1..8) { "bits must be 1-8, got $bits" }
        val out = ByteArray((codes.size * bits + 7) / 8)
        var pos = 0
        for (c in codes) {
            require(c in 0 until (1 shl bits)) { "code $c does not fit in $bits bits" }
            for (b in 0 until bits) {
                if ((c shr b) and 1 == 1) {
                    val j = pos + b
                    out[j ushr 3] = (out[j ushr 3].toInt() or (1 shl (j and 7))).toByte()
                }
            }
            pos += bits
        }
        return out
    }
}

/** The early-exit rule: answer locally when the exit head's top probability reaches the threshold. */
data class ExitDecision(val label: Int, val confidence: Float, val threshold: Double, val fallBack: Boolean)

object EarlyExit {
    /** Python: `probs[argmax] < threshold` -> fall back (first maximum wins, as `np.argmax`). */
    fun decide(probs: FloatArray, threshold: Double): ExitDecision {
        require(probs.isNotEmpty()) { "no exit probabilities" }
        var k = 0
        for (i in probs.indices) if (probs[i] > probs[k]) k = i
        return ExitDecision(k, probs[k], threshold, probs[k].toDouble() < threshold)
    }

    /** The manifest's threshold unless the user set one. */
    fun threshold(front: FrontEnd, override: Double?): Double =
        override ?: front.exitThreshold ?: 1.0
}

/** Photo pixels -> the front end's input: whole values 0-255 as float32, H x W x C (C = 1: PIL's "L" luma). */
object Pixels {
    /** [argb] holds width*height packed ARGB pixels already at the model's size. */
    fun fromArgb(argb: IntArray, channels: Int): FloatArray = when (channels) {
        1 -> FloatArray(argb.size) { i ->
            val p = argb[i]
            val r = (p shr 16) and 0xff; val g = (p shr 8) and 0xff; val b = p and 0xff
            // PIL convert("L"): L = (R*299 + G*587 + B*114) / 1000, rounded (integer arithmetic, ITU-R 601-2)
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) shr 16).toFloat()
        }
        3 -> FloatArray(argb.size * 3) { j ->
            val p = argb[j / 3]
            ((p shr (16 - 8 * (j % 3))) and 0xff).toFloat()
        }
        else -> throw IllegalArgumentException("unsupported channel count $channels")
    }
}
