package com.tfbitmeta.demo.app

import org.robolectric.internal.dependency.DependencyResolver
import org.robolectric.pluginapi.Sdk
import org.robolectric.plugins.DefaultSdkProvider
import java.util.TreeMap
import javax.annotation.Priority
import javax.inject.Inject

/**
 * Offers Robolectric only API 34, the app's compileSdk and the one android-all jar CI pins (ci/artifacts.lock).
 * Robolectric 4.14 otherwise loads its newest known SDK (API 35, another 150 MB download) just to parse the
 * manifest, whatever `@Config(sdk)` says. Registered in META-INF/services.
 */
@Priority(1)
class Api34SdkProvider @Inject constructor(resolver: DependencyResolver) : DefaultSdkProvider(resolver) {
    override fun populateSdks(knownSdks: TreeMap<Int, Sdk>) {
        super.populateSdks(knownSdks)
        knownSdks.keys.retainAll(setOf(34))
    }
}
