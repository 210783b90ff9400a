package com.tfbitmeta.demo.app

import android.app.Activity
import android.app.ActivityManager
import android.content.Context
import android.content.Intent
import android.graphics.Bitmap
import android.os.Bundle
import android.text.InputType
import android.util.Log
import android.view.View
import android.view.ViewGroup
import android.widget.AdapterView
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import com.tfbitmeta.demo.core.Answer
import com.tfbitmeta.demo.core.BitsChoice
import com.tfbitmeta.demo.core.Bitwidth
import com.tfbitmeta.demo.core.Classifier
import com.tfbitmeta.demo.core.RouterFiles
import com.tfbitmeta.demo.core.FallbackClient
import com.tfbitmeta.demo.core.FrontEnd
import com.tfbitmeta.demo.core.FrontEndEngine
import com.tfbitmeta.demo.core.Manifest
import com.tfbitmeta.demo.core.Sha256
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * The demo screen, built in code with framework widgets only (no AndroidX, no generated R class): pick a bundled
 * sample or a gallery image, choose a bitwidth or "auto", classify on the device, fall back to the server when the
 * early exit is not confident. Model loading, inference and the network call run on [worker], never on the main
 * thread; the UI is updated with runOnUiThread. The loaded front end ([engine]) is kept across clicks and closed
 * when another front end is chosen, when it failed, and when the Activity is destroyed.
 */
class MainActivity : Activity() {
    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private lateinit var manifest: Manifest
    private lateinit var samples: List<String>
    private var image: Bitmap? = null
    // The open front end and the manifest entry it was loaded from: used on [worker] only.
    private var engine: FrontEndEngine? = null
    private var engineFront: FrontEnd? = null

    private lateinit var sampleSpinner: Spinner
    private lateinit var bitsSpinner: Spinner
    private lateinit var urlEdit: EditText
    private lateinit var tokenEdit: EditText
    private lateinit var thresholdEdit: EditText
    private lateinit var preview: ImageView
    private lateinit var result: TextView
    private lateinit var classifyButton: Button

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val root = LinearLayout(this).apply { orientation = LinearLayout.VERTICAL; setPadding(32, 32, 32, 32) }
        result = TextView(this).apply { setTextIsSelectable(true); tag = "result" }
        try {
            manifest = Manifest.parse(assets.open("models/manifest.json").use { String(it.readBytes(), Charsets.UTF_8) })
            samples = (assets.list("samples") ?: emptyArray()).sorted()
        } catch (e: Exception) {
            result.text = "No usable models in the app's assets (run `tfbitmeta android-assets`, see README): ${e.message}"
            root.addView(result)
            setContentView(ScrollView(this).apply { addView(root) })
            return
        }
        val prefs = getSharedPreferences("settings", Context.MODE_PRIVATE)

        root.addView(label("Sample image"))
        sampleSpinner = Spinner(this).apply {
            tag = "samples"
            adapter = ArrayAdapter(this@MainActivity, android.R.layout.simple_spinner_dropdown_item, samples)
            onItemSelectedListener = object : AdapterView.OnItemSelectedListener {
                override fun onItemSelected(parent: AdapterView<*>?, view: View?, position: Int, id: Long) =
                    loadImage { Images.sample(this@MainActivity, samples[position]) }
                override fun onNothingSelected(parent: AdapterView<*>?) {}
            }
        }
        root.addView(sampleSpinner)
        root.addView(Button(this).apply {
            text = "Pick from gallery"
            setOnClickListener {
                val pick = Intent(Intent.ACTION_GET_CONTENT).apply { type = "image/*"; addCategory(Intent.CATEGORY_OPENABLE) }
                startActivityForResult(Intent.createChooser(pick, "Image to classify"), PICK_IMAGE)
            }
        })
        preview = ImageView(this).apply {
            tag = "preview"
            adjustViewBounds = true
            layoutParams = LinearLayout.LayoutParams(ViewGroup.LayoutParams.MATCH_PARENT, 360)
        }
        root.addView(preview)

        root.addView(label("Bitwidth"))
        val bitsNames = listOf("auto") + manifest.frontEnds.map { it.bitsName }.distinct()
        bitsSpinner = Spinner(this).apply {
            tag = "bits"
            adapter = ArrayAdapter(this@MainActivity, android.R.layout.simple_spinner_dropdown_item, bitsNames)
            setSelection(bitsNames.indexOf(prefs.getString("bits", "auto")).coerceAtLeast(0))
        }
        root.addView(bitsSpinner)

        root.addView(label("Server URL (emulator: http://10.0.2.2:8500)"))
        urlEdit = edit(prefs.getString("url", "http://10.0.2.2:8500")!!, InputType.TYPE_TEXT_VARIATION_URI).apply { tag = "url" }
        root.addView(urlEdit)
        root.addView(label("Bearer token"))
        tokenEdit = edit(prefs.getString("token", "")!!, InputType.TYPE_TEXT_VARIATION_PASSWORD).apply { tag = "token" }
        root.addView(tokenEdit)
        root.addView(label("Exit threshold (empty: the manifest's)"))
        thresholdEdit = edit(prefs.getString("threshold", "")!!, InputType.TYPE_NUMBER_FLAG_DECIMAL).apply { tag = "threshold" }
        root.addView(thresholdEdit)

