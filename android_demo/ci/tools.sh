# Sourced by android_demo/build-apk.sh and android_demo/ci/jvm.sh: the pinned tool versions and their installers.
# Everything comes from package registries: Debian (JDK, aapt2, zipalign, apksigner, dexdump), npm (kotlin-compiler)
# and Maven Central (artifacts.lock, each file checked against its sha256). Downloads are cached in
# $TFBITMETA_ANDROID_CACHE (default ~/.cache/tfbitmeta-android), outside the repository.

AD_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"          # android_demo/
AD_CACHE="${TFBITMETA_ANDROID_CACHE:-${HOME:-/root}/.cache/tfbitmeta-android}"
# The Kotlin compiler CI and build-apk.sh use; must equal `kotlin` in gradle/libs.versions.toml (checked below).
AD_KOTLIN_VERSION=2.0.21
AD_MAVEN="${TFBITMETA_MAVEN_URL:-https://repo1.maven.org/maven2}"
AD_LOCK="$AD_HERE/ci/artifacts.lock"
AD_K="$AD_CACHE/npm/node_modules/kotlin-compiler"
AD_KOTLINC="$AD_K/bin/kotlinc-jvm"
AD_STDLIB="$AD_K/lib/kotlin-stdlib.jar"

ad_step() { echo "android_demo: $*"; }
ad_die() { echo "android_demo: error: $*" >&2; exit 1; }

# Debian packages, installed only when the command they provide is missing.
ad_apt() {
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } \
    || ad_die "apt-get install $* failed (install these Debian packages yourself, or run as root)"
}

ad_need() {  # ad_need COMMAND DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 || { ad_step "apt-get install $2 (for $1)"; ad_apt "$2"; }
}

ad_check_catalog() {
  local cat="$AD_HERE/gradle/libs.versions.toml"
  grep -q "^kotlin = \"$AD_KOTLIN_VERSION\"$" "$cat" \
    || ad_die "gradle/libs.versions.toml: kotlin differs from the $AD_KOTLIN_VERSION that ci/tools.sh compiles with"
  grep -q '^tensorflowLite = "2.16.1"$' "$cat" \
    || ad_die "gradle/libs.versions.toml: tensorflowLite differs from the 2.16.1 in ci/artifacts.lock"
  grep -q '^robolectric = "4.14.1"$' "$cat" \
    || ad_die "gradle/libs.versions.toml: robolectric differs from the 4.14.1 in ci/artifacts.lock"
  grep -q 'compileSdk = 34$' "$AD_HERE/app/build.gradle.kts" \
    || ad_die "app/build.gradle.kts: compileSdk differs from the android-all 14 (API 34) in ci/artifacts.lock"
}

ad_jdk() {
  if ! command -v javac >/dev/null 2>&1 || ! command -v jdeps >/dev/null 2>&1 || ! command -v keytool >/dev/null 2>&1; then
    ad_step "apt-get install openjdk-17-jdk-headless"
    ad_apt openjdk-17-jdk-headless
  fi
  AD_JAVA_HOME="${JAVA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v javac)")")")}"
}

ad_kotlinc() {
  ad_need npm npm
  if [ ! -x "$AD_KOTLINC" ] || ! grep -q "\"version\": \"$AD_KOTLIN_VERSION\"" "$AD_K/package.json" 2>/dev/null; then
    ad_step "npm install kotlin-compiler@$AD_KOTLIN_VERSION"
    mkdir -p "$AD_CACHE/npm"
    [ -f "$AD_CACHE/npm/package.json" ] || echo '{"private":true}' > "$AD_CACHE/npm/package.json"
    (cd "$AD_CACHE/npm" && npm install --silent --no-audit --no-fund --save-exact "kotlin-compiler@$AD_KOTLIN_VERSION") \
      || ad_die "npm install kotlin-compiler@$AD_KOTLIN_VERSION failed"
  fi
}

# The cached file for a lock path (an .aar stands for its classes.jar).
ad_file() {
  local f="$AD_CACHE/maven/$1"
  case "$f" in *.aar) echo "${f%.aar}-classes.jar" ;; *) echo "$f" ;; esac
}

# ad_fetch SET...: download (once) every artifact of these sets and check its sha256.
ad_fetch() {
  local set path sum f want
  while read -r set path sum; do
    case "$set" in ''|'#'*) continue ;; esac
    want=0
    for s in "$@"; do [ "$s" = "$set" ] && want=1; done
    [ $want = 1 ] || continue
    f="$AD_CACHE/maven/$path"
    if [ ! -f "$f" ] || ! echo "$sum  $f" | sha256sum -c --quiet - >/dev/null 2>&1; then
      ad_step "download $(basename "$path")"
      mkdir -p "$(dirname "$f")"
      curl -fsSL --retry 3 -o "$f.part" "$AD_MAVEN/$path" || ad_die "download of $path failed"
      echo "$sum  $f.part" | sha256sum -c --quiet - >/dev/null 2>&1 \
        || { rm -f "$f.part"; ad_die "sha256 mismatch for $path (expected $sum)"; }
      mv "$f.part" "$f"
      rm -f "${f%.aar}-classes.jar"
    fi
    case "$f" in *.aar) [ -s "${f%.aar}-classes.jar" ] || unzip -p "$f" classes.jar > "${f%.aar}-classes.jar" ;; esac
  done < "$AD_LOCK"
}

# ad_classpath SET: the set's jars joined with ':' (in lock order).
ad_classpath() {
  awk -v s="$1" '$1 == s { print $2 }' "$AD_LOCK" | while read -r p; do ad_file "$p"; done | paste -sd: -
}

# ad_path SET NAME-SUBSTRING: the one cached file of SET whose path contains NAME-SUBSTRING.
ad_path() {
  local p
  p=$(awk -v s="$1" -v n="$2" '$1 == s && index($2, n) { print $2 }' "$AD_LOCK")
  [ "$(echo "$p" | grep -c .)" = 1 ] || ad_die "ci/artifacts.lock: no single '$2' in set '$1'"
  ad_file "$p"
}
