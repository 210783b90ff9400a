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
 */
object FeatureEncoder {
    fun encodeRequest(features: FloatArray, front: FrontEnd): ByteArray {
        require(features.size == front.featureCount) {
            "${features.size} features, but ${front.path} has ${front.featureCount}"
        }
        val shape = JsonArray((listOf(1) + front.featureShape).map { JsonNumber(it.toString()) })
        val q = front.featureQuantization
        val tensor = if (q != null) {
            JsonObject(mapOf(
                "b64" to JsonString(b64(quantize(features, q))),
                "dtype" to JsonString(q.dtype),
                "shape" to shape,
                "scale" to q.scale,
                "zero_point" to q.zeroPoint,
            ))
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

    private fun b64(bytes: ByteArray): String = Base64.getEncoder().encodeToString(bytes)
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
