"""The fallback server, started for real (uvicorn on a free loopback port): parity with the backend files,
on-demand front ends, dynamic batching, overload/timeout, the bad-input corpus, the token rule."""
import base64
import contextlib
import hashlib
import json
import socket
import threading

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import free_port

from tfbitmeta.cli import main
from tfbitmeta.export.convert import run_tflite
from tfbitmeta.serve.config import ServeConfig, is_loopback
from tfbitmeta.serve.payload import MAX_ROWS, encode_request

MODEL = "backend_4_split3"
PREDICT = f"/v1/models/{MODEL}:predict"


@pytest.fixture(scope="module")
def digits_pixels(tiny_run):
    from tfbitmeta.data import datasets
    from tfbitmeta.runs import RunDir

    run = RunDir(tiny_run)
    raw = datasets.load("digits").x_test[:64]
    return run.normalization().pixels(raw).numpy(), run.normalization().apply(raw).numpy()


@pytest.fixture(scope="module")
def features4(exported, digits_pixels):
    """Features of the 4-bit front-end file for 64 test digits (what a device sends)."""
    return run_tflite(exported[0] / "front_4_exit3.tflite", digits_pixels[0])["features"]


@pytest.fixture(scope="module")
def spec4(server):
    return server[1].state.store.backends[MODEL].spec


@contextlib.contextmanager
def extra_server(exported, **kw):
    from tfbitmeta.serve.app import create_app
    from tfbitmeta.serve.runner import BackgroundServer

    cfg = ServeConfig(models=exported[0], port=free_port(), **kw)
    app = create_app(cfg)
    with BackgroundServer(app, cfg) as url:
        yield url, app


def test_health_manifest_and_files_with_sha256(server, exported):
    url, _ = server
    out, manifest, _ = exported
    served = set(httpx.get(f"{url}/healthz").json()["models"])  # + any converted on demand by earlier tests
    assert served >= {f"backend_{b}_split3" for b in ("2", "4", "8", "fp")}
    assert httpx.get(f"{url}/manifest.json").json() == manifest
    for f in manifest["files"]:
        r = httpx.get(f"{url}/models/{f['path']}")
        assert r.status_code == 200 and r.content == (out / f["path"]).read_bytes()
        assert r.headers["x-sha256"] == f["sha256"] == hashlib.sha256(r.content).hexdigest()
    status = httpx.get(f"{url}/v1/models/{MODEL}").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE" and status["metadata"]["bits"]["name"] == "4"


def test_predict_parity_with_the_backend_in_every_wire_format(server, exported, features4, spec4):
    url, app = server
    direct = run_tflite(exported[0] / f"{MODEL}.tflite", features4)["probs"]
    np.testing.assert_allclose(app.state.store.backends[MODEL].predict(features4), direct, atol=1e-6)
    q = np.round(features4 / spec4.scale + spec4.zero_point).astype(np.int8)
    assert spec4.qdtype == "int8"
    np.testing.assert_allclose((q.astype(np.float32) - spec4.zero_point) * np.float32(spec4.scale), features4, atol=1e-6)
    bodies = {
        "columnar floats": json.dumps({"signature_name": "serving_default", "inputs": features4.tolist()}),
        "row floats": json.dumps({"instances": [{"features": f.tolist()} for f in features4]}),
        "int8 base64 (device format)": encode_request(features4, spec4),
        "int8 values": json.dumps({"inputs": {"features": {"values": q.tolist(), "dtype": "int8", "scale": spec4.scale,
                                                           "zero_point": spec4.zero_point}}}),
        "float32 base64 rows": json.dumps({"instances": [{"b64": base64.b64encode(f.astype("<f4").tobytes()).decode(),
                                                          "shape": list(f.shape)} for f in features4]}),
    }
    for what, body in bodies.items():
        r = httpx.post(url + PREDICT, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, (what, r.text)
        got = np.array(r.json()["outputs" if '"inputs"' in str(body) else "predictions"])
        np.testing.assert_allclose(got, direct, atol=1e-6, err_msg=what)


def test_concurrent_requests_are_batched(exported, features4):
    with extra_server(exported, max_delay_ms=200) as (url, app):
        direct = app.state.store.backends[MODEL].predict(features4[:16])
        results, barrier = {}, threading.Barrier(16)

        def one(i):
            barrier.wait()
            r = httpx.post(url + PREDICT, json={"instances": [features4[i].tolist()]}, timeout=10)
            results[i] = (r.status_code, r.json())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for i in range(16):
            assert results[i][0] == 200
            np.testing.assert_allclose(results[i][1]["predictions"][0], direct[i], atol=1e-6)
        assert app.state.batchers[MODEL].calls <= 4, "16 concurrent requests should share a few backend calls"


def test_overload_answers_503_and_timeout_504(exported, features4):
    with extra_server(exported, max_batch=64, max_queue=64, max_delay_ms=1500) as (url, _):
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(url + PREDICT, json={"inputs": features4[:40].tolist()},
                                                                       timeout=10)))
        t.start()
        import time
        time.sleep(0.5)  # the first 40 rows wait for company (max delay 1.5 s); 40 more do not fit in the queue of 64
        r = httpx.post(url + PREDICT, json={"inputs": features4[:40].tolist()})
        assert r.status_code == 503 and r.json()["code"] == "overloaded" and r.headers["retry-after"] == "1"
        t.join()
        assert first["r"].status_code == 200 and len(first["r"].json()["outputs"]) == 40
    with extra_server(exported, max_delay_ms=1000, request_timeout_s=0.2) as (url, _):
        r = httpx.post(url + PREDICT, json={"inputs": features4[:1].tolist()})
        assert r.status_code == 504 and "no answer within 0.2 s" in r.json()["error"]


