"""TF Serving's gRPC ``tensorflow.serving.PredictionService/Predict`` beside REST, in the same process, with the
same backends, batching settings, limits and bearer token (call metadata ``authorization: Bearer <token>``).

gRPC runs in its own thread on a stock asyncio loop with its own batchers (grpc.aio on uvloop, uvicorn's loop,
measured 3x slower and logs BlockingIOError from its poller); the backends, and their lock, are shared.

Request inputs (``TensorProto``s, see docs/serving.md):
* ``features``: DT_FLOAT ``[N, *feature_shape]`` (``tensor_content`` or ``float_val``); or DT_INT8/DT_UINT8 of the
  same shape with ``scale`` (DT_FLOAT scalar) and ``zero_point`` (DT_INT32 scalar) equal to the manifest's; or
  DT_STRING ``[N]``, each string one row's codes ``q - zero_point`` packed at ``bits`` (DT_INT32 scalar) bits per
  value, with ``scale``/``zero_point``.
Response: ``outputs["probs"]`` DT_FLOAT ``[N, classes]``.  Errors are gRPC status codes with the REST message.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfbitmeta.serve.errors import ApiError
from tfbitmeta.serve.payload import DTYPES, MAX_ROWS, FeatureSpec, Packed, bad, check_quantization, dequantize
from tfbitmeta.serve.security import token_matches

log = logging.getLogger("tfbitmeta.serve")
PROTO_DTYPES = {types_pb2.DT_FLOAT: "float32", types_pb2.DT_INT8: "int8", types_pb2.DT_UINT8: "uint8"}
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
          504: grpc.StatusCode.DEADLINE_EXCEEDED}
KNOWN_INPUTS = {"scale", "zero_point", "bits"}
FLOOR_MODEL = "__floor__"  # with ServeConfig.floor_endpoint: a constant answer (the load benchmark's gRPC floor)


def _shape(t: tensor_pb2.TensorProto) -> list[int]:
    if t.tensor_shape.unknown_rank:
        raise bad("tensor shape has unknown rank", "invalid_shape")
    dims = [d.size for d in t.tensor_shape.dim]
    if len(dims) > 8 or any(d < 0 or d > 1 << 20 for d in dims):
        raise bad(f"shape {dims[:10]} has negative, huge or too many dimensions", "invalid_shape")
    return dims


def _scalar(inputs, name: str, dtype: int, field: str):
    t = inputs.get(name)
    if t is None:
        return None
    if t.dtype != dtype or _shape(t) != [] or len(getattr(t, field)) != 1:
        raise bad(f"'{name}' must be a scalar {types_pb2.DataType.Name(dtype)}", "invalid_tensor")
    return getattr(t, field)[0]


def _check_shape(arr_shape, spec: FeatureSpec) -> None:
    if len(arr_shape) < 1 or tuple(arr_shape[1:]) != spec.shape or arr_shape[0] == 0:
        raise bad(f"wrong shape {list(arr_shape)}: expected [N, {', '.join(map(str, spec.shape))}]", "invalid_shape")
    if arr_shape[0] > MAX_ROWS:
        raise bad(f"{arr_shape[0]} rows exceed the {MAX_ROWS}-row limit per request", "too_many_rows")


def features_from_request(req: predict_pb2.PredictRequest, spec: FeatureSpec) -> np.ndarray:
    """PredictRequest -> float32 features [N, *spec.shape]; ApiError 400 for anything the REST parser refuses."""
    sig = req.model_spec.signature_name or spec.signature
    if sig != spec.signature:
        raise bad(f"unknown signature_name {sig[:40]!r}: this model has {spec.signature!r}")
    inputs = req.inputs
    unknown = set(inputs) - {spec.name} - KNOWN_INPUTS
    if unknown:
        raise bad(f"unknown input(s) {sorted(unknown)[:10]}: the model has one input {spec.name!r}")
    t = inputs.get(spec.name)
    if t is None:
        raise bad(f"missing input {spec.name!r}", "missing_field")
    shape = _shape(t)
    if t.dtype == types_pb2.DT_STRING:
        return _packed(t, shape, inputs, spec)
    dtype = PROTO_DTYPES.get(t.dtype)
    if dtype is None:
        raise bad(f"unsupported dtype {types_pb2.DataType.Name(t.dtype) if t.dtype in types_pb2.DataType.values() else t.dtype}"
                  f": use DT_FLOAT, DT_INT8, DT_UINT8 or DT_STRING (packed codes)", "invalid_dtype")
    _check_shape(shape, spec)
    count = math.prod(shape)
    if t.tensor_content:
        if len(t.tensor_content) != count * DTYPES[dtype].itemsize:
            raise bad(f"tensor_content holds {len(t.tensor_content)} bytes but shape {shape} of {dtype} needs "
                      f"{count * DTYPES[dtype].itemsize}", "invalid_shape")
        arr = np.frombuffer(t.tensor_content, DTYPES[dtype]).reshape(shape)
    else:
        vals = t.float_val if dtype == "float32" else t.int_val
        if len(vals) != count:
            raise bad(f"{len(vals)} values but shape {shape} needs {count}", "invalid_shape")
        arr = np.asarray(vals, np.float32 if dtype == "float32" else np.int64).reshape(shape)
        if dtype != "float32":
            info = np.iinfo(DTYPES[dtype])
            if arr.min() < info.min or arr.max() > info.max:
                raise bad(f"{dtype} values must be integers in [{info.min}, {info.max}]", "invalid_dtype")
    if dtype == "float32":
        if not np.all(np.isfinite(arr)):
            raise bad("features contain NaN or Inf", "not_finite")
        return arr.astype(np.float32)
    if spec.qdtype is None:
        raise bad(f"this model takes float32 features, not {dtype}", "invalid_dtype")
    if dtype != spec.qdtype:
        raise bad(f"quantized features must be {spec.qdtype}, got {dtype}", "invalid_dtype")
    check_quantization(_scalar(inputs, "scale", types_pb2.DT_FLOAT, "float_val"),
                       _scalar(inputs, "zero_point", types_pb2.DT_INT32, "int_val"), spec, dtype)
    return dequantize(arr, spec)


def _packed(t, shape, inputs, spec: FeatureSpec) -> np.ndarray:
    if spec.qdtype is None:
        raise bad("packed codes need a quantized model; this one takes float32 features", "invalid_dtype")
    if len(shape) != 1 or len(t.string_val) != shape[0] or not shape[0]:
        raise bad("packed features are DT_STRING of shape [N], one string of packed codes per row", "invalid_shape")
    if shape[0] > MAX_ROWS:
        raise bad(f"{shape[0]} rows exceed the {MAX_ROWS}-row limit per request", "too_many_rows")
    bits = _scalar(inputs, "bits", types_pb2.DT_INT32, "int_val")
    if bits is None or not 1 <= bits <= 8:
        raise bad("packed features need 'bits', a DT_INT32 scalar 1-8", "invalid_bits")
    zp = _scalar(inputs, "zero_point", types_pb2.DT_INT32, "int_val")
    check_quantization(_scalar(inputs, "scale", types_pb2.DT_FLOAT, "float_val"), zp, spec, spec.qdtype)
    rows = [Packed(row, list(spec.shape), bits, zp, spec.qdtype).dequantize(spec) for row in t.string_val]
    return rows[0][None] if len(rows) == 1 else np.stack(rows)  # the REST rules and the one-lookup dequantization


def probs_proto(probs: np.ndarray) -> tensor_pb2.TensorProto:
    p = np.ascontiguousarray(probs, "<f4")
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=p.tobytes(),
                                  tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                      dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in p.shape]))


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models, token: str | None, floor: bool = False):
        self.models, self.token = models, token
        self.floor = None  # model name FLOOR_MODEL -> this constant answer, after the token check, nothing parsed
        if floor:
            self.floor = predict_pb2.PredictResponse()
            self.floor.model_spec.name = FLOOR_MODEL
            self.floor.outputs["probs"].CopyFrom(probs_proto(np.full((1, 10), 0.1, np.float32)))

    async def Predict(self, request, context):  # noqa: N802 - the gRPC method name
        try:
            if self.token is not None:
                auth = dict(context.invocation_metadata()).get("authorization")
                ok = token_matches(auth, self.token)
                if not ok:
                    raise ApiError(401, "unauthorized", "missing bearer token: send metadata 'authorization: Bearer "
                                   "<token>'" if ok is None else "wrong bearer token")
            name = request.model_spec.name
            if self.floor is not None and name == FLOOR_MODEL:
                return self.floor
            backend = self.models.backend(name)
            x = features_from_request(request, backend.spec)
            probs = await self.models.predict(name, x)
        except ApiError as e:
            await context.abort(STATUS.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), e.message)
        except (RecursionError, OverflowError, TypeError, ValueError, KeyError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"cannot interpret the request ({type(e).__name__}: {str(e)[:200]})")
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = name
        resp.model_spec.signature_name = backend.spec.signature
        resp.model_spec.version.value = 1
        resp.outputs[backend.output].CopyFrom(probs_proto(probs))
        return resp


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(cfg, models) -> grpc.aio.Server:
    """Bind and start; with several worker processes every one binds the port (SO_REUSEPORT)."""
    limit = cfg.max_body_bytes + 4096
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.so_reuseport", 1 if cfg.workers > 1 else 0)],
                             maximum_concurrent_rpcs=cfg.max_queue)
    service = PredictionService(models, cfg.token, floor=cfg.floor_endpoint)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    address = grpc_address(cfg.host, cfg.grpc_port)
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind gRPC to {address}")
    await server.start()
    log.info("gRPC PredictionService on %s", address)
    return server


class GrpcThread:
    """The gRPC server on its own event loop in a daemon thread: ``start()`` binds (or raises), ``stop()``."""

    def __init__(self, cfg, store):
        from tfbitmeta.serve.batching import Models

        self.cfg, self.models = cfg, Models(cfg, store)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="grpc", daemon=True)
        self.ready, self.error, self.server = threading.Event(), None, None

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(start_grpc_server(self.cfg, self.models))
        except Exception as e:  # noqa: BLE001 - reported by start()
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_until_complete(self.server.wait_for_termination())
        self.loop.run_until_complete(self.models.close())

    def start(self) -> "GrpcThread":
        self.thread.start()
        self.ready.wait(60)
        if self.error is not None or self.server is None:
            raise RuntimeError(f"gRPC server did not start: {self.error}")
        return self

    def stop(self) -> None:
        if self.server is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(1), self.loop).result(10)
        self.thread.join(10)
