package com.tfbitmeta.demo.app

import android.os.Looper
import android.view.View
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.Spinner
import android.widget.TextView
import com.tfbitmeta.demo.core.FrontEnd
import com.tfbitmeta.demo.core.FrontEndEngine
import com.tfbitmeta.demo.core.FrontEndOutput
import com.tfbitmeta.demo.core.Json
import com.tfbitmeta.demo.core.Manifest
import com.tfbitmeta.demo.core.Sha256
import com.tfbitmeta.demo.core.arr
import com.tfbitmeta.demo.core.dbl
import com.tfbitmeta.demo.core.int
import com.tfbitmeta.demo.core.obj
import com.tfbitmeta.demo.core.str
import org.junit.After
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Before
import org.junit.Test
import org.junit.runner.RunWith
import org.robolectric.Robolectric
import org.robolectric.RobolectricTestRunner
import org.robolectric.Shadows.shadowOf
import org.robolectric.android.controller.ActivityController
import org.robolectric.annotation.Config
import java.net.ServerSocket
import java.util.concurrent.CopyOnWriteArrayList

/**
 * MainActivity under Robolectric (JUnit 4, API 34): the real screen, assets (the converted models, one of them
 * tampered: TFBITMETA_TAMPERED) and worker thread, with the front end run by a test engine installed through
 * [MainActivity.engineFactory] (TFLite's native library cannot load on a desktop JVM) and, for the fallback, the
 * project's real server on loopback (TFBITMETA_SERVER, TFBITMETA_TOKEN; tests/test_android.py starts it).
 */
@RunWith(RobolectricTestRunner::class)
@Config(sdk = [34])
class MainActivityTest {
    /** Counts what the app does with its engines; [output] says what a front end answers. */
    private inner class TestFactory : EngineFactory {
        val opened = CopyOnWriteArrayList<TestEngine>()
        @Volatile var failOpen: Throwable? = null
        @Volatile var failRun: Throwable? = null
        @Volatile var output: (FrontEnd) -> FrontEndOutput = ::confident

        override fun open(model: ByteArray, front: FrontEnd, manifest: Manifest): FrontEndEngine {
            failOpen?.let { throw it }
            assertEquals("the app must hand over the verified bytes", front.sha256, Sha256.hex(model))
            return TestEngine(front).also { opened += it }
        }

        inner class TestEngine(val front: FrontEnd) : FrontEndEngine {
            @Volatile var runs = 0
            @Volatile var closed = false
            @Volatile var pixelCount = -1

            override fun run(pixels: FloatArray): FrontEndOutput {
                check(!closed) { "run() on a closed engine" }
                failRun?.let { throw it }
                runs++
                pixelCount = pixels.size
                return output(front)
            }

            override fun close() { closed = true }
        }
    }

    private val manifest = AppTestData.manifest
    private val tampered = AppTestData.tampered
    /** The bitwidths whose file is intact, in manifest order. */
    private val usable = manifest.frontEnds.map { it.bitsName }.distinct().filter { it != tampered }
    private val factory = TestFactory()
    private lateinit var saved: EngineFactory
    private lateinit var controller: ActivityController<MainActivity>

    @Before
    fun install() {
        saved = MainActivity.engineFactory
        MainActivity.engineFactory = factory
    }

    @After
    fun restore() {
        MainActivity.engineFactory = saved
    }

    // -- helpers ------------------------------------------------------------------------------------------

    /** Exit probabilities certain of label 3 (early exit at any threshold <= 1). */
    private fun confident(front: FrontEnd): FrontEndOutput =
        FrontEndOutput(FloatArray(manifest.labels.size) { if (it == 3) 1f else 0f }, FloatArray(front.featureCount))

    private fun launch(): MainActivity {
        controller = Robolectric.buildActivity(MainActivity::class.java).setup()
        val a = controller.get()
        waitUntil("the first sample is shown") { a.view<ImageView>("preview").drawable != null }
        return a
    }

    private fun waitUntil(what: String, timeoutMs: Long = 20_000, cond: () -> Boolean) {
        val end = System.currentTimeMillis() + timeoutMs
        while (true) {
            shadowOf(Looper.getMainLooper()).idle()
            if (cond()) return
            if (System.currentTimeMillis() > end) throw AssertionError("timed out waiting until $what")
            Thread.sleep(5)
        }
    }

    @Suppress("UNCHECKED_CAST")
    private fun <T : View> MainActivity.view(tag: String): T =
        window.decorView.findViewWithTag<View>(tag) as T? ?: throw AssertionError("no view tagged '$tag'")

    private fun MainActivity.result(): String = view<TextView>("result").text.toString()

    private fun MainActivity.set(tag: String, text: String) = view<EditText>(tag).setText(text)