def test_slow_body_gets_408(exported):
    with extra_server(exported, body_timeout_s=0.3) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
            raw = b""
            while b"}" not in raw and (chunk := s.recv(4096)):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["code"] == "body_timeout"


def _corpus(shape, scale, zp):
    n = int(np.prod(shape))
    zeros = np.zeros((1, *shape)).tolist()
    int8 = {"values": np.zeros((1, *shape), int).tolist(), "dtype": "int8", "scale": scale, "zero_point": zp}
    b64 = lambda k, **kw: {"b64": base64.b64encode(bytes(k)).decode(), **kw}  # noqa: E731
    inf = base64.b64encode(np.full((1, *shape), np.inf, "<f4").tobytes()).decode()
    P = PREDICT
    return [
        ("invalid json", "POST", P, b"{bad", 400, "not valid JSON"),
        ("empty body", "POST", P, b"", 400, "not valid JSON"),
        ("json array", "POST", P, [1, 2], 400, "JSON object"),
        ("no inputs", "POST", P, {}, 400, "exactly one of"),
        ("both formats", "POST", P, {"inputs": zeros, "instances": zeros}, 400, "exactly one of"),
        ("unknown field", "POST", P, {"inputs": zeros, "foo": 1}, 400, "unknown field"),
        ("bad signature", "POST", P, {"signature_name": "x", "inputs": zeros}, 400, "unknown signature_name"),
        ("wrong shape", "POST", P, {"inputs": np.zeros((1, *shape[:-1], shape[-1] + 1)).tolist()}, 400, "wrong shape"),
        ("missing batch dim", "POST", P, {"inputs": zeros[0]}, 400, "wrong shape"),
        ("empty batch", "POST", P, {"inputs": []}, 400, "wrong shape"),
        ("empty instances", "POST", P, {"instances": []}, 400, "non-empty list"),
        ("instance with batch dim", "POST", P, {"instances": [zeros]}, 400, "wrong shape"),
        ("ragged", "POST", P, {"inputs": [[1, 2], [3]]}, 400, "ragged"),
        ("strings", "POST", P, {"inputs": [["a", "b"]]}, 400, "must be numbers"),
        ("booleans", "POST", P, {"inputs": [[True, False]]}, 400, "must be numbers"),
        ("NaN literal", "POST", P, b'{"inputs": [[NaN]]}', 400, "not valid JSON"),
        ("Inf in float32 b64", "POST", P, {"inputs": {"b64": inf, "shape": [1, *shape]}}, 400, "NaN or Inf"),
        ("overflow to inf", "POST", P, {"inputs": np.full((1, *shape), 1e39).tolist()}, 400, "NaN or Inf"),
        ("float64 dtype", "POST", P, {"inputs": {**int8, "dtype": "float64"}}, 400, "unsupported dtype"),
        ("int8 without scale", "POST", P, {"inputs": {k: v for k, v in int8.items() if k != "scale"}}, 400, "need numeric 'scale'"),
        ("int8 wrong scale", "POST", P, {"inputs": {**int8, "scale": scale * 2}}, 400, "differs from the manifest"),
        ("int8 wrong zero point", "POST", P, {"inputs": {**int8, "zero_point": zp + 1}}, 400, "differs from the manifest"),
        ("uint8 for an int8 model", "POST", P, {"inputs": {**int8, "dtype": "uint8"}}, 400, "must be int8"),
        ("int8 out of range", "POST", P, {"inputs": {**int8, "values": np.full((1, *shape), 300).tolist()}}, 400, "integers in [-128, 127]"),
        ("bad base64", "POST", P, {"inputs": {"b64": "!!!not base64", "dtype": "int8", "shape": [1, *shape]}}, 400, "not valid base64"),
        ("b64 not a string", "POST", P, {"inputs": {"b64": 5, "shape": [1, *shape]}}, 400, "base64 string"),
        ("b64 without shape", "POST", P, {"inputs": b64(4 * n)}, 400, "needs its 'shape'"),
        ("b64 byte count", "POST", P, {"inputs": b64(4 * n - 4, shape=[1, *shape])}, 400, "bytes but shape"),
        ("negative dims", "POST", P, {"inputs": b64(4 * n, shape=[-1, *shape])}, 400, "negative, huge"),
        ("huge dims", "POST", P, {"inputs": b64(4 * n, shape=[1 << 30, *shape])}, 400, "negative, huge"),
        ("shape not ints", "POST", P, {"inputs": b64(4 * n, shape=["1", *shape])}, 400, "list of integers"),
        ("b64 and values", "POST", P, {"inputs": {**int8, "b64": ""}}, 400, "exactly one of 'b64' or 'values'"),
        ("unknown input name", "POST", P, {"inputs": {"pixels": zeros}}, 400, "unknown tensor field"),
        ("tensor is a string", "POST", P, {"inputs": "zeros"}, 400, "nested list of numbers or an object"),
        ("too many rows", "POST", P, {"instances": [0] * (MAX_ROWS + 1)}, 400, f"{MAX_ROWS}-row limit"),
        ("oversize body", "POST", P, b"[" + b"0," * 600_000 + b"0]", 413, "byte limit"),
        ("oversize chunked body", "POST", P, iter([b"[" + b"0," * 1000] * 600 + [b"0]"]), 413, "byte limit"),
        ("unknown model", "POST", "/v1/models/backend_3_split3:predict", {"inputs": zeros}, 404, "unknown model"),
        ("predict with GET", "GET", P, None, 405, "predict takes POST"),
        ("unknown route", "GET", "/v2/whatever", None, 404, "no such endpoint"),
        ("file not in manifest", "GET", "/models/run.json", None, 404, "unknown file"),
        ("bitwidth not trained", "GET", "/v1/frontends/svhn_cnn/w3a3/exit3.tflite", None, 404, "not in the model's candidate set"),
        ("invalid pair", "GET", "/v1/frontends/svhn_cnn/wfpa4/exit3.tflite", None, 404, "not in the model's candidate set"),
        ("bad bitwidth syntax", "GET", "/v1/frontends/svhn_cnn/x4/exit3.tflite", None, 404, "bad bitwidth"),
        ("bitwidth out of range", "GET", "/v1/frontends/svhn_cnn/w99a4/exit3.tflite", None, 404, "bad bitwidth '99'"),
        ("unknown family", "GET", "/v1/frontends/resnet/w4a4/exit3.tflite", None, 404, "unknown model family"),
        ("unknown exit", "GET", "/v1/frontends/svhn_cnn/w4a4/exit9.tflite", None, 404, "exit 9 does not exist"),
        ("bad front-end file", "GET", "/v1/frontends/svhn_cnn/w4a4/exit3.exe", None, 404, "bad front-end file"),
    ]


