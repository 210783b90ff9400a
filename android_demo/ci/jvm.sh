#!/usr/bin/env bash
# JVM checks of the Android demo without Gradle or an Android SDK (docs/android.md).
#   jvm.sh setup   install/cache the tools, compile core (+ Android-safe API guard), its tests, and compile-check app
#   jvm.sh test    run core's JUnit tests (needs TFBITMETA_GOLDEN, TFBITMETA_MODELS, TFBITMETA_SERVER, TFBITMETA_TOKEN:
#                  tests/test_android.py sets them) and print "N passed, N failed, N skipped"
# Tools: JDK 17 (javac/jdeps), npm's kotlin-compiler (pinned), jars from Maven Central pinned by sha256. Downloads are
# cached in $TFBITMETA_ANDROID_CACHE (default ~/.cache/tfbitmeta-android-ci, outside the repository); build output
# goes to android_demo/build-ci/ (ignored by git).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"          # android_demo/
CACHE="${TFBITMETA_ANDROID_CACHE:-${HOME:-/root}/.cache/tfbitmeta-android-ci}"
OUT="$HERE/build-ci"
KOTLIN_VERSION=2.4.20
MAVEN=https://repo1.maven.org/maven2
# group/artifact/version/file  sha256
JARS=(
  "org/robolectric/android-all/14-robolectric-10818077/android-all-14-robolectric-10818077.jar 6be2218c6a53fe3c57bc22ebdc723edcb7270a8a6f187545708aa5c0ed813977"
  "org/tensorflow/tensorflow-lite/2.16.1/tensorflow-lite-2.16.1.aar 34b065817e294e7dd3569504e8b9454938ceae453b6a459da54d5f6e45d3c94e"
  "org/tensorflow/tensorflow-lite-api/2.16.1/tensorflow-lite-api-2.16.1.aar 885b95bc9e47a4aa5cf8e71523aed9b05e397cfef1ea09773f13fea8b649fcee"
  "org/junit/platform/junit-platform-console-standalone/1.14.1/junit-platform-console-standalone-1.14.1.jar a09c656d60ada792cf12ed1e8dc7ead3edc98dde034332e97dfcb5b4268b9072"
)
K="$CACHE/npm/node_modules/kotlin-compiler"
KOTLINC="$K/bin/kotlinc-jvm"
STDLIB="$K/lib/kotlin-stdlib.jar"
JUNIT="$CACHE/junit-platform-console-standalone-1.14.1.jar"
ANDROID="$CACHE/android-all-14-robolectric-10818077.jar"
TFLITE="$CACHE/tensorflow-lite-2.16.1-classes.jar:$CACHE/tensorflow-lite-api-2.16.1-classes.jar"

step() { echo "android_demo: $*"; }
apt_install() {
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

install_tools() {
  mkdir -p "$CACHE"
  if ! command -v javac >/dev/null || ! command -v jdeps >/dev/null; then
    apt_install openjdk-17-jdk-headless
  fi
  if ! command -v npm >/dev/null; then
    apt_install npm
  fi
  if ! command -v aapt2 >/dev/null || [ ! -f /usr/share/android-framework-res/framework-res.apk ]; then
    apt_install aapt android-framework-res
  fi
  if [ ! -x "$KOTLINC" ] || ! grep -q "\"version\": \"$KOTLIN_VERSION\"" "$K/package.json"; then
    step "npm install kotlin-compiler@$KOTLIN_VERSION"
    mkdir -p "$CACHE/npm" && (cd "$CACHE/npm" && [ -f package.json ] || echo '{"private":true}' > package.json)
    (cd "$CACHE/npm" && npm install --silent --no-audit --no-fund "kotlin-compiler@$KOTLIN_VERSION")
  fi
  for entry in "${JARS[@]}"; do
    read -r path sum <<<"$entry"
    f="$CACHE/$(basename "$path")"
    if [ ! -f "$f" ] || ! echo "$sum  $f" | sha256sum -c --quiet - 2>/dev/null; then
      step "download $(basename "$path")"
      curl -fsSL --retry 3 -o "$f.part" "$MAVEN/$path"
      echo "$sum  $f.part" | sha256sum -c --quiet - || { echo "sha256 mismatch for $path" >&2; rm -f "$f.part"; exit 1; }
      mv "$f.part" "$f"
    fi
    case "$f" in *.aar) [ -f "${f%.aar}-classes.jar" ] || unzip -p "$f" classes.jar > "${f%.aar}-classes.jar" ;; esac
  done
}