    private fun MainActivity.bits(name: String) {
        val spinner = view<Spinner>("bits")
        val items = (0 until spinner.adapter.count).map { spinner.adapter.getItem(it) as String }
        spinner.setSelection(items.indexOf(name).also { assertTrue("no '$name' in $items", it >= 0) })
    }

    /** Clicks Classify and waits for the worker's answer; the button must be usable again afterwards. */
    private fun MainActivity.classify(): String {
        val button = view<Button>("classify")
        assertTrue(button.isEnabled)
        button.performClick()
        waitUntil("the classification ends") { button.isEnabled && result() != "Classifying…" }
        return result()
    }

    private fun line(text: String, prefix: String): String =
        text.lines().firstOrNull { it.startsWith(prefix) } ?: throw AssertionError("no '$prefix' line in:\n$text")

    private fun closedPort(): Int = ServerSocket(0).use { it.localPort }

    // -- tests ----------------------------------------------------------------------------------------------

    @Test
    fun launchesWithTheBundledModelsAndSamples() {
        val a = launch()
        assertFalse(a.result(), a.result().startsWith("No usable models"))
        val samples = a.view<Spinner>("samples").adapter
        val names = (0 until samples.count).map { samples.getItem(it) as String }
        assertEquals(names.sorted(), a.assets.list("samples")!!.sorted())
        assertTrue(names.isNotEmpty())
    }

    @Test
    fun bitwidthSpinnerListsAutoAndTheManifestsBitwidths() {
        val a = launch()
        val adapter = a.view<Spinner>("bits").adapter
        val shown = (0 until adapter.count).map { adapter.getItem(it) as String }
        // straight from manifest.json, not through the app's parser
        val inFile = Json.parse(AppTestData.manifestText).obj("manifest")["files"].arr("files").map { it.obj("file") }
            .filter { it["kind"].str("kind") == "front_end" }.map { it["bits"].obj("bits")["name"].str("name") }.distinct()
        assertEquals(listOf("auto") + inFile, shown)
        assertEquals(4, inFile.size)
    }

    @Test
    fun aBadThresholdIsAnErrorOnScreenAndNothingRuns() {
        val a = launch()
        for (bad in listOf("1.5", "-0.1", "abc", "0.5.1")) {
            a.set("threshold", bad)
            a.view<Button>("classify").performClick()
            shadowOf(Looper.getMainLooper()).idle()
            assertEquals("threshold '$bad'", "The threshold must be a number between 0 and 1", a.result())
            assertTrue(a.view<Button>("classify").isEnabled)
        }
        assertTrue(factory.opened.isEmpty())
    }

    @Test
    fun classifyWithAConfidentEngineShowsTheEarlyExitAnswer() {
        val a = launch()
        a.set("url", "")
        a.bits(usable[0])
        val text = a.classify()
        assertTrue(text, line(text, "Prediction:").startsWith("Prediction: ${manifest.labels[3]}  (100.0 %) on the device (early exit)"))
        assertTrue(text, text.contains("Fell back to the server: no"))
        val front = factory.opened.single().front
        assertEquals(usable[0], front.bitsName)
        assertTrue(text, text.contains("Front end: ${front.path}  (bits ${front.bitsName})"))
        assertTrue(text, line(text, "Latency on device:").matches(Regex("Latency on device: \\d+\\.\\d ms")))
        assertEquals("pixels handed to the engine", manifest.height * manifest.width * manifest.channels,
            factory.opened.single().pixelCount)
        // "auto" picks a front end itself and says so
        a.bits("auto")
        val auto = a.classify()
        assertTrue(auto, auto.contains(", chosen by auto)"))
        assertTrue(auto, auto.contains("on the device (early exit)"))
    }

    @Test
    fun unsureExitAsksTheRealServerAndShowsItsAnswerAndBothLatencies() {
        val a = launch()
        a.set("url", AppTestData.serverUrl)
        a.set("token", AppTestData.token)
        a.set("threshold", "")
        val case = AppTestData.cases.first { it["bits"].str("bits") == usable[0] }
        val features = AppTestData.features(case)
        // a uniform exit: below any manifest threshold > 1/n, so the app must fall back
        factory.output = { FrontEndOutput(FloatArray(manifest.labels.size) { 1f / manifest.labels.size }, features) }
        a.bits(usable[0])
        val text = a.classify()
        val serverLabel = manifest.labels[case["server_label"].int("server_label")]
        val serverP = case["server_probs"].arr("server_probs")[case["server_label"].int("l")].dbl("p")
        assertTrue(text, line(text, "Prediction:").startsWith("Prediction: $serverLabel  ("))
        assertTrue(text, line(text, "Prediction:").endsWith("via the server"))
        assertTrue(text, text.contains("Fell back to the server: yes"))
        val shown = Regex("Server: (.*)  \\(([0-9.]+) %\\)").matchEntire(line(text, "Server:"))!!
        assertEquals(serverLabel, shown.groupValues[1])
        assertEquals(100 * serverP, shown.groupValues[2].toDouble(), 100.0 / 256 + 0.05)
        assertTrue(text, line(text, "Latency on device:").matches(Regex("Latency on device: \\d+\\.\\d ms")))
        val serverMs = Regex("Latency of the server call: (\\d+\\.\\d) ms").matchEntire(line(text, "Latency of the server call:"))!!
        assertTrue(text, serverMs.groupValues[1].toDouble() > 0.0)
    }

