"""Device runtime and `tfbitmeta classify`: front-end choice, sha256 check, early exit, fallback to a real server,
offline answers when the server is down or slow, on-demand front ends cached on the device."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import free_port

from tfbitmeta.cli import main
from tfbitmeta.device.runtime import DeviceRuntime
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export.convert import run_tflite
from tfbitmeta.serve.runner import wait_healthy


@pytest.fixture(scope="module")
def digit(tiny_run, tmp_path_factory):
    """A test digit as a PNG at the model's input size, and its pixels."""
    from PIL import Image

    from tfbitmeta.data import datasets
    from tfbitmeta.runs import RunDir

    pixels = RunDir(tiny_run).normalization().pixels(datasets.load("digits").x_test[:1]).numpy()[0]
    path = tmp_path_factory.mktemp("img") / "digit.png"
    Image.fromarray(pixels[..., 0].astype(np.uint8)).save(path)
    return path, pixels


@pytest.fixture
def models(exported, tmp_path):
    """A private copy of the exported models (the device cache is written inside)."""
    return shutil.copytree(exported[0], tmp_path / "models")


def classify(*args):
    r = CliRunner().invoke(main, ["classify", *map(str, args)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    return r


def test_choose_by_bits_and_memory_budget(models, exported):
    rt = DeviceRuntime(models)
    size = {f["path"]: f["bytes"] for f in exported[1]["files"]}
    assert rt.choose((4, 4))[0]["path"] == "front_4_exit3.tflite"
    assert rt.choose()[0]["path"] == "front_fp_exit3.tflite"
    assert rt.choose(memory_budget=size["front_8_exit3.tflite"])[0]["path"] == "front_8_exit3.tflite"
    assert rt.choose(memory_budget=size["front_8_exit3.tflite"] - 1)[0]["path"] == "front_4_exit3.tflite"
    with pytest.raises(TfbitmetaError, match="no front end fits"):
        rt.choose(memory_budget=100)
    with pytest.raises(TfbitmetaError, match="pass --server"):
        rt.choose((2, 4))


def test_sha256_mismatch_is_refused(models, digit):
    f = models / "front_4_exit3.tflite"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["classify", str(digit[0]), "--models", str(models), "--bits", "4"])
    assert r.exit_code == 1 and "sha256" in r.output and "Traceback" not in r.output


def test_classify_with_server_up_matches_the_files(server, models, digit):
    r = classify(digit[0], "--models", models, "--bits", "4", "--server", server[0], "--json")
    a = json.loads(r.output)
    front = run_tflite(models / "front_4_exit3.tflite", digit[1][None])
    probs = run_tflite(models / "backend_4_split3.tflite", front["features"])["probs"][0]
    assert a["decision"] == "server" and a["fell_back"] and a["offline_reason"] is None
    np.testing.assert_allclose(a["exit_probs"], front["exit_probs"][0], atol=1e-6)
    np.testing.assert_allclose(a["server_probs"], probs, atol=1e-6)
    assert a["label"] == a["server_label"] == str(int(np.argmax(probs)))
    human = classify(digit[0], "--models", models, "--bits", "4", "--server", server[0]).output
    assert "via server" in human and "fell back: yes" in human and "latency" in human


def test_server_down_gives_the_local_answer_marked_offline(models, digit):
    a = json.loads(classify(digit[0], "--models", models, "--bits", "8", "--server", f"http://127.0.0.1:{free_port()}",
                            "--json").output)
    assert a["decision"] == "offline" and "unreachable" in a["offline_reason"]
    assert a["label"] == a["local_label"] and a["server_label"] is None
    assert "OFFLINE" in classify(digit[0], "--models", models, "--server", f"http://127.0.0.1:{free_port()}").output


def test_slow_server_times_out_to_offline(models, digit):
    with socket.socket() as s:  # accepts connections, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        t0 = time.monotonic()
        a = json.loads(classify(digit[0], "--models", models, "--bits", "4", "--timeout", "0.5",
                                "--server", f"http://127.0.0.1:{s.getsockname()[1]}", "--json").output)
    assert a["decision"] == "offline" and "within 0.5 s" in a["offline_reason"]
    assert time.monotonic() - t0 < 10


def test_confident_early_exit_does_not_ask_the_server(models, digit):
    a = json.loads(classify(digit[0], "--models", models, "--bits", "4", "--threshold", "0",
                            "--server", f"http://127.0.0.1:{free_port()}", "--json").output)
    assert a["decision"] == "early_exit" and not a["fell_back"] and "server" not in a["latency_ms"]


def test_missing_bitwidth_is_fetched_verified_and_cached(server, models, digit):
    a = json.loads(classify(digit[0], "--models", models, "--bits", "2/4", "--server", server[0], "--json").output)
    assert a["bits"] == "w2a4" and a["decision"] == "server"
    cached = models / ".device-cache" / "w2a4_exit3.tflite"
    assert cached.is_file()
    # later, offline: the cached front end is used
    b = json.loads(classify(digit[0], "--models", models, "--bits", "2/4", "--server", f"http://127.0.0.1:{free_port()}",
                            "--json").output)
    assert b["decision"] == "offline" and b["exit_probs"] == a["exit_probs"]
    cached.write_bytes(cached.read_bytes()[:-1] + b"\0")
    r = CliRunner().invoke(main, ["classify", str(digit[0]), "--models", str(models), "--bits", "2/4"])
    assert r.exit_code == 1 and "sha256" in r.output


def test_unreadable_image_is_a_one_line_error(models, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    r = CliRunner().invoke(main, ["classify", str(bad), "--models", str(models)])
    assert r.exit_code == 1 and "cannot read image" in r.output and "Traceback" not in r.output


def test_readme_commands_serve_then_classify(models, digit):
    """`tfbitmeta serve` as a user starts it (a subprocess), then `tfbitmeta classify` against it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tfbitmeta.cli", "serve", "--models", str(models), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        out = classify(digit[0], "--models", models, "--bits", "4", "--server", f"http://127.0.0.1:{port}").output
        assert "via server" in out
    finally:
        proc.terminate()
        proc.wait(20)


def test_make_golden_vectors_are_reproducible(exported, tiny_run, tmp_path):
    """tools/make_golden.py: the request bytes re-derive from the image, the response came from a real server."""
    import base64
    import hashlib
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_golden", Path(__file__).parents[1] / "tools" / "make_golden.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    golden = tool.main(["--run", str(tiny_run), "--models", str(exported[0]), "--bits", "4,fp", "--images", "2",
                        "--out", str(tmp_path / "g")])
    assert len(golden["cases"]) == 4 and {c["bits"] for c in golden["cases"]} == {"4", "fp"}
    rt = DeviceRuntime(exported[0])
    for c in golden["cases"]:
        png = (tmp_path / "g" / c["image"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == c["image_sha256"]
        from tfbitmeta.device.image import load_pixels
        from tfbitmeta.quant.bitwidth import parse_config

        entry, path = rt.choose(parse_config(c["bits"]))
        out = rt.load(entry, path)(image=load_pixels(tmp_path / "g" / c["image"], rt.manifest)[None])
        np.testing.assert_allclose(out["exit_probs"][0], c["exit_probs"], atol=1e-6)
        req = (tmp_path / "g" / c["request"]).read_bytes()
        assert rt.request_bytes(entry, out["features"]) == req
        feat = np.frombuffer((tmp_path / "g" / c["features"]).read_bytes(), "<f4").reshape(out["features"].shape)
        np.testing.assert_array_equal(feat, out["features"])  # what the Android JVM tests encode
        assert rt.request_bytes(entry, feat) == req
        body = json.loads(req)["inputs"]["features"]
        assert body["dtype"] == ("int8" if c["bits"] == "4" else "float32") and len(base64.b64decode(body["b64"])) > 0
        resp = json.loads((tmp_path / "g" / c["response"]).read_bytes())
        backend = run_tflite(exported[0] / f"{c['backend']}.tflite", out["features"])["probs"][0]
        np.testing.assert_allclose(resp["outputs"][0], backend, atol=1e-6)
        assert c["fallback"] == (max(c["exit_probs"]) < c["exit_threshold"])