        classifyButton = Button(this).apply { text = "Classify"; tag = "classify"; setOnClickListener { classify() } }
        root.addView(classifyButton)
        root.addView(result)
        setContentView(ScrollView(this).apply { addView(root) })
    }

    @Deprecated("framework callback")
    override fun onActivityResult(requestCode: Int, resultCode: Int, data: Intent?) {
        super.onActivityResult(requestCode, resultCode, data)
        val uri = data?.data
        if (requestCode == PICK_IMAGE && resultCode == RESULT_OK && uri != null) {
            loadImage { Images.gallery(this, uri) }
        }
    }

    override fun onDestroy() {
        worker.execute { closeEngine() }   // after a classification still in flight
        worker.shutdown()
        super.onDestroy()
    }

    private fun loadImage(load: () -> Bitmap) {
        worker.execute {
            val outcome = runCatching(load)
            runOnUiThread {
                outcome.onSuccess { image = it; preview.setImageBitmap(it); result.text = "" }
                    .onFailure { result.text = "Cannot read the image: ${it.message}" }
            }
        }
    }

    private fun classify() {
        val bitmap = image ?: run { result.text = "Pick an image first"; return }
        val bits = bitsSpinner.selectedItem as String
        val url = urlEdit.text.toString().trim()
        val token = tokenEdit.text.toString().trim()
        val thresholdText = thresholdEdit.text.toString().trim()
        val threshold = if (thresholdText.isEmpty()) null else thresholdText.toDoubleOrNull()
        if (thresholdText.isNotEmpty() && (threshold == null || threshold < 0.0 || threshold > 1.0)) {
            result.text = "The threshold must be a number between 0 and 1"
            return
        }
        getSharedPreferences("settings", Context.MODE_PRIVATE).edit()
            .putString("bits", bits).putString("url", url).putString("token", token).putString("threshold", thresholdText)
            .apply()
        val choice = if (bits == "auto") {
            val mem = ActivityManager.MemoryInfo()
            (getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager).getMemoryInfo(mem)
            BitsChoice.Auto(mem.totalMem, Runtime.getRuntime().availableProcessors())
        } else BitsChoice.Named(bits)
        classifyButton.isEnabled = false
        result.text = "Classifying…"
        worker.execute {
            // Throwable, not Exception: an Error from the native runtime (UnsatisfiedLinkError, OutOfMemoryError) must
            // not kill the worker and leave the button disabled.
            val text = try {
                val front = Bitwidth.choose(manifest.frontEnds, choice)
                val client = if (url.isEmpty()) null else FallbackClient(url, token.ifEmpty { null }, timeoutMs = 3000)
                val answer = Classifier(manifest, client, routerFiles).classify(front, engineFor(front), Images.pixels(bitmap, manifest), threshold)
                describe(answer, bits == "auto")
            } catch (e: Throwable) {
                closeEngine()   // it may be broken: the next click loads it again
                "Error: " + if (e is Exception) e.message else "${e.javaClass.simpleName}: ${e.message}"
            }
            runOnUiThread { result.text = text; classifyButton.isEnabled = true }
        }
    }

    /** A federated client's router file (manifest `router.path`), from the assets next to its front end. */
    private val routerFiles = RouterFiles { path -> assets.open("models/$path").use { it.readBytes() } }

    /** The open engine if it holds [front]; else closes it and opens [front] (sha256-checked first). Worker only. */
    private fun engineFor(front: FrontEnd): FrontEndEngine {
        engine?.let { if (engineFront == front) return it }
        closeEngine()
        val model = Sha256.verified(front, assets.open("models/${front.path}").use { it.readBytes() })
        return engineFactory.open(model, front, manifest).also { engine = it; engineFront = front }
    }

    private fun closeEngine() {
        val e = engine ?: return
        engine = null
        engineFront = null
        try {
            e.close()
        } catch (t: Throwable) {
            Log.w(TAG, "closing ${e.javaClass.simpleName} failed", t)
        }
    }

    private fun describe(a: Answer, auto: Boolean): String = buildString {
        val via = when (a.decision) {
            "early_exit" -> "on the device (early exit)"
            "server" -> "via the server"
            else -> "on the device — OFFLINE"
        }
        appendLine("Prediction: ${a.label}  (${"%.1f".format(100 * a.confidence)} %) $via")
        appendLine("Front end: ${a.frontEnd}  (bits ${a.bits}${if (auto) ", chosen by auto" else ""})")
        appendLine("On-device: ${a.localLabel}  (${"%.1f".format(100 * a.localConfidence)} %), " +
            if (a.route == "max_softmax") "threshold ${a.threshold}"
            else "${a.route} router: score ${"%.1f".format(a.routeScore)}, threshold ${"%.1f".format(a.threshold)}")
        appendLine("Fell back to the server: ${if (a.fellBack) "yes" else "no"}")
        if (a.serverLabel != null) appendLine("Server: ${a.serverLabel}  (${"%.1f".format(100 * a.serverConfidence!!)} %)")
        if (a.offlineReason != null) appendLine("Offline: ${a.offlineReason}")
        appendLine("Latency on device: ${"%.1f".format(a.localLatencyMs)} ms")
        if (a.serverLatencyMs != null) appendLine("Latency of the server call: ${"%.1f".format(a.serverLatencyMs)} ms")
    }

    private fun label(s: String) = TextView(this).apply { text = s; setPadding(0, 24, 0, 0) }

    private fun edit(value: String, variation: Int) = EditText(this).apply {
        setText(value)
        inputType = if (variation == InputType.TYPE_NUMBER_FLAG_DECIMAL) InputType.TYPE_CLASS_NUMBER or variation
        else InputType.TYPE_CLASS_TEXT or variation
        setSingleLine(true)
    }

    companion object {
        private const val PICK_IMAGE = 1
        private const val TAG = "tfbitmeta"

        /** How front ends are opened: TFLite on a device. The seam for tests, which install their own engine. */
        @JvmStatic
        @Volatile
        var engineFactory: EngineFactory = EngineFactory { model, front, manifest -> TfliteEngine(model, front, manifest) }
    }
}
