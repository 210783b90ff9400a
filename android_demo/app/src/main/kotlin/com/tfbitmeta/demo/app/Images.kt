package com.tfbitmeta.demo.app

import android.content.Context
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.net.Uri
import com.tfbitmeta.demo.core.Manifest
import com.tfbitmeta.demo.core.Pixels
import java.io.IOException

/** Bundled sample or gallery image -> the front end's input (bilinear resize to the model size, PIL-style luma). */
object Images {
    fun sample(context: Context, name: String): Bitmap =
        context.assets.open("samples/$name").use { BitmapFactory.decodeStream(it) }
            ?: throw IOException("cannot decode samples/$name")

    fun gallery(context: Context, uri: Uri): Bitmap =
        (context.contentResolver.openInputStream(uri) ?: throw IOException("cannot open $uri")).use {
            BitmapFactory.decodeStream(it) ?: throw IOException("$uri is not an image")
        }

    fun pixels(bitmap: Bitmap, manifest: Manifest): FloatArray {
        val w = manifest.width
        val h = manifest.height
        val sized = if (bitmap.width == w && bitmap.height == h) bitmap else Bitmap.createScaledBitmap(bitmap, w, h, true)
        val argb = IntArray(w * h)
        sized.getPixels(argb, 0, w, 0, 0, w, h)
        return Pixels.fromArgb(argb, manifest.channels)
    }
}
