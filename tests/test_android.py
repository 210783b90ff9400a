"""Android demo: `tfbitmeta android-assets`, and the Kotlin core's JUnit tests (android_demo/ci/jvm.sh) run against
golden vectors from the Python device runtime and a real fallback server started here on 127.0.0.1 with a token.

`.ci/run` compiles core, its tests and the app first (`android_demo/ci/jvm.sh setup`). Without that build this
test skips locally, but fails under CI=true."""
import hashlib
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port

from tfbitmeta.cli import main

ROOT = Path(__file__).parents[1]
JVM = ROOT / "android_demo" / "ci" / "jvm.sh"
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
    import shutil
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


def test_kotlin_core_junit_against_golden_vectors_and_live_server(exported, tiny_run, token_server, tmp_path, capsys):
    tool = _golden_tool()
    golden = tool.main(["--run", str(tiny_run), "--models", str(exported[0]), "--bits", "2,4,8,fp", "--images", "3",
                        "--out", str(tmp_path / "golden")])
    assert {c["bits"] for c in golden["cases"]} == {"2", "4", "8", "fp"}
    env = {**os.environ, "TFBITMETA_GOLDEN": str(tmp_path / "golden"), "TFBITMETA_MODELS": str(exported[0]),
           "TFBITMETA_SERVER": token_server, "TFBITMETA_TOKEN": TOKEN}
    p = subprocess.run(["bash", str(JVM), "test"], env=env, capture_output=True, text=True, timeout=600)
    summary = [line for line in p.stdout.splitlines() if line.endswith("skipped") and "passed" in line]
    with capsys.disabled():
        print(f"\nandroid_demo JVM tests: {summary[-1] if summary else 'no summary'}")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    passed = int(summary[-1].split()[0])
    # 12 golden cases x 4 per-case test factories (payload bytes, decisions, parsed responses, live server) + 16 others
    assert passed >= 4 * len(golden["cases"]) + 10, summary


def test_kotlin_core_junit_against_a_federated_client(sfl_models, sfl_run, tmp_path, capsys):
    """The same JUnit suite on a federated export: one client's front ends (client 1), its explicit backend."""
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