CORPUS_SIZE = len(_corpus((5, 5, 16), 0.1, -128))


@pytest.mark.parametrize("case", range(CORPUS_SIZE))
def test_bad_request_gets_a_clear_4xx_and_the_server_keeps_working(server, spec4, features4, case):
    url, _ = server
    name, method, path, body, status, text = _corpus(spec4.shape, spec4.scale, spec4.zero_point)[case]
    kw = {} if body is None else {"json": body} if isinstance(body, (dict, list)) else {"content": body}
    r = httpx.request(method, url + path, timeout=120, **kw)
    assert r.status_code == status, (name, r.text)
    err = r.json()
    assert err["status"] == status and text in err["error"], (name, err)
    ok = httpx.post(url + PREDICT, content=encode_request(features4[:2], spec4))
    assert ok.status_code == 200 and len(ok.json()["outputs"]) == 2


def test_corpus_is_large_enough():
    assert CORPUS_SIZE >= 30


def test_unparseable_http_gets_a_json_400(server):
    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GARBAGE / NOT-HTTP\r\n\r\n")
        raw = b""
        while chunk := s.recv(4096):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["code"] == "invalid_http"


def test_on_demand_frontend_matches_its_sha256_and_keras(server, tiny_run, digits_pixels):
    from tfbitmeta.export.graph import aligned_biases
    from tfbitmeta.runs import RunDir
    from tfbitmeta.quant import bits_tensor

    url, app = server
    route = f"{url}/v1/frontends/svhn_cnn/w4a8/exit3"
    r = httpx.get(route + ".tflite", timeout=300)
    assert r.status_code == 200, r.text
    entry = httpx.get(route + ".json").json()
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-sha256"] == entry["sha256"]
    assert entry["bits"] == {"w": 4, "a": 8, "name": "w4a8"}
    again = httpx.get(route + ".tflite")
    assert again.content == r.content and again.headers["x-converted-seconds"] == "0"  # cached on disk

    pixels, x = digits_pixels
    got = run_tflite(r.content, pixels)
    run = RunDir(tiny_run)
    bm = run.load_model()
    with aligned_biases(bm.keras, (4, 8), run.normalization()):
        ref = bm.keras([x, bits_tensor((4, 8), len(x))], training=False)
        exit_ref, logits_ref = ref["exit3"].numpy(), ref["logits"].numpy()
    exit_ref = np.exp(exit_ref - exit_ref.max(-1, keepdims=True))
    exit_ref /= exit_ref.sum(-1, keepdims=True)
    assert np.abs(got["exit_probs"] - exit_ref).max() < 0.05
    # its backend is served too: device features -> server -> the full Keras model's answer
    p = httpx.post(f"{url}/v1/models/backend_w4a8_split3:predict", json={"inputs": got["features"].tolist()})
    assert p.status_code == 200, p.text
    assert np.mean(np.argmax(p.json()["outputs"], -1) == logits_ref.argmax(-1)) >= 0.95


