plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
}

android {
    namespace = "com.tfbitmeta.demo.app"
    compileSdk = 34

    defaultConfig {
        applicationId = "com.tfbitmeta.demo"
        minSdk = 26          // java.util.Base64 in core
        targetSdk = 34
        versionCode = 1
        versionName = "0.1"
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_1_8
        targetCompatibility = JavaVersion.VERSION_1_8
    }
    kotlinOptions {
        jvmTarget = "1.8"
    }
    sourceSets["main"].java.srcDirs("src/main/kotlin")
    // .tflite files stay uncompressed in the APK
    androidResources {
        noCompress += "tflite"
    }
    // Robolectric tests of MainActivity (src/test/kotlin). They need the variables tests/test_android.py sets
    // (TFBITMETA_MODELS, TFBITMETA_GOLDEN, TFBITMETA_SERVER, TFBITMETA_TOKEN, TFBITMETA_TAMPERED) and assets with
    // the models; CI runs them without Gradle (android_demo/ci/jvm.sh app-test).
    sourceSets["test"].java.srcDirs("src/test/kotlin")
    testOptions {
        unitTests.isIncludeAndroidResources = true
    }
}

dependencies {
    implementation(project(":core"))
    implementation(libs.tensorflow.lite)
    testImplementation(libs.junit4)
    testImplementation(libs.robolectric)
}
