#!/usr/bin/env bash
# JVM checks of the Android demo without Gradle or an Android SDK (README "Installing the Android demo").
#   jvm.sh setup          install/cache the tools (ci/tools.sh), compile core (+ Android-safe API guard), its JUnit 5
#                         tests, app against android-all 14 + tensorflow-lite, and app's Robolectric (JUnit 4) tests
#   jvm.sh test           run core's JUnit tests (needs TFBITMETA_GOLDEN, TFBITMETA_MODELS, TFBITMETA_SERVER,
#                         TFBITMETA_TOKEN: tests/test_android.py sets them); prints "N passed, N failed, N skipped"
#   jvm.sh app-test ASSETS  run the Robolectric tests of MainActivity with ASSETS (models/, samples/) as the app's
#                         assets, offline with the pinned android-all (same variables, + TFBITMETA_TAMPERED: the bits
#                         name of a front end whose file does not match its sha256); prints JUnit's "OK (N tests)"
#                         line and "N passed, N failed"
# Build output goes to android_demo/build-ci/ (ignored by git).
set -euo pipefail
source "$(dirname "$0")/tools.sh"
HERE="$AD_HERE"
OUT="$HERE/build-ci"

setup() {
  local t0=$SECONDS
  ad_check_catalog
  ad_need aapt2 aapt
  ad_need dexdump dexdump          # tests/test_android.py lists the APK's classes with it
  ad_jdk
  ad_kotlinc
  ad_fetch compile junit5 robolectric
  local android tflite junit robo
  android=$(ad_path compile android-all)
  tflite="$(ad_path compile tensorflow-lite/):$(ad_path compile tensorflow-lite-api)"
  junit=$(ad_path junit5 console-standalone)
  robo=$(ad_classpath robolectric)
  rm -rf "$OUT" && mkdir -p "$OUT"
  ad_step "compile core (Kotlin $AD_KOTLIN_VERSION, JVM target 1.8, no Android/TFLite on the classpath)"
  "$AD_KOTLINC" -nowarn -jvm-target 1.8 -no-reflect -d "$OUT/core" "$HERE/core/src/main/kotlin"
  # Android has no java.net.http, java.awt, javax.*, jdk.*, sun.*: core must not use them.
  local bad
  jdeps --multi-release 17 -verbose:package -cp "$AD_STDLIB" "$OUT/core" > "$OUT/core.jdeps"   # fails loudly on error
  grep -q ' -> kotlin ' "$OUT/core.jdeps" || ad_die "jdeps output looks wrong: $OUT/core.jdeps"
  bad=$(awk '{print $3}' "$OUT/core.jdeps" | grep -E '^(java\.net\.http|java\.awt|javax\.|jdk\.|sun\.|android\.|org\.tensorflow)' | sort -u || true)
  [ -z "$bad" ] || ad_die "core uses APIs missing on Android or forbidden in core: $bad"
  ad_step "compile core tests"
  "$AD_KOTLINC" -nowarn -jvm-target 17 -no-reflect -cp "$OUT/core:$junit" -d "$OUT/core-test" "$HERE/core/src/test/kotlin"
  ad_step "compile app against android-all 14 (API 34) and tensorflow-lite 2.16.1"
  "$AD_KOTLINC" -nowarn -jvm-target 1.8 -no-reflect -cp "$android:$tflite:$OUT/core" -d "$OUT/app" "$HERE/app/src/main/kotlin"
  ad_step "compile app's Robolectric tests"
  "$AD_KOTLINC" -nowarn -jvm-target 17 -no-reflect -cp "$OUT/app:$OUT/core:$robo:$android:$tflite" \
    -d "$OUT/app-test" "$HERE/app/src/test/kotlin"
  ad_step "setup + compile took $((SECONDS - t0)) s"
}

run_tests() {
  [ -d "$OUT/core-test" ] || ad_die "run 'android_demo/ci/jvm.sh setup' first"
  local junit
  junit=$(ad_path junit5 console-standalone)
  rm -rf "$OUT/reports"
  set +e
  java -jar "$junit" execute --disable-banner --disable-ansi-colors --details=summary --fail-if-no-tests \
    --reports-dir "$OUT/reports" -cp "$OUT/core:$OUT/core-test:$AD_STDLIB" --scan-classpath "$OUT/core-test" > "$OUT/junit.log" 2>&1
  local rc=$?
  set -e
  python3 - "$OUT/reports" <<'PY' || rc=1
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for f in glob.glob(sys.argv[1] + "/TEST-*.xml"):
    for tc in ET.parse(f).getroot().iter("testcase"):
        if tc.find("failure") is not None or tc.find("error") is not None:
            failed += 1
            msg = (tc.find("failure") if tc.find("failure") is not None else tc.find("error")).get("message", "")
            print(f"FAILED {tc.get('classname')} {tc.get('name')}: {msg[:300]}")
        elif tc.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed or not passed else 0)