def test_token_rule(exported, features4, spec4):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("8.8.8.8")
    with pytest.raises(Exception, match="set a bearer token"):
        ServeConfig(models=exported[0], host="0.0.0.0").check_security()
    ServeConfig(models=exported[0], host="0.0.0.0", token="x" * 32).check_security()
    r = CliRunner().invoke(main, ["serve", "--models", str(exported[0]), "--host", "0.0.0.0"], env={"TFBITMETA_TOKEN": ""})
    assert r.exit_code == 1 and "set a bearer token" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["serve", "--models", str(exported[0]), "--host", "0.0.0.0", "--token", "short"])
    assert r.exit_code == 1 and "at least 16 characters" in r.output
    token = "t0ken-" + "k" * 20
    with extra_server(exported, token=token) as (url, _):
        body = encode_request(features4[:1], spec4)
        assert httpx.get(url + "/healthz").status_code == 200
        for headers, text in [({}, "missing bearer token"), ({"Authorization": "Bearer wrong"}, "wrong bearer token"),
                              ({"Authorization": f"Basic {token}"}, "missing bearer token")]:
            r = httpx.post(url + PREDICT, content=body, headers=headers)
            assert r.status_code == 401 and text in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/manifest.json").status_code == 401
        r = httpx.post(url + PREDICT, content=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