setup() {
  local t0=$SECONDS
  # what CI compiles against must be what the Gradle build uses
  grep -q '^tensorflowLite = "2.16.1"$' "$HERE/gradle/libs.versions.toml" \
    || { echo "gradle/libs.versions.toml: tensorflowLite differs from the 2.16.1 jars CI checks against" >&2; exit 1; }
  grep -q 'compileSdk = 34$' "$HERE/app/build.gradle.kts" \
    || { echo "app/build.gradle.kts: compileSdk differs from CI's android-all 14 (API 34)" >&2; exit 1; }
  install_tools
  rm -rf "$OUT" && mkdir -p "$OUT"
  step "compile core (Kotlin $KOTLIN_VERSION, JVM target 1.8, no Android/TFLite on the classpath)"
  "$KOTLINC" -nowarn -jvm-target 1.8 -no-reflect -d "$OUT/core" "$HERE/core/src/main/kotlin"
  # Android has no java.net.http, java.awt, javax.*, jdk.*, sun.*: core must not use them.
  local bad
  jdeps --multi-release 17 -verbose:package -cp "$STDLIB" "$OUT/core" > "$OUT/core.jdeps"   # fails loudly on error
  grep -q ' -> kotlin ' "$OUT/core.jdeps" || { echo "jdeps output looks wrong: $OUT/core.jdeps" >&2; exit 1; }
  bad=$(awk '{print $3}' "$OUT/core.jdeps" | grep -E '^(java\.net\.http|java\.awt|javax\.|jdk\.|sun\.|android\.|org\.tensorflow)' | sort -u || true)
  if [ -n "$bad" ]; then echo "core uses APIs missing on Android or forbidden in core: $bad" >&2; exit 1; fi
  step "compile core tests"
  "$KOTLINC" -nowarn -jvm-target 17 -no-reflect -cp "$OUT/core:$JUNIT" -d "$OUT/core-test" "$HERE/core/src/test/kotlin"
  step "compile-check app against android-all 14 (API 34) and tensorflow-lite 2.16.1 from Maven Central"
  "$KOTLINC" -nowarn -jvm-target 1.8 -no-reflect -cp "$ANDROID:$TFLITE:$OUT/core" -d "$OUT/app" "$HERE/app/src/main/kotlin"
  # The manifest, as AGP would give it to aapt2 (AGP adds package= from the namespace): unknown attributes,
  # missing framework resources (theme) and XML errors fail here. framework-res is Debian's API 29 one.
  step "aapt2 link of app/src/main/AndroidManifest.xml against framework-res"
  sed 's|<manifest xmlns:android="http://schemas.android.com/apk/res/android">|<manifest xmlns:android="http://schemas.android.com/apk/res/android" package="com.tfbitmeta.demo.app">|' \
    "$HERE/app/src/main/AndroidManifest.xml" > "$OUT/AndroidManifest.xml"
  grep -q 'package="com.tfbitmeta.demo.app"' "$OUT/AndroidManifest.xml" || { echo "unexpected <manifest> tag" >&2; exit 1; }
  aapt2 link -o "$OUT/manifest-only.apk" -I /usr/share/android-framework-res/framework-res.apk \
    --manifest "$OUT/AndroidManifest.xml" --min-sdk-version 26 --target-sdk-version 34
  local activity
  activity=$(aapt2 dump badging "$OUT/manifest-only.apk" 2>/dev/null | sed -n "s/^launchable-activity: name='\([^']*\)'.*/\1/p")
  [ -f "$OUT/app/${activity//.//}.class" ] || { echo "launcher activity '$activity' is not a compiled app class" >&2; exit 1; }
  step "setup + compile took $((SECONDS - t0)) s"
}

run_tests() {
  [ -d "$OUT/core-test" ] || { echo "run 'android_demo/ci/jvm.sh setup' first" >&2; exit 1; }
  rm -rf "$OUT/reports"
  set +e
  java -jar "$JUNIT" execute --disable-banner --disable-ansi-colors --details=summary --fail-if-no-tests \
    --reports-dir "$OUT/reports" -cp "$OUT/core:$OUT/core-test:$STDLIB" --scan-classpath "$OUT/core-test" > "$OUT/junit.log" 2>&1
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

case "${1:-}" in
  setup) setup ;;
  test) run_tests ;;
  *) echo "usage: $0 setup|test" >&2; exit 2 ;;
esac
