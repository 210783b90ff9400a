package com.tfbitmeta.demo.core

import java.security.MessageDigest

/** Quantization of the int8 tensor behind a float output (the manifest's `quantization`). */
data class Quantization(val scale: JsonNumber, val zeroPoint: JsonNumber, val dtype: String)

/** One `kind: "front_end"` entry of `manifest.json`: pixels in, `exit_probs` and `features` out. */
data class FrontEnd(
    val path: String,
    val sha256: String,
    val bytes: Long,
    val bitsW: Int,
    val bitsA: Int,
    val bitsName: String,
    val exit: Int,
    val split: Int,
    val signature: String,
    val exitThreshold: Double?,
    /** feature shape without the batch dimension */
    val featureShape: List<Int>,
    val featureQuantization: Quantization?,
    /** The server-side model that answers for this front end: the manifest's `backend` field (never derived). */
    val backend: String,
    /** Federated exports: the client this front end belongs to and its architecture (null otherwise). */
    val client: Int? = null,
    val architecture: String? = null,
    /** Federated exports: the client's calibrated router (null: the exit head's max-softmax at [exitThreshold]). */
    val router: RouterSpec? = null,
) {
    val featureCount: Int get() = featureShape.fold(1) { a, b -> a * b }
}

/** The manifest entry's `router`: fall back to the server when the router's score is below [threshold]. */
data class RouterSpec(
    /** "max_softmax" (the threshold is also `exit_threshold`) or "mahalanobis" (parameters in the file [path]) */
    val score: String,
    val threshold: Double,
    val keepLocal: Double,
    val path: String? = null,
    val sha256: String? = null,
    val classes: Int = 0,
    val rank: Int = 0,
    val dim: Int = 0,
    val isotropic: Double = 0.0,
)

data class Manifest(
    val family: String,
    val labels: List<String>,
    val exits: List<Int>,
    /** input shape without the batch dimension, e.g. [24, 24, 1] */
    val inputShape: List<Int>,
    val frontEnds: List<FrontEnd>,
) {
    /** A federated export holds several clients' front ends: those of [client] (all when null). */
    fun forClient(client: Int?): Manifest {
        if (client == null) return this
        val mine = frontEnds.filter { it.client == client }
        if (mine.isEmpty()) throw ManifestException("no front end of client $client in the manifest")
        return copy(frontEnds = mine)
    }

    val height: Int get() = inputShape[0]
    val width: Int get() = inputShape[1]
    val channels: Int get() = inputShape[2]

    companion object {
        /** Parses `manifest.json`; a malformed manifest raises [ManifestException] with the offending field. */
        fun parse(text: String): Manifest = try {
            parse(Json.parse(text).obj("manifest"))
        } catch (e: JsonException) {
            throw ManifestException("manifest.json: ${e.message}")
        }

        private fun parse(root: JsonObject): Manifest {
            val model = root["model"].obj("model")
            val input = root["input"].obj("input")
            val files = root["files"].arr("files").map { it.obj("files[]") }
            val fronts = files.filter { (it["kind"] as? JsonString)?.value == "front_end" }.map(::frontEnd)
            if (fronts.isEmpty()) throw JsonException("no front_end in files")
            return Manifest(
                family = model["family"].str("model.family"),
                labels = root["labels"].arr("labels").map { it.str("labels[]") },
                exits = model["exits"].arr("model.exits").map { it.int("model.exits[]") },
                inputShape = input["shape"].arr("input.shape").drop(1).map { it.int("input.shape[]") },
                frontEnds = fronts,
            )
        }

        private fun frontEnd(f: JsonObject): FrontEnd {
            val path = f["path"].str("files[].path")
            val bits = f["bits"].obj("$path: bits")
            val features = f["outputs"].arr("$path: outputs").map { it.obj("$path: outputs[]") }
                .firstOrNull { (it["name"] as? JsonString)?.value == "features" }
                ?: throw JsonException("$path: no 'features' output")
            val q = features["quantization"]
            val quant = if (q == null || q == JsonNull) null else q.obj("$path: quantization").let {
                Quantization(it["scale"].num("$path: scale"), it["zero_point"].num("$path: zero_point"),
                    it["dtype"].str("$path: quantization.dtype"))
            }
            val th = f["exit_threshold"]
            return FrontEnd(
                path = path,
                sha256 = f["sha256"].str("$path: sha256").lowercase(),
                bytes = f["bytes"].num("$path: bytes").long,
                bitsW = bits["w"].int("$path: bits.w"),
                bitsA = bits["a"].int("$path: bits.a"),
                bitsName = bits["name"].str("$path: bits.name"),
                exit = f["exit"].int("$path: exit"),
                split = f["split"].int("$path: split"),
                signature = f["signature"].str("$path: signature"),
                exitThreshold = if (th == null || th == JsonNull) null else th.dbl("$path: exit_threshold"),
                featureShape = features["shape"].arr("$path: features.shape").drop(1).map { it.int("$path: shape[]") },
                featureQuantization = quant,
                backend = f["backend"].str("$path: backend"),
                client = f["client"].let { if (it == null || it == JsonNull) null else it.int("$path: client") },
                architecture = f["architecture"].let {
                    if (it == null || it == JsonNull) null else it.str("$path: architecture")
                },
                router = f["router"].let { if (it == null || it == JsonNull) null else router(path, it.obj("$path: router")) },
            )
        }

        private fun router(path: String, r: JsonObject): RouterSpec {
            val score = r["score"].str("$path: router.score")
            if (score != "max_softmax" && score != "mahalanobis") {
                throw JsonException("$path: unknown router score '$score' (this app knows max_softmax and mahalanobis)")
            }
            val spec = RouterSpec(score = score, threshold = r["threshold"].dbl("$path: router.threshold"),
                keepLocal = r["keep_local"].dbl("$path: router.keep_local"))
            if (score == "max_softmax") return spec
            return spec.copy(
                path = r["path"].str("$path: router.path"), sha256 = r["sha256"].str("$path: router.sha256").lowercase(),
                classes = r["classes"].int("$path: router.classes"), rank = r["rank"].int("$path: router.rank"),
                dim = r["dim"].int("$path: router.dim"), isotropic = r["isotropic"].dbl("$path: router.isotropic"),
            )
        }
    }
}

class ManifestException(message: String) : Exception(message)

object Sha256 {
    fun hex(bytes: ByteArray): String =
        MessageDigest.getInstance("SHA-256").digest(bytes).joinToString("") { "%02x".format(it) }

    /** Returns [bytes] if their sha256 equals the manifest's, else throws: never load an unverified model. */
    fun verified(front: FrontEnd, bytes: ByteArray): ByteArray {
        val got = hex(bytes)
        if (got != front.sha256) {
            throw ManifestException("${front.path} fails its sha256 check against the manifest " +
                "(expected ${front.sha256}, got $got): refusing to load it")
        }
        return bytes
    }
}
