#!/usr/bin/env bash
# Build the Android demo as a signed debug APK with the models inside, without Gradle or the Android SDK:
# kotlinc (npm) -> aapt2 link against android-all (API 34) -> R8 TraceReferences --check -> D8 -> zip (the TFLite
# native library of the chosen ABIs, stored) -> zipalign -> apksigner. See README "Installing the Android demo".
set -euo pipefail
source "$(dirname "$0")/ci/tools.sh"
REPO="$(cd "$AD_HERE/.." && pwd)"
ALL_ABIS="arm64-v8a,armeabi-v7a,x86,x86_64"

usage() {
  cat <<EOF
usage: android_demo/build-apk.sh MODELS [options]
  MODELS            folder written by \`tfbitmeta convert\` (manifest.json + .tflite); its front ends go into the APK
  --run RUN         the checkpoint the models came from: bundle its first test images as samples (else gallery only)
  --abi LIST        comma-separated ABIs of the TFLite native library: $ALL_ABIS
                    (default: all four; arm64-v8a alone for a small APK that runs on almost every current phone)
  --out APK         default: android_demo/build/tfbitmeta-demo-debug.apk
  --keystore FILE   sign with this keystore instead of the Android debug key (~/.android/debug.keystore or
                    \$TFBITMETA_DEBUG_KEYSTORE, generated with keytool when missing: the key Android Studio uses,
                    so \`adb install -r\` over a Gradle debug build works)
  --ks-alias NAME   key alias in --keystore (default: its only key)
  --ks-pass SPEC    keystore password as apksigner takes it: pass:..., env:VAR, file:PATH (default pass:android)
  --key-pass SPEC   key password if it differs from the keystore's
Needs: bash, curl, unzip, zip; installs the rest (Debian: JDK 17, aapt, zipalign, apksigner; npm: kotlin-compiler;
Maven Central: android-all, tensorflow-lite, r8 pinned in ci/artifacts.lock) and caches it in $AD_CACHE.
EOF
}

MODELS="" RUN="" ABIS="$ALL_ABIS" OUT="$AD_HERE/build/tfbitmeta-demo-debug.apk"
KEYSTORE="" KS_ALIAS="" KS_PASS="pass:android" KEY_PASS=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --run) RUN="$2"; shift 2 ;;
    --abi) ABIS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --keystore) KEYSTORE="$2"; shift 2 ;;
    --ks-alias) KS_ALIAS="$2"; shift 2 ;;
    --ks-pass) KS_PASS="$2"; shift 2 ;;
    --key-pass) KEY_PASS="$2"; shift 2 ;;
    -*) usage >&2; ad_die "unknown option $1" ;;
    *) [ -z "$MODELS" ] || { usage >&2; ad_die "one MODELS folder only"; }; MODELS="$1"; shift ;;
  esac
done
[ -n "$MODELS" ] || { usage >&2; exit 2; }
[ -f "$MODELS/manifest.json" ] || ad_die "$MODELS/manifest.json not found: run \`tfbitmeta convert RUN --out $MODELS\` first"
[ "$ABIS" = all ] && ABIS="$ALL_ABIS"
IFS=, read -r -a ABI_LIST <<<"$ABIS"
[ ${#ABI_LIST[@]} -gt 0 ] || ad_die "--abi: no ABI given"
for abi in "${ABI_LIST[@]}"; do
  case ",$ALL_ABIS," in *",$abi,"*) ;; *) ad_die "--abi: unknown ABI '$abi' (choose from $ALL_ABIS)" ;; esac
done
[ -z "$KEYSTORE" ] || [ -f "$KEYSTORE" ] || ad_die "--keystore $KEYSTORE not found"
for tool in curl unzip zip; do command -v $tool >/dev/null || ad_need $tool $tool; done
mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
MODELS="$(cd "$MODELS" && pwd)"
[ -z "$RUN" ] || RUN="$(cd "$RUN" && pwd)"

# What the Gradle build says, so both builds agree (one place: app/build.gradle.kts).
gradle_value() { sed -n "s/^ *$1 = \"\{0,1\}\([^\" ]*\)\"\{0,1\}.*/\1/p" "$AD_HERE/app/build.gradle.kts" | head -1; }
NAMESPACE=$(gradle_value namespace); APP_ID=$(gradle_value applicationId)
MIN_SDK=$(gradle_value minSdk); TARGET_SDK=$(gradle_value targetSdk)
VERSION_CODE=$(gradle_value versionCode); VERSION_NAME=$(gradle_value versionName)
for v in NAMESPACE APP_ID MIN_SDK TARGET_SDK VERSION_CODE VERSION_NAME; do
  [ -n "${!v}" ] || ad_die "cannot read $v from app/build.gradle.kts"
done

t0=$SECONDS
ad_check_catalog
for c in aapt2:aapt zipalign:zipalign apksigner:apksigner; do ad_need "${c%%:*}" "${c#*:}"; done
ad_jdk
ad_kotlinc
ad_fetch compile d8
ANDROID=$(ad_path compile android-all)
TFLITE_AAR="$AD_CACHE/maven/$(awk '$1 == "compile" && $2 ~ /tensorflow-lite-2/ { print $2 }' "$AD_LOCK")"
TFLITE=$(ad_path compile tensorflow-lite/)
TFLITE_API=$(ad_path compile tensorflow-lite-api)
R8=$(ad_path d8 r8-)
echo "android_demo: tools ready ($((SECONDS - t0)) s)"

W="$AD_HERE/build/apk-work"
mkdir -p "$W"

# 1. Assets: the manifest and front ends (sha256-checked while copied) and samples, by `tfbitmeta android-assets`.
if python3 -c 'import tfbitmeta.cli' >/dev/null 2>&1; then TFB=(python3 -m tfbitmeta.cli)
elif command -v uv >/dev/null 2>&1; then TFB=(uv run --project "$REPO" --frozen --quiet tfbitmeta)
else ad_die "needs the tfbitmeta package: run this from the repository with uv installed"; fi
rm -rf "$W/assets"
"${TFB[@]}" android-assets "$MODELS" "$W/assets" ${RUN:+--run "$RUN"}

# 2. Classes and dex, rebuilt only when the sources, the pinned tools or this script change.
stamp=$( { echo "$AD_KOTLIN_VERSION $NAMESPACE $MIN_SDK"; sha256sum "$AD_LOCK" "$0" "$AD_HERE/ci/tools.sh";
           find "$AD_HERE/core/src/main" "$AD_HERE/app/src/main/kotlin" "$AD_HERE/app/src/main/AndroidManifest.xml" \
             -type f -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
sed "s|<manifest xmlns:android=\"http://schemas.android.com/apk/res/android\">|<manifest xmlns:android=\"http://schemas.android.com/apk/res/android\" package=\"$NAMESPACE\">|" \
  "$AD_HERE/app/src/main/AndroidManifest.xml" > "$W/AndroidManifest.xml"
grep -q "package=\"$NAMESPACE\"" "$W/AndroidManifest.xml" || ad_die "app/src/main/AndroidManifest.xml: unexpected <manifest> tag"
LINK=(aapt2 link -I "$ANDROID" --manifest "$W/AndroidManifest.xml" --rename-manifest-package "$APP_ID"
      --min-sdk-version "$MIN_SDK" --target-sdk-version "$TARGET_SDK" --version-code "$VERSION_CODE"
      --version-name "$VERSION_NAME")
if [ -f "$W/dex/classes.dex" ] && [ "$(cat "$W/stamp" 2>/dev/null)" = "$stamp" ]; then
  ad_step "classes.dex is up to date"
else
  rm -rf "$W/classes" "$W/dex" "$W/gen" "$W/stamp" && mkdir -p "$W/classes" "$W/dex" "$W/gen"
  t=$SECONDS
  ad_step "kotlinc $AD_KOTLIN_VERSION: core, app"
  "$AD_KOTLINC" -nowarn -jvm-target 1.8 -no-reflect -d "$W/classes/core.jar" "$AD_HERE/core/src/main/kotlin"
  "$AD_KOTLINC" -nowarn -jvm-target 1.8 -no-reflect -cp "$ANDROID:$TFLITE:$TFLITE_API:$W/classes/core.jar" \
    -d "$W/classes/app.jar" "$AD_HERE/app/src/main/kotlin"
  # The app has no res/: R is empty, but compiled as AGP would.
  "${LINK[@]}" -o "$W/r-only.apk" --java "$W/gen" 2> >(grep -v "Unknown chunk type '200'" >&2)
  javac -nowarn -source 8 -target 8 -Xlint:-options -d "$W/gen-classes" $(find "$W/gen" -name '*.java')
  (cd "$W/gen-classes" && zip -q -r -X "$W/classes/r.jar" .)
  ad_step "compiled in $((SECONDS - t)) s; R8 TraceReferences --check (every API the app and core call exists)"
  t=$SECONDS
  java -cp "$R8" com.android.tools.r8.tracereferences.TraceReferences --check \
    --lib "$ANDROID" --lib "$AD_JAVA_HOME" --lib "$AD_STDLIB" --lib "$TFLITE" --lib "$TFLITE_API" \
    --source "$W/classes/app.jar" --source "$W/classes/core.jar" --source "$W/classes/r.jar" > "$W/tracereferences.log" 2>&1 \
    || { cat "$W/tracereferences.log" >&2; ad_die "TraceReferences --check failed: a referenced class or member is missing"; }
  ad_step "TraceReferences passed in $((SECONDS - t)) s; D8 --min-api $MIN_SDK"
  t=$SECONDS
  java -Xmx2g -cp "$R8" com.android.tools.r8.D8 --release --min-api "$MIN_SDK" --lib "$ANDROID" --lib "$AD_JAVA_HOME" \
    --output "$W/dex" "$W/classes/app.jar" "$W/classes/core.jar" "$W/classes/r.jar" "$AD_STDLIB" "$TFLITE" "$TFLITE_API" \
    > "$W/d8.log" 2>&1 || { tail -50 "$W/d8.log" >&2; ad_die "D8 failed"; }
  [ -f "$W/dex/classes.dex" ] || ad_die "D8 wrote no classes.dex"
  ad_step "dexed in $((SECONDS - t)) s"
  echo "$stamp" > "$W/stamp"
fi

# 3. Package: resources + assets (.tflite stored: the interpreter maps them), classes.dex, native libraries (stored).
rm -f "$W/unsigned.apk" "$W/aligned.apk"
"${LINK[@]}" -o "$W/unsigned.apk" -A "$W/assets" -0 .tflite 2> >(grep -v "Unknown chunk type '200'" >&2)
(cd "$W/dex" && zip -q -X "$W/unsigned.apk" classes.dex)
rm -rf "$W/native" && mkdir -p "$W/native"
for abi in "${ABI_LIST[@]}"; do
  mkdir -p "$W/native/lib/$abi"
  unzip -p "$TFLITE_AAR" "jni/$abi/libtensorflowlite_jni.so" > "$W/native/lib/$abi/libtensorflowlite_jni.so"
  [ -s "$W/native/lib/$abi/libtensorflowlite_jni.so" ] || ad_die "the TFLite AAR has no jni/$abi"
  (cd "$W/native" && zip -q -0 -X "$W/unsigned.apk" "lib/$abi/libtensorflowlite_jni.so")
done
zipalign -f -p 4 "$W/unsigned.apk" "$W/aligned.apk"

# 4. Sign (v2 + v3: minSdk 26) and verify.
if [ -z "$KEYSTORE" ]; then
  KEYSTORE="${TFBITMETA_DEBUG_KEYSTORE:-${HOME:-/root}/.android/debug.keystore}"
  if [ ! -f "$KEYSTORE" ]; then
    ad_step "generate the Android debug key $KEYSTORE"
    mkdir -p "$(dirname "$KEYSTORE")"
    keytool -genkeypair -keystore "$KEYSTORE" -storetype PKCS12 -storepass android -keypass android \
      -alias androiddebugkey -keyalg RSA -keysize 2048 -validity 10950 -dname "CN=Android Debug,O=Android,C=US" >/dev/null 2>&1
  fi
  KS_ALIAS=androiddebugkey KS_PASS=pass:android
fi
SIGN=(apksigner sign --ks "$KEYSTORE" --ks-pass "$KS_PASS" --min-sdk-version "$MIN_SDK" --out "$OUT")
[ -z "$KS_ALIAS" ] || SIGN+=(--ks-key-alias "$KS_ALIAS")
[ -z "$KEY_PASS" ] || SIGN+=(--key-pass "$KEY_PASS")
"${SIGN[@]}" "$W/aligned.apk"
apksigner verify --min-sdk-version "$MIN_SDK" "$OUT" || ad_die "apksigner verify failed for $OUT"
echo "android_demo: wrote $OUT ($(stat -c %s "$OUT") bytes; ABIs ${ABIS//,/ }; $((SECONDS - t0)) s)"
echo "install: adb install -r $OUT"
