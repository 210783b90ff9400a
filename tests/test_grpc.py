"""TF Serving's gRPC PredictionService, called with TF Serving's own client stubs (tensorflow-serving-api): parity
with REST and the backend file, the int8 and packed k-bit forms, the token as call metadata, the same validation;
packed k-bit REST payloads and the byte counts the latency model uses."""
import base64
import contextlib
import json

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from conftest import free_port
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfbitmeta.export.convert import run_tflite
from tfbitmeta.serve.config import ServeConfig
from tfbitmeta.serve.payload import encode_request, pack_codes, quantize, request_bytes_for, unpack_codes

TOKEN = "grpc-token-0123456789abcdef"


@contextlib.contextmanager
def grpc_server(exported, **kw):
    from tfbitmeta.serve.app import create_app
    from tfbitmeta.serve.runner import BackgroundServer

    cfg = ServeConfig(models=exported[0], port=free_port(), grpc_port=free_port(), **kw)
    app = create_app(cfg)
    with BackgroundServer(app, cfg) as url:
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as channel:
            yield url, prediction_service_pb2_grpc.PredictionServiceStub(channel), app


@pytest.fixture(scope="module")
def setup(exported):
    with grpc_server(exported, token=TOKEN, max_body_bytes=1 << 20) as s:
        yield s


def features(exported, bits: str, n: int = 8):
    shape = exported[1]["input"]["shape"][1:]
    pixels = np.random.default_rng(1).integers(0, 256, (n, *shape)).astype(np.float32)
    return run_tflite(exported[0] / f"front_{bits}_exit3.tflite", pixels)["features"]


def request(name, **inputs):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.model_spec.signature_name = "serving_default"
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return req


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def test_grpc_predict_matches_the_backend_in_float_int8_and_packed_forms(setup, exported):
    url, stub, app = setup
    for bits in ("2", "4", "8", "fp"):
        model = f"backend_{bits}_split3"
        spec = app.state.store.backends[model].spec
        f = features(exported, bits)
        direct = run_tflite(exported[0] / f"{model}.tflite", f)["probs"]
        forms = {"float32": request(model, features=f)}
        if spec.qdtype:
            q = quantize(f, spec.scale, spec.zero_point)
            forms["int8"] = request(model, features=q, scale=np.float32(spec.scale),
                                    zero_point=np.int32(spec.zero_point))
            if spec.code_bits:
                rows = [pack_codes(r.astype(np.int32) - spec.zero_point, spec.code_bits) for r in q]
                forms["packed"] = request(model, features=np.array(rows, dtype=object), bits=np.int32(spec.code_bits),
                                          scale=np.float32(spec.scale), zero_point=np.int32(spec.zero_point))
                assert len(rows[0]) * 8 == q[0].size * spec.code_bits
        for form, req in forms.items():
            resp = stub.Predict(req, timeout=30, metadata=AUTH)
            got = tf.make_ndarray(resp.outputs["probs"])
            np.testing.assert_allclose(got, direct, atol=1e-6, err_msg=f"{bits} {form}")
            assert resp.model_spec.name == model
        rest = httpx.post(f"{url}/v1/models/{model}:predict", content=encode_request(f, spec),
                          headers={"Authorization": f"Bearer {TOKEN}"}).json()["outputs"]
        np.testing.assert_allclose(rest, direct, atol=1e-6)