    @Test
    fun serverDownOrTokenRefusedGivesTheLocalAnswerOfflineWithTheReason() {
        val a = launch()
        factory.output = { FrontEndOutput(FloatArray(manifest.labels.size) { if (it == 5) 0.4f else 0.6f / (manifest.labels.size - 1) }, FloatArray(it.featureCount)) }
        a.bits(usable[0])
        a.set("threshold", "0.9")
        a.set("url", "http://127.0.0.1:${closedPort()}")
        val down = a.classify()
        assertTrue(down, line(down, "Prediction:").startsWith("Prediction: ${manifest.labels[5]}  (40.0 %) on the device — OFFLINE"))
        assertTrue(down, line(down, "Offline:").startsWith("Offline: server unreachable: ConnectException"))
        assertTrue(down, down.contains("Fell back to the server: yes"))
        a.set("url", AppTestData.serverUrl)
        a.set("token", "not-the-token-0123456789")
        val refused = a.classify()
        assertTrue(refused, refused.contains("on the device — OFFLINE"))
        assertTrue(refused, line(refused, "Offline:").startsWith("Offline: server answered 401"))
    }

    @Test
    fun anEngineThrowingAnErrorLeavesTheScreenUsable() {
        val a = launch()
        a.set("url", "")
        a.bits(usable[0])
        factory.failOpen = UnsatisfiedLinkError("dlopen failed: library \"libtensorflowlite_jni.so\" not found")
        val text = a.classify()   // returns only once the button is enabled again
        assertEquals("Error: UnsatisfiedLinkError: dlopen failed: library \"libtensorflowlite_jni.so\" not found", text)
        factory.failOpen = null
        factory.failRun = OutOfMemoryError("Failed to allocate")
        assertEquals("Error: OutOfMemoryError: Failed to allocate", a.classify())
        assertTrue("an engine that failed is closed", factory.opened.single().closed)
        factory.failRun = null
        assertTrue(a.classify().contains("on the device (early exit)"))
        assertEquals("the failed engine is not reused", 2, factory.opened.size)
    }

    @Test
    fun theRealTfliteEngineFailingToLoadItsNativeLibraryLeavesTheScreenUsable() {
        // The app's own factory: on a desktop JVM TFLite's native library cannot load, as on a phone with a wrong ABI.
        MainActivity.engineFactory = saved
        val a = launch()
        a.set("url", "")
        a.bits(usable[0])
        val text = a.classify()
        assertTrue(text, text.startsWith("Error: UnsatisfiedLinkError: Failed to load native TensorFlow Lite methods"))
        MainActivity.engineFactory = factory
        assertTrue(a.classify().contains("on the device (early exit)"))
    }

    @Test
    fun aFrontEndFailingItsSha256IsRefusedOnScreen() {
        val a = launch()
        a.set("url", "")
        a.bits(tampered)
        val text = a.classify()
        val front = manifest.frontEnds.first { it.bitsName == tampered }
        assertTrue(text, text.startsWith("Error: ${front.path} fails its sha256 check against the manifest"))
        assertTrue(text, text.endsWith("refusing to load it"))
        assertTrue("a tampered model must never reach the engine", factory.opened.isEmpty())
        a.bits(usable[0])
        assertTrue(a.classify().contains("on the device (early exit)"))
    }

    @Test
    fun theEngineIsReusedAcrossClicksAndClosedOnChangeAndDestroy() {
        val a = launch()
        a.set("url", "")
        a.bits(usable[0])
        a.classify()
        a.classify()
        val first = factory.opened.single()
        assertEquals(2, first.runs)
        assertFalse(first.closed)
        a.bits(usable[1])
        a.classify()
        assertTrue("the previous front end is closed when another is chosen", first.closed)
        val second = factory.opened[1]
        assertEquals(usable[1], second.front.bitsName)
        assertFalse(second.closed)
        controller.pause().stop().destroy()
        waitUntil("the engine is closed after onDestroy") { second.closed }
        assertEquals(2, factory.opened.size)
    }
}