PY
  if [ $rc -ne 0 ]; then tail -40 "$OUT/junit.log" >&2; fi
  return $rc
}

# Robolectric reads the app the way AGP's unit tests hand it over: com/android/tools/test_config.properties names the
# merged manifest and a resource APK (aapt2 link output: in binary-resources mode the assets must be inside it).
# Offline: the pinned android-all jar is the one SDK (app/src/test's SdkProvider offers API 34 only, so Robolectric
# does not fetch its newest SDK just to parse the manifest); it is instrumented at run time.
run_app_tests() {
  local assets="${1:?usage: jvm.sh app-test ASSETS}"
  [ -d "$OUT/app-test" ] || ad_die "run 'android_demo/ci/jvm.sh setup' first"
  [ -f "$assets/models/manifest.json" ] || ad_die "$assets/models/manifest.json not found"
  local android tflite robo w="$OUT/robolectric" ns
  android=$(ad_path compile android-all)
  tflite="$(ad_path compile tensorflow-lite/):$(ad_path compile tensorflow-lite-api)"
  robo=$(ad_classpath robolectric)
  ns=$(sed -n 's/^ *namespace = "\([^"]*\)".*/\1/p' "$HERE/app/build.gradle.kts")
  rm -rf "$w" && mkdir -p "$w/config/com/android/tools"
  sed "s|<manifest xmlns:android=\"http://schemas.android.com/apk/res/android\">|<manifest xmlns:android=\"http://schemas.android.com/apk/res/android\" package=\"$ns\">|" \
    "$HERE/app/src/main/AndroidManifest.xml" > "$w/AndroidManifest.xml"
  aapt2 link -o "$w/resources.apk" -I "$android" --manifest "$w/AndroidManifest.xml" --min-sdk-version 26 \
    --target-sdk-version 34 -A "$assets" -0 .tflite 2> >(grep -v "Unknown chunk type '200'" >&2)
  printf 'android_merged_manifest=%s\nandroid_resource_apk=%s\nandroid_custom_package=%s\n' \
    "$w/AndroidManifest.xml" "$w/resources.apk" "$ns" > "$w/config/com/android/tools/test_config.properties"
  local classes
  classes=$(cd "$OUT/app-test" && find . -name '*Test.class' ! -name '*$*' | sed 's|^\./||; s|\.class$||; s|/|.|g' | sort)
  [ -n "$classes" ] || ad_die "no test classes in $OUT/app-test"
  set +e
  # android-all goes last: Robolectric's own jars must win over the framework classes it instruments.
  java -Xmx2g -Drobolectric.offline=true -Drobolectric.dependency.dir="$(dirname "$android")" \
    -Drobolectric.usePreinstrumentedJars=false -Drobolectric.logging.enabled=false \
    -cp "$OUT/app-test:$HERE/app/src/test/resources:$w/config:$OUT/app:$OUT/core:$AD_STDLIB:$tflite:$robo:$android" \
    org.junit.runner.JUnitCore $classes > "$w/junit.log" 2>&1
  local rc=$?
  set -e
  local ok run fail
  ok=$(sed -n 's/^OK (\([0-9]*\) tests\{0,1\})$/\1/p' "$w/junit.log")
  if [ -n "$ok" ]; then
    echo "Robolectric (JUnit 4): OK ($ok tests)"
    echo "$ok passed, 0 failed"
  else
    run=$(sed -n 's/^Tests run: \([0-9]*\), *Failures: \([0-9]*\).*/\1/p' "$w/junit.log")
    fail=$(sed -n 's/^Tests run: \([0-9]*\), *Failures: \([0-9]*\).*/\2/p' "$w/junit.log")
    grep -E '^[0-9]+\) |^(java|org|kotlin|junit)\.[A-Za-z.]*(Error|Exception|Failure)' "$w/junit.log" | head -40
    echo "Robolectric (JUnit 4): Tests run: ${run:-?}, Failures: ${fail:-?}"
    echo "$(( ${run:-0} - ${fail:-0} )) passed, ${fail:-1} failed"
    [ $rc -ne 0 ] || rc=1
  fi
  return $rc
}

case "${1:-}" in
  setup) setup ;;
  test) run_tests ;;
  app-test) run_app_tests "${2:-}" ;;
  *) echo "usage: $0 setup|test|app-test ASSETS" >&2; exit 2 ;;
esac