def test_grpc_token_and_validation_use_status_codes(setup, exported):
    _, stub, app = setup
    model = "backend_4_split3"
    spec = app.state.store.backends[model].spec
    f = features(exported, "4", 2)
    cases = [
        (request(model, features=f), (), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
        (request(model, features=f), (("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED, "wrong"),
        (request("backend_3_split3", features=f), AUTH, grpc.StatusCode.NOT_FOUND, "unknown model"),
        (request(model, features=f[:, :2]), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "wrong shape"),
        (request(model, pixels=f), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
        (request(model, features=np.full_like(f, np.nan)), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (request(model, features=f.astype(np.float64)), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "unsupported dtype"),
        (request(model, features=quantize(f, spec.scale, spec.zero_point)), AUTH, grpc.StatusCode.INVALID_ARGUMENT,
         "need numeric 'scale'"),
        (request(model, features=quantize(f, spec.scale, spec.zero_point), scale=np.float32(spec.scale * 2),
                 zero_point=np.int32(spec.zero_point)), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "differs"),
        (request(model, features=np.array([b"\x00"] * 2, dtype=object), bits=np.int32(2), scale=np.float32(spec.scale),
                 zero_point=np.int32(spec.zero_point)), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "packed codes hold"),
        (request(model, features=np.zeros((5000, *spec.shape), np.float32)), AUTH,
         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # 8 MB > the 1 MB body limit
    ]
    sig = request(model, features=f)
    sig.model_spec.signature_name = "other"
    cases.append((sig, AUTH, grpc.StatusCode.INVALID_ARGUMENT, "unknown signature_name"))
    for req, md, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(req, timeout=30, metadata=md)
        assert e.value.code() == code and text in e.value.details(), (code, e.value.details())
        ok = stub.Predict(request(model, features=f), timeout=30, metadata=AUTH)  # and it keeps working
        assert tf.make_ndarray(ok.outputs["probs"]).shape == (2, 10)


def test_grpc_floor_is_a_constant_after_the_token_and_only_with_the_floor_flag(setup, exported):
    """The load benchmark's gRPC floor (c0): model __floor__ answers a constant, token still checked; without
    ServeConfig.floor_endpoint the name is an unknown model like any other (the servicer, called as grpc.aio does)."""
    from tfbitmeta.serve.grpc_service import FLOOR_MODEL, PredictionService

    class Aborted(Exception):
        pass

    class Context:
        def __init__(self, metadata=()):
            self.metadata = metadata

        def invocation_metadata(self):
            return self.metadata

        async def abort(self, code, message):
            raise Aborted(code)

    def call(service, metadata):  # these paths never wait: drive the coroutine by hand, no second event loop
        coro = service.Predict(request(FLOOR_MODEL, features=features(exported, "fp", 1)), Context(metadata))
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        except Aborted as e:
            return e.args[0]
        raise AssertionError("the floor or the refusal waited for something")

    _, stub, app = setup
    without, floor = (PredictionService(app.state.models, TOKEN, floor=f) for f in (False, True))
    assert call(without, AUTH) == grpc.StatusCode.NOT_FOUND
    assert call(floor, ()) == grpc.StatusCode.UNAUTHENTICATED
    probs = tf.make_ndarray(call(floor, AUTH).outputs["probs"])
    np.testing.assert_array_equal(probs, np.full((1, 10), 0.1, np.float32))
    with pytest.raises(grpc.RpcError) as e:  # the served PredictionService (no floor flag) has no such model
        stub.Predict(request(FLOOR_MODEL, features=features(exported, "fp", 1)), timeout=10, metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_and_rest_batch_concurrent_requests(exported):
    import threading

    with grpc_server(exported, max_delay_ms=300, batch_idle_ms=300) as (url, stub, app):
        f = features(exported, "4", 16)
        out, barrier = {}, threading.Barrier(16)

        def one(i):
            barrier.wait()
            if i % 2:
                out[i] = tf.make_ndarray(stub.Predict(request("backend_4_split3", features=f[i:i + 1]), timeout=30)
                                         .outputs["probs"])[0]
            else:
                out[i] = np.array(httpx.post(f"{url}/v1/models/backend_4_split3:predict",
                                             json={"inputs": f[i:i + 1].tolist()}, timeout=30).json()["outputs"][0])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        direct = run_tflite(exported[0] / "backend_4_split3.tflite", f)["probs"]
        np.testing.assert_allclose(np.stack([out[i] for i in range(16)]), direct, atol=1e-6)
        calls = app.state.batchers["backend_4_split3"].calls + app.state.grpc.models.batchers["backend_4_split3"].calls
        assert calls <= 6, "16 concurrent requests (8 REST, 8 gRPC) should share a few backend calls"


def test_packed_rest_payload_is_k_bits_per_value_and_exact(server, exported):
    url, app = server
    for bits, k in (("2", 2), ("4", 4)):
        model = f"backend_{bits}_split3"
        spec = app.state.store.backends[model].spec
        assert spec.code_bits == k
        f = features(exported, bits)
        packed, unpacked = encode_request(f, spec), encode_request(f, spec, packed=False)
        t_packed = base64.b64decode(json.loads(packed)["inputs"]["features"]["b64"])
        t_int8 = base64.b64decode(json.loads(unpacked)["inputs"]["features"]["b64"])
        assert len(t_int8) == f.size and len(t_packed) * 8 == f.size * k  # 2-bit: 4x fewer tensor bytes
        direct = run_tflite(exported[0] / f"{model}.tflite", f)["probs"]
        for body in (packed, unpacked):
            got = httpx.post(f"{url}/v1/models/{model}:predict", content=body).json()["outputs"]
            np.testing.assert_allclose(got, direct, atol=1e-6)
    codes = np.random.default_rng(0).integers(0, 8, 1001)
    assert (unpack_codes(pack_codes(codes, 3), 1001, 3) == codes).all()
    n = 5 * 5 * 16
    # the JSON envelope (~140 bytes) dilutes the 4x of the tensor bytes at this size: 275 vs 666 vs 2274 bytes
    assert request_bytes_for(n, 2) < request_bytes_for(n, 8) / 2 < request_bytes_for(n, 32) / 6


def test_latency_model_uses_the_request_bytes():
    from tfbitmeta.federated.latency import LatencyModel

    m = LatencyModel(rtt_ms=0, server_gflops=1e12)
    uplink = {b: m.mean_ms(0, 0, 1.0, 400, b, 0) for b in (2, 8, 32)}
    for b, ms in uplink.items():
        assert ms == pytest.approx(8 * request_bytes_for(400, b) / (m.uplink_mbps * 1e6) * 1e3)
    assert uplink[2] < uplink[8] < uplink[32]
