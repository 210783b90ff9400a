// Pure Kotlin/JVM: no Android, no TFLite. Its tests need the golden vectors and a running fallback server:
//   TFBITMETA_GOLDEN=... TFBITMETA_MODELS=... TFBITMETA_SERVER=http://127.0.0.1:8500 TFBITMETA_TOKEN=... ./gradlew :core:test
// (CI runs the same tests without Gradle: android_demo/ci/jvm.sh, driven by tests/test_android.py.)
plugins {
    `java-library`
    alias(libs.plugins.kotlin.jvm)
}

java {
    sourceCompatibility = JavaVersion.VERSION_1_8
    targetCompatibility = JavaVersion.VERSION_1_8
}

kotlin {
    compilerOptions {
        jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_1_8)
    }
}

dependencies {
    testImplementation(libs.junit.jupiter)
    testRuntimeOnly(libs.junit.platform.launcher)
}

tasks.test {
    useJUnitPlatform()
}
