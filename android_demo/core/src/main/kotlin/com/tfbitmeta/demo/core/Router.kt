package com.tfbitmeta.demo.core

import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * A federated client's calibrated router (the manifest entry's `router`; docs/harmony.md, "Deployed routing"),
 * as Python's `tfbitmeta.federated.routing.DeployedMahalanobis`: the squared distance of the features f to a class
 * mean m is `isotropic * |f - m|^2 - |U (f - m)|^2`; the score is minus the smallest, and the image goes to the
 * server when the score is below the threshold. File: float32 little-endian, the class means (classes x dim),
 * then U (rank x dim), row-major.
 */
class MahalanobisRouter private constructor(
    private val means: FloatArray, private val projection: FloatArray,
    val classes: Int, val rank: Int, val dim: Int, val isotropic: Double,
) {
    /** Minus the smallest squared Mahalanobis distance of [features] (dim values) to a class mean; float64 sums. */
    fun score(features: FloatArray): Double {
        require(features.size == dim) { "router expects $dim features, got ${features.size}" }
        val z = DoubleArray(dim)
        var best = Double.POSITIVE_INFINITY
        for (c in 0 until classes) {
            var norm = 0.0
            for (j in 0 until dim) {
                z[j] = features[j].toDouble() - means[c * dim + j].toDouble()
                norm += z[j] * z[j]
            }
            var proj = 0.0
            for (r in 0 until rank) {
                var s = 0.0
                val row = r * dim
                for (j in 0 until dim) s += projection[row + j].toDouble() * z[j]
                proj += s * s
            }
            best = minOf(best, isotropic * norm - proj)
        }
        return -best
    }

    companion object {
        /** Parses a router file after its sha256 check against the manifest; refuses a wrong size or NaN/inf. */
        fun fromBytes(spec: RouterSpec, bytes: ByteArray): MahalanobisRouter {
            val path = spec.path ?: throw ManifestException("router '${spec.score}' names no file")
            val got = Sha256.hex(bytes)
            if (got != spec.sha256) {
                throw ManifestException("$path fails its sha256 check against the manifest (expected ${spec.sha256}, " +
                    "got $got): refusing to use it")
            }
            val want = 4L * (spec.classes + spec.rank) * spec.dim
            if (spec.classes < 1 || spec.rank < 0 || spec.dim < 1 || bytes.size.toLong() != want) {
                throw ManifestException("$path has ${bytes.size} bytes; ${spec.classes} class means and rank " +
                    "${spec.rank} over ${spec.dim} features need $want")
            }
            if (!(spec.isotropic > 0.0) || spec.isotropic.isInfinite()) {
                throw ManifestException("$path: isotropic precision must be a positive number (got ${spec.isotropic})")
            }
            val all = FloatArray(bytes.size / 4)
            ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(all)
            if (all.any { !it.isFinite() }) throw ManifestException("$path holds non-finite values")
            val n = spec.classes * spec.dim
            return MahalanobisRouter(all.copyOfRange(0, n), all.copyOfRange(n, all.size), spec.classes, spec.rank,
                spec.dim, spec.isotropic)
        }
    }
}

/** Reads a router file named by the manifest (on Android: from the app's assets). */
fun interface RouterFiles {
    fun read(path: String): ByteArray

    companion object {
        /** No router files: a front end whose manifest entry names a Mahalanobis router cannot be classified. */
        val NONE = RouterFiles { path -> throw ManifestException("no router files given: cannot read $path") }
    }
}
