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
    with pytest.raises(TfbitmetaError, match="no server to fetch one converted on demand") as e:
        rt.choose((2, 4))
    assert e.value.param == "server"


def test_sha256_mismatch_is_refused(models, digit):
    f = models / "front_4_exit3.tflite"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["classify", str(digit[0]), "--models", str(models), "--bits", "4"])
    assert r.exit_code == 1 and "sha256" in r.output and "Traceback" not in r.output


def test_classify_with_server_up_matches_the_files(server, models, digit):
    # threshold 1 (above any int8 softmax probability): always ask the server, whatever the manifest recommends
    r = classify(digit[0], "--models", models, "--bits", "4", "--threshold", "1", "--server", server[0], "--json")
    a = json.loads(r.output)
    front = run_tflite(models / "front_4_exit3.tflite", digit[1][None])
    probs = run_tflite(models / "backend_4_split3.tflite", front["features"])["probs"][0]
    assert a["decision"] == "server" and a["fell_back"] and a["offline_reason"] is None
    np.testing.assert_allclose(a["exit_probs"], front["exit_probs"][0], atol=1e-6)
    np.testing.assert_allclose(a["server_probs"], probs, atol=1e-6)
    assert a["label"] == a["server_label"] == str(int(np.argmax(probs)))
    human = classify(digit[0], "--models", models, "--bits", "4", "--threshold", "1", "--server", server[0]).output
    assert "via server" in human and "fell back: yes" in human and "latency" in human


def test_server_down_gives_the_local_answer_marked_offline(models, digit):
    a = json.loads(classify(digit[0], "--models", models, "--bits", "8", "--threshold", "1", "--server", f"http://127.0.0.1:{free_port()}",
                            "--json").output)
    assert a["decision"] == "offline" and "unreachable" in a["offline_reason"]
    assert a["label"] == a["local_label"] and a["server_label"] is None
    assert "OFFLINE" in classify(digit[0], "--models", models, "--threshold", "1", "--server", f"http://127.0.0.1:{free_port()}").output


def test_slow_server_times_out_to_offline(models, digit):
    with socket.socket() as s:  # accepts connections, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        t0 = time.monotonic()
        a = json.loads(classify(digit[0], "--models", models, "--bits", "4", "--timeout", "0.5", "--threshold", "1",
                                "--server", f"http://127.0.0.1:{s.getsockname()[1]}", "--json").output)
    assert a["decision"] == "offline" and "within 0.5 s" in a["offline_reason"]
    assert time.monotonic() - t0 < 10


def test_confident_early_exit_does_not_ask_the_server(models, digit):
    a = json.loads(classify(digit[0], "--models", models, "--bits", "4", "--threshold", "0",
                            "--server", f"http://127.0.0.1:{free_port()}", "--json").output)
    assert a["decision"] == "early_exit" and not a["fell_back"] and "server" not in a["latency_ms"]


