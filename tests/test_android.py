"""Android demo: `tfbitmeta android-assets`; the Kotlin core's JUnit tests and MainActivity's Robolectric tests
(android_demo/ci/jvm.sh) against golden vectors from the Python device runtime and a real fallback server started here
on 127.0.0.1 with a token; the signed APK that android_demo/build-apk.sh builds from freshly converted models, checked
with apksigner, aapt2, dexdump and zipalign.

`.ci/run` compiles core, app and their tests first (`android_demo/ci/jvm.sh setup`). Without that build the JVM and
APK tests skip locally, but fail under CI=true."""
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port

from tfbitmeta.cli import main

ROOT = Path(__file__).parents[1]
JVM = ROOT / "android_demo" / "ci" / "jvm.sh"
BUILD_APK = ROOT / "android_demo" / "build-apk.sh"
ALL_ABIS = ["arm64-v8a", "armeabi-v7a", "x86", "x86_64"]
TOKEN = "android-ci-token-0123456789"


def test_android_assets_copies_verified_front_ends_and_samples(exported, tiny_run, tmp_path):
    dest = tmp_path / "assets"
    r = CliRunner().invoke(main, ["android-assets", str(exported[0]), str(dest), "--run", str(tiny_run), "--samples", "3"])
    assert r.exit_code == 0, r.output
    fronts = [f for f in exported[1]["files"] if f["kind"] == "front_end"]
    assert sorted(p.name for p in (dest / "models").iterdir()) == sorted([f["path"] for f in fronts] + ["manifest.json"])
    assert (dest / "models" / "manifest.json").read_bytes() == (exported[0] / "manifest.json").read_bytes()
    for f in fronts:
        assert hashlib.sha256((dest / "models" / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert len(list((dest / "samples").glob("*_label*.png"))) == 3
    # a corrupted front end is refused, not copied
    bad = tmp_path / "bad"
    shutil.copytree(exported[0], bad)
    (bad / fronts[0]["path"]).write_bytes(b"junk")
    r = CliRunner().invoke(main, ["android-assets", str(bad), str(tmp_path / "a2")])
    assert r.exit_code == 1 and "sha256" in r.output


def _golden_tool():
    """tools/make_golden.py as a module; skips (fails under CI) without the JVM build of .ci/run."""
    if not (ROOT / "android_demo" / "build-ci" / "core-test").is_dir():
        if os.environ.get("CI"):
            pytest.fail("android_demo/build-ci is missing: .ci/run must run `android_demo/ci/jvm.sh setup` first")
        pytest.skip("run `bash android_demo/ci/jvm.sh setup` first (JDK 17, npm, Maven Central)")
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "tools" / "make_golden.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def token_server(exported):
    from tfbitmeta.serve.app import create_app
    from tfbitmeta.serve.config import ServeConfig
    from tfbitmeta.serve.runner import BackgroundServer

    cfg = ServeConfig(models=exported[0], host="127.0.0.1", port=free_port(), token=TOKEN, max_delay_ms=0)
    cfg.check_security()
    with BackgroundServer(create_app(cfg), cfg) as url:
        yield url


def need_jvm_build():
    if not (ROOT / "android_demo" / "build-ci" / "app-test").is_dir():
        if os.environ.get("CI"):
            pytest.fail("android_demo/build-ci is missing: .ci/run must run `android_demo/ci/jvm.sh setup` first")
        pytest.skip("run `bash android_demo/ci/jvm.sh setup` first (JDK 17, npm, Maven Central)")


@pytest.fixture(scope="module")
def golden(exported, tiny_run, tmp_path_factory):
    """Golden vectors of ``exported`` from tools/make_golden.py: (folder, golden.json)."""
    need_jvm_build()
    tool = _golden_tool()
    out = tmp_path_factory.mktemp("golden")
    g = tool.main(["--run", str(tiny_run), "--models", str(exported[0]), "--bits", "2,4,8,fp", "--images", "3",
                   "--out", str(out)])
    assert {c["bits"] for c in g["cases"]} == {"2", "4", "8", "fp"}
    return out, g


def jvm(command: list[str], exported, golden, token_server, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs android_demo/ci/jvm.sh with the test data variables; returns the process and its summary lines."""
    env = {**os.environ, "TFBITMETA_GOLDEN": str(golden[0]), "TFBITMETA_MODELS": str(exported[0]),
           "TFBITMETA_SERVER": token_server, "TFBITMETA_TOKEN": TOKEN, **env}
    p = subprocess.run(["bash", str(JVM), *command], env=env, capture_output=True, text=True, timeout=900)
    return p, [line for line in p.stdout.splitlines() if re.search(r"\d+ passed, \d+ failed|^Robolectric", line)]


def test_kotlin_core_junit_against_golden_vectors_and_live_server(exported, golden, token_server, capsys):
    p, summary = jvm(["test"], exported, golden, token_server)
    with capsys.disabled():
        print(f"\nandroid_demo core JUnit 5 tests: {summary[-1] if summary else 'no summary'}")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    passed = int(summary[-1].split()[0])
    # 12 golden cases x 7 per-case test factories (payload bytes packed and int8, packed bits, decisions, parsed
    # responses, live server, live packed vs int8), one per packing vector, and 39 others (hostile servers, JSON, ...)
    assert passed >= 7 * len(golden[1]["cases"]) + len(golden[1]["packing"]) + 30, summary


def test_main_activity_under_robolectric(exported, tiny_run, golden, token_server, tmp_path, capsys):
    """The app's screen with its real assets (the converted models, one front end corrupted after conversion), a
    test engine through the app's engine factory and the real server on loopback (MainActivityTest.kt)."""
    need_jvm_build()
    assets = tmp_path / "assets"
    r = CliRunner().invoke(main, ["android-assets", str(exported[0]), str(assets), "--run", str(tiny_run), "--samples", "3"])
    assert r.exit_code == 0, r.output
    tampered = next(f for f in exported[1]["files"] if f["kind"] == "front_end" and f["bits"]["name"] == "8")
    with open(assets / "models" / tampered["path"], "ab") as fh:
        fh.write(b"\0")
    p, summary = jvm(["app-test", str(assets)], exported, golden, token_server, TFBITMETA_TAMPERED="8")
    with capsys.disabled():
        print("\nandroid_demo MainActivity, Robolectric: " + (" / ".join(summary) if summary else "no summary"))
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    ok = re.search(r"OK \((\d+) tests\)", p.stdout)
    assert ok and int(ok.group(1)) >= 10, p.stdout[-3000:]


def test_ci_compiles_with_the_version_catalogs_kotlin():
    tools = (ROOT / "android_demo" / "ci" / "tools.sh").read_text()
    catalog = (ROOT / "android_demo" / "gradle" / "libs.versions.toml").read_text()
    ci = re.search(r"^AD_KOTLIN_VERSION=(\S+)$", tools, re.M).group(1)
    assert re.search(rf'^kotlin = "{re.escape(ci)}"$', catalog, re.M), (ci, "differs from the catalog's kotlin")


def build_apk(models, out, *args, env=None) -> tuple[str, int, float]:
    p = subprocess.run(["bash", str(BUILD_APK), str(models), "--out", str(out), *args], capture_output=True,
                       text=True, timeout=1800, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    m = re.search(r"wrote .* \((\d+) bytes; ABIs [^;]*; (\d+) s\)", p.stdout)
    assert m, p.stdout[-2000:]
    return p.stdout, int(m.group(1)), float(m.group(2))


def tool_output(*cmd) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-2000:])
    return p.stdout


def check_apk(apk: Path, exported, abis: list[str]) -> None:
    """What a phone's package installer and the app rely on."""
    v = tool_output("apksigner", "verify", "--verbose", "--min-sdk-version", "26", str(apk))
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in v, v
    badging = tool_output("aapt2", "dump", "badging", str(apk))
    assert re.search(r"^package: name='com\.tfbitmeta\.demo' versionCode='1' versionName='0\.1'", badging, re.M), badging
    assert re.search(r"^sdkVersion:'26'$", badging, re.M) and re.search(r"^targetSdkVersion:'34'$", badging, re.M)
    assert re.search(r"^launchable-activity: name='com\.tfbitmeta\.demo\.app\.MainActivity'", badging, re.M), badging
    assert "uses-permission: name='android.permission.INTERNET'" in badging
    native = re.search(r"^native-code: (.*)$", badging, re.M)
    assert native and native.group(1).split() == [f"'{a}'" for a in abis], native and native.group(0)
    # every class kotlinc compiled for app and core, TFLite's Interpreter and kotlin-stdlib are in the dex
    dex = set(re.findall(r"Class descriptor\s*: 'L([^;]+);'", tool_output("dexdump", str(apk))))
    work = ROOT / "android_demo" / "build" / "apk-work" / "classes"
    for jar in ("app.jar", "core.jar"):
        with zipfile.ZipFile(work / jar) as z:
            classes = {n[:-6] for n in z.namelist() if n.endswith(".class") and "META-INF" not in n}
        assert classes and classes <= dex, (jar, sorted(classes - dex)[:10])
    for cls in ("com/tfbitmeta/demo/app/MainActivity", "com/tfbitmeta/demo/app/TfliteEngine",
                "com/tfbitmeta/demo/core/Classifier", "com/tfbitmeta/demo/core/FallbackClient",
                "org/tensorflow/lite/Interpreter", "kotlin/collections/CollectionsKt", "kotlin/jvm/internal/Intrinsics"):
        assert cls in dex, cls
    # the models: byte for byte the manifest's, stored (uncompressed) and aligned so the interpreter can map them
    tool_output("zipalign", "-c", "-p", "4", str(apk))
    manifest = exported[1]
    with zipfile.ZipFile(apk) as z:
        assert z.read("assets/models/manifest.json") == (exported[0] / "manifest.json").read_bytes()
        fronts = [f for f in manifest["files"] if f["kind"] == "front_end"]
        assert sorted(n for n in z.namelist() if n.endswith(".tflite")) == sorted(f"assets/models/{f['path']}" for f in fronts)
        for f in fronts:
            info = z.getinfo(f"assets/models/{f['path']}")
            assert info.compress_type == zipfile.ZIP_STORED, f["path"]
            assert hashlib.sha256(z.read(info)).hexdigest() == f["sha256"], f["path"]
        libs = sorted(n for n in z.namelist() if n.startswith("lib/"))
        assert libs == sorted(f"lib/{a}/libtensorflowlite_jni.so" for a in abis), libs
        assert all(z.getinfo(n).compress_type == zipfile.ZIP_STORED for n in libs)
        assert len([n for n in z.namelist() if n.startswith("assets/samples/")]) == 8


def test_build_apk_from_freshly_converted_models(exported, tiny_run, tmp_path, capsys):
    """android_demo/build-apk.sh end to end, as a user runs it: all four ABIs with the debug key (generated here), then
    arm64-v8a alone signed with a keystore of the user's."""
    need_jvm_build()
    (ROOT / "android_demo" / "build" / "apk-work" / "stamp").unlink(missing_ok=True)   # the whole pipeline, every time
    debug_ks = tmp_path / "debug.keystore"
    full = tmp_path / "all.apk"
    out, size_all, secs_all = build_apk(exported[0], full, "--run", str(tiny_run), env={"TFBITMETA_DEBUG_KEYSTORE": str(debug_ks)})
    assert "TraceReferences passed" in out and "dexed in" in out, out[-3000:]
    assert debug_ks.is_file()
    check_apk(full, exported, ALL_ABIS)

    ks = tmp_path / "mine.p12"
    tool_output("keytool", "-genkeypair", "-keystore", str(ks), "-storetype", "PKCS12", "-storepass", "s3cret-pass",
                "-alias", "me", "-keyalg", "RSA", "-keysize", "2048", "-validity", "365", "-dname", "CN=tfbitmeta test")
    small = tmp_path / "arm64.apk"
    _, size_arm64, secs_arm64 = build_apk(exported[0], small, "--run", str(tiny_run), "--abi", "arm64-v8a",
                                          "--keystore", str(ks), "--ks-pass", "pass:s3cret-pass")
    check_apk(small, exported, ["arm64-v8a"])
    assert "CN=tfbitmeta test" in tool_output("apksigner", "verify", "--print-certs", str(small))
    assert size_arm64 < size_all / 2, (size_arm64, size_all)
    with capsys.disabled():
        print(f"\nandroid_demo APK: all ABIs {size_all} bytes in {secs_all:.0f} s; arm64-v8a {size_arm64} bytes in {secs_arm64:.0f} s")
    # a bad ABI is refused before anything is built
    p = subprocess.run(["bash", str(BUILD_APK), str(exported[0]), "--abi", "mips"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "unknown ABI 'mips'" in p.stderr


def test_android_apk_command_runs_the_build_script(exported, tmp_path, capfd):
    """`tfbitmeta android-apk` hands its options to build-apk.sh (a bad ABI: refused by the script before any build)."""
    r = CliRunner().invoke(main, ["android-apk", str(exported[0]), "--abi", "arm64-v8a,mips", "--out", str(tmp_path / "x.apk")])
    assert r.exit_code == 1 and "build-apk.sh failed" in r.output, r.output
    assert "unknown ABI 'mips'" in capfd.readouterr().err
    assert not (tmp_path / "x.apk").exists()


def test_kotlin_core_junit_against_a_federated_client(sfl_models, sfl_run, tmp_path, capsys):
    """The same JUnit suite on a federated export: one client's front ends (client 1), its explicit backend."""
    need_jvm_build()
    from tfbitmeta.serve.app import create_app
    from tfbitmeta.serve.config import ServeConfig
    from tfbitmeta.serve.runner import BackgroundServer

    tool = _golden_tool()
    models = sfl_models[0]
    golden = tool.main(["--run", str(sfl_run[0]), "--models", str(models), "--client", "1", "--bits", "2,4,8",
                        "--images", "2", "--out", str(tmp_path / "golden")])
    assert {c["backend"] for c in golden["cases"]} == {"server_2", "server_4", "server_8"}
    assert all(c["front_end"].startswith("client1_") for c in golden["cases"])
    cfg = ServeConfig(models=models, host="127.0.0.1", port=free_port(), token=TOKEN, max_delay_ms=0)
    with BackgroundServer(create_app(cfg), cfg) as url:
        env = {**os.environ, "TFBITMETA_GOLDEN": str(tmp_path / "golden"), "TFBITMETA_MODELS": str(models),
               "TFBITMETA_SERVER": url, "TFBITMETA_TOKEN": TOKEN}
        p = subprocess.run(["bash", str(JVM), "test"], env=env, capture_output=True, text=True, timeout=600)
    summary = [line for line in p.stdout.splitlines() if line.endswith("skipped") and "passed" in line]
    with capsys.disabled():
        print(f"\nandroid_demo JVM tests (federated client 1): {summary[-1] if summary else 'no summary'}")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
