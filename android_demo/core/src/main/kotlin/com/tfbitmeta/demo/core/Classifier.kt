package com.tfbitmeta.demo.core

/** The front end's two outputs for one image. */
class FrontEndOutput(val exitProbs: FloatArray, val features: FloatArray)

/** A loaded front end (on Android: a TFLite interpreter). Kept behind an interface so core stays TFLite-free. */
interface FrontEndEngine : AutoCloseable {
    /** [pixels]: H*W*C float32 values in [0, 255]. */
    fun run(pixels: FloatArray): FrontEndOutput
}

data class Answer(
    val label: String,
    val confidence: Double,
    /** "early_exit" | "server" | "offline", as the Python runtime */
    val decision: String,
    val localLabel: String,
    val localConfidence: Double,
    val serverLabel: String?,
    val serverConfidence: Double?,
    val frontEnd: String,
    val bits: String,
    val threshold: Double,
    val exitProbs: FloatArray,
    val serverProbs: DoubleArray?,
    val localLatencyMs: Double,
    val serverLatencyMs: Double?,
    val offlineReason: String? = null,
    /** the score that decided: "max_softmax" or the client's "mahalanobis" router; below [threshold] -> server */
    val route: String = "max_softmax",
    val routeScore: Double? = null,
) {
    val fellBack: Boolean get() = decision != "early_exit"
}

/**
 * Python `DeviceRuntime.classify` after the front end is chosen and loaded: run it, exit early when confident,
 * otherwise send the features to the server; server trouble gives the local answer marked offline.
 */
class Classifier(
    private val manifest: Manifest,
    private val client: FallbackClient?,
    private val routerFiles: RouterFiles = RouterFiles.NONE,
) {
    private val routers = HashMap<String, MahalanobisRouter>()

    /** The front end's Mahalanobis router (read once, sha256-checked), or null when it routes on max-softmax. */
    fun router(front: FrontEnd): MahalanobisRouter? {
        val spec = front.router?.takeIf { it.score == "mahalanobis" } ?: return null
        return routers.getOrPut(spec.path!!) { MahalanobisRouter.fromBytes(spec, routerFiles.read(spec.path)) }
    }

    fun classify(front: FrontEnd, engine: FrontEndEngine, pixels: FloatArray, thresholdOverride: Double? = null): Answer {
        val t0 = System.nanoTime()
        val out = engine.run(pixels)
        val localMs = (System.nanoTime() - t0) / 1e6
        return decide(front, out, thresholdOverride, localMs)
    }

    fun decide(front: FrontEnd, out: FrontEndOutput, thresholdOverride: Double?, localMs: Double): Answer {
        // an explicit threshold means max-softmax, as `tfbitmeta classify --threshold`
        val router = if (thresholdOverride == null) router(front) else null
        val th = if (router != null) front.router!!.threshold else EarlyExit.threshold(front, thresholdOverride)
        val d0 = EarlyExit.decide(out.exitProbs, th)
        val routeScore = router?.score(out.features) ?: d0.confidence.toDouble()
        val d = if (router != null) d0.copy(fallBack = routeScore < th) else d0
        val local = Answer(
            label = manifest.labels[d.label], confidence = d.confidence.toDouble(), decision = "early_exit",
            localLabel = manifest.labels[d.label], localConfidence = d.confidence.toDouble(), serverLabel = null,
            serverConfidence = null, frontEnd = front.path, bits = front.bitsName, threshold = th,
            exitProbs = out.exitProbs, serverProbs = null, localLatencyMs = localMs, serverLatencyMs = null,
            route = if (router != null) "mahalanobis" else "max_softmax", routeScore = routeScore,
        )
        if (!d.fallBack) return local
        if (client == null) return local.copy(decision = "offline", offlineReason = "no server configured")
        val body = FeatureEncoder.encodeRequest(out.features, front)
        return when (val r = client.predict(front.backend, body, manifest.labels.size)) {
            is ServerResult.Offline -> local.copy(decision = "offline", offlineReason = r.reason, serverLatencyMs = r.latencyMs)
            is ServerResult.Answer -> local.copy(
                decision = "server", label = manifest.labels[r.label], confidence = r.probs[r.label],
                serverLabel = manifest.labels[r.label], serverConfidence = r.probs[r.label], serverProbs = r.probs,
                serverLatencyMs = r.latencyMs,
            )
        }
    }
}