def test_missing_bitwidth_is_fetched_verified_and_cached(server, models, digit):
    a = json.loads(classify(digit[0], "--models", models, "--bits", "2/4", "--threshold", "1", "--server", server[0], "--json").output)
    assert a["bits"] == "w2a4" and a["decision"] == "server"
    cached = models / ".device-cache" / "w2a4_exit3.tflite"
    assert cached.is_file()
    # later, offline: the cached front end is used
    b = json.loads(classify(digit[0], "--models", models, "--bits", "2/4", "--threshold", "1", "--server", f"http://127.0.0.1:{free_port()}",
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
        out = classify(digit[0], "--models", models, "--bits", "4", "--threshold", "1", "--server", f"http://127.0.0.1:{port}").output
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
    # the first 2 test images, plus per bitwidth its least confident one (so there is a fallback case to test)
    n_images = len({c["image"] for c in golden["cases"]})
    assert 2 <= n_images <= 4 and len(golden["cases"]) == 2 * n_images
    assert {c["bits"] for c in golden["cases"]} == {"4", "fp"}
    assert any(c["fallback"] for c in golden["cases"])
    rt = DeviceRuntime(exported[0])
    for c in golden["cases"]:
        png = (tmp_path / "g" / c["image"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == c["image_sha256"]
        from tfbitmeta.device.image import load_pixels
        from tfbitmeta.quant.bitwidth import parse_config

        entry, path = rt.choose(parse_config(c["bits"]))
        out = rt.load(entry, path)(image=load_pixels(tmp_path / "g" / c["image"], rt.manifest)[None])
        np.testing.assert_allclose(out["exit_probs"][0], c["exit_probs"], atol=1e-6)
        req = (tmp_path / "g" / c["request"]).read_bytes()  # what the device sends: a-bit codes packed
        req_int8 = (tmp_path / "g" / c["request_int8"]).read_bytes()
        assert rt.request_bytes(entry, out["features"]) == req
        assert rt.request_bytes(entry, out["features"], packed=False) == req_int8
        feat = np.frombuffer((tmp_path / "g" / c["features"]).read_bytes(), "<f4").reshape(out["features"].shape)
        np.testing.assert_array_equal(feat, out["features"])  # what the Android JVM tests encode
        assert rt.request_bytes(entry, feat) == req
        body = json.loads(req)["inputs"]["features"]
        assert body["dtype"] == ("int8" if c["bits"] == "4" else "float32") and len(base64.b64decode(body["b64"])) > 0
        assert body.get("bits") == (4 if c["bits"] == "4" else None) == c["packed_bits"]
        resp = json.loads((tmp_path / "g" / c["response"]).read_bytes())
        backend = run_tflite(exported[0] / f"{c['backend']}.tflite", out["features"])["probs"][0]
        np.testing.assert_allclose(resp["outputs"][0], backend, atol=1e-6)
        assert c["fallback"] == (max(c["exit_probs"]) < c["exit_threshold"])


# -- a hostile server ------------------------------------------------------------------------------------
class FakeServer:
    """A raw-socket HTTP server on 127.0.0.1: ``handler(request_head, sock)`` writes whatever it likes."""

    def __init__(self, handler):
        import threading

        self.handler, self.sock = handler, socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.handler(head.decode(), conn)
                except OSError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self.url

    def __exit__(self, *exc):
        self.sock.close()


def answer(body: bytes, status: str = "200 OK", headers: str = ""):
    def handler(head, conn):
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}"
                     f"Connection: close\r\n\r\n".encode() + body)
    return handler


VALID = json.dumps({"outputs": [[0.9] + [0.1 / 9] * 9]}).encode()


def test_timeout_is_a_deadline_for_a_trickling_server(models, digit):
    def trickle(head, conn):
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(VALID)}\r\n\r\n".encode())
        for i in range(len(VALID)):
            conn.sendall(VALID[i:i + 1])
            time.sleep(0.1)

    with FakeServer(trickle) as url:
        t0 = time.monotonic()
        a = json.loads(classify(digit[0], "--models", models, "--bits", "4", "--timeout", "1", "--threshold", "1",
                                "--server", url, "--json").output)
        took = time.monotonic() - t0
    assert a["decision"] == "offline" and "within 1.0 s" in a["offline_reason"], a["offline_reason"]
    assert a["latency_ms"]["server"] < 1600, a["latency_ms"]
    assert took < 15


HOSTILE = [
    ("nested 100000 deep", b'{"outputs":' + b"[" * 100000 + b"]" * 100000 + b"}"),
    ("nested 1000 deep", b'{"outputs":' + b"[" * 1000 + b"]" * 1000 + b"}"),
    ("negative", json.dumps({"outputs": [[-0.5, 1.5] + [0.0] * 8]}).encode()),
    ("huge", json.dumps({"outputs": [[1e30] + [0.0] * 9]}).encode()),
    ("not summing to 1", json.dumps({"outputs": [[0.5] * 10]}).encode()),
    ("wrong count", json.dumps({"outputs": [[1.0]]}).encode()),
    ("two rows", json.dumps({"outputs": [[0.1] * 10, [0.1] * 10]}).encode()),
    ("strings", json.dumps({"outputs": [["0.1"] * 10]}).encode()),
    ("booleans", json.dumps({"outputs": [[True] + [False] * 9]}).encode()),
    ("not an object", b"[1, 2, 3]"),
    ("large answer", b'{"outputs": [[' + b" " * (3 << 20) + b"0.9" + b",0.0111111111" * 9 + b"]]}"),
]


@pytest.mark.parametrize("what,body", HOSTILE, ids=[w for w, _ in HOSTILE])
def test_impossible_or_hostile_answers_are_offline(models, digit, what, body):
    with FakeServer(answer(body)) as url:
        r = CliRunner().invoke(main, ["classify", str(digit[0]), "--models", str(models), "--bits", "4", "--threshold",
                                      "1", "--server", url, "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output, (what, r.output[-2000:])
    a = json.loads(r.output)
    assert a["decision"] == "offline" and a["offline_reason"].startswith("unusable server response"), (what, a)
    assert a["label"] == a["local_label"] and a["server_probs"] is None


def test_a_valid_answer_from_the_fake_server_is_accepted(models, digit):
    """The checks above refuse nonsense, not answers: the same fake server with good probabilities is used."""
    with FakeServer(answer(VALID)) as url:
        a = json.loads(classify(digit[0], "--models", models, "--bits", "4", "--threshold", "1", "--server", url,
                                "--json").output)
    assert a["decision"] == "server" and a["label"] == "0" and abs(a["confidence"] - 0.9) < 1e-9


def test_a_huge_answer_is_not_read(models, digit):
    import psutil

    def huge(head, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n{\"outputs\":[[")
        try:
            for _ in range(200):
                conn.sendall(b"0," * 500_000)
        except OSError:
            pass

    rss0 = psutil.Process().memory_info().rss
    with FakeServer(huge) as url:
        rt = DeviceRuntime(models, url, timeout_s=30)
        a = rt.classify(digit[1], (4, 4), threshold=1.0)
    assert a.decision == "offline" and "limit" in a.offline_reason
    assert psutil.Process().memory_info().rss - rss0 < 100 << 20


def test_a_poisoned_front_end_is_never_cached(server, models, digit, exported):
    """The server's sha256 header and entry agree with the bytes, but the bytes are not a front end (junk, or a
    backend): refused, nothing cached, and the next run with an honest server works."""
    import hashlib

    real_entry = next(f for f in exported[1]["files"] if f["path"] == "front_4_exit3.tflite")
    for content in (b"junk" * 100, (exported[0] / "backend_4_split3.tflite").read_bytes()):
        digest = hashlib.sha256(content).hexdigest()
        entry = {**real_entry, "bits": {"w": 2, "a": 4, "name": "w2a4"}, "sha256": digest, "path": "front_w2a4_exit3.tflite"}

        def poisoned(head, conn, entry=entry, content=content, digest=digest):
            body = json.dumps(entry).encode() if ".json " in head.split("\r\n")[0] else content
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nX-Sha256: {digest}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)

        with FakeServer(poisoned) as url:
            r = CliRunner().invoke(main, ["classify", str(digit[0]), "--models", str(models), "--bits", "2/4",
                                          "--server", url])
        assert r.exit_code == 1 and "Traceback" not in r.output and ("not a valid TFLite model" in r.output or
                                                                      "expected one input 'image'" in r.output), r.output
        assert not list((models / ".device-cache").glob("*")) if (models / ".device-cache").exists() else True
    a = json.loads(classify(digit[0], "--models", models, "--bits", "2/4", "--server", server[0], "--json").output)
    assert a["bits"] == "w2a4"
    # a cache entry that went bad on disk is removed and fetched again, not a crash on every run
    cached = models / ".device-cache" / "w2a4_exit3.tflite"
    cached.write_bytes(b"junk")
    b = json.loads(classify(digit[0], "--models", models, "--bits", "2/4", "--server", server[0], "--json").output)
    assert b["exit_probs"] == a["exit_probs"] and cached.read_bytes() != b"junk"
