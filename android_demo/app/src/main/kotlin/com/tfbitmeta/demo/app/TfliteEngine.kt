package com.tfbitmeta.demo.app

import com.tfbitmeta.demo.core.FrontEnd
import com.tfbitmeta.demo.core.FrontEndEngine
import com.tfbitmeta.demo.core.FrontEndOutput
import com.tfbitmeta.demo.core.Manifest
import org.tensorflow.lite.Interpreter
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** Opens one front end, given its sha256-verified bytes, for inference ([MainActivity.engineFactory]). */
fun interface EngineFactory {
    fun open(model: ByteArray, front: FrontEnd, manifest: Manifest): FrontEndEngine
}

/**
 * The thin TFLite wrapper: one front end (already sha256-verified bytes) in an [Interpreter], run through its
 * signature (`image` in; `exit_probs`, `features` out).
 */
class TfliteEngine(model: ByteArray, private val front: FrontEnd, private val manifest: Manifest, threads: Int = 2) : FrontEndEngine {
    private val interpreter: Interpreter

    init {
        val buf = ByteBuffer.allocateDirect(model.size).order(ByteOrder.nativeOrder())
        buf.put(model).rewind()
        interpreter = Interpreter(buf, Interpreter.Options().setNumThreads(threads))
    }

    override fun run(pixels: FloatArray): FrontEndOutput {
        val input = floats(pixels.size).also { b -> pixels.forEach { b.putFloat(it) }; b.rewind() }
        val probs = floats(manifest.labels.size)
        val features = floats(front.featureCount)
        interpreter.runSignature(mapOf<String, Any>("image" to input),
            mapOf<String, Any>("exit_probs" to probs, "features" to features), front.signature)
        return FrontEndOutput(read(probs, manifest.labels.size), read(features, front.featureCount))
    }

    override fun close() = interpreter.close()

    private fun floats(n: Int): ByteBuffer = ByteBuffer.allocateDirect(4 * n).order(ByteOrder.nativeOrder())

    private fun read(b: ByteBuffer, n: Int): FloatArray {
        b.rewind()
        return FloatArray(n).also { b.asFloatBuffer().get(it) }
    }
}
