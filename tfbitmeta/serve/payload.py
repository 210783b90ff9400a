"""The feature payload on the wire (TF Serving's REST shape), shared by the server and the device runtime.

Request: ``{"signature_name": "serving_default", "inputs": T}`` (columnar, T has shape ``[N, *feature_shape]``)
or ``{"instances": [T, ...]}`` (one T of shape ``feature_shape`` per row); T may also be wrapped as
``{"features": T}``.  A tensor T is one of
* a nested list of numbers: float32 features;
* ``{"b64": base64 of the little-endian bytes, "dtype": "float32" | "int8" | "uint8", "shape": [...]}``;
* ``{"b64": ..., "dtype": "int8" | "uint8", "shape": [...], "bits": k}``: k-bit codes ``q - zero_point`` packed at k
  bits per value (value i in bits i*k .. i*k+k-1 of the byte stream, least significant bit first), so an a-bit front
  end sends a/8 of the int8 bytes (see docs/serving.md);
* ``{"values": nested list, "dtype": ..., "shape": [...] (optional)}``;
integer dtypes carry the quantization of the front end's feature tensor, ``"scale"`` and ``"zero_point"``, which must
equal the manifest's; the server dequantizes ``(q - zero_point) * scale``.
Response: ``{"outputs": [[p, ...], ...]}`` or ``{"predictions": [[p, ...], ...]}``.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import math

import numpy as np
import orjson
import pybase64

from tfbitmeta.serve.errors import ApiError

DTYPES = {"float32": np.dtype("<f4"), "int8": np.dtype("i1"), "uint8": np.dtype("u1")}
MAX_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What a backend accepts: the feature shape (without batch), the signature, and the quantization of the
    front end's feature output for the same bitwidth and split (``None`` for float front ends)."""
    name: str
    shape: tuple[int, ...]
    signature: str = "serving_default"
    scale: float | None = None
    zero_point: int | None = None
    qdtype: str | None = None
    code_bits: int | None = None      # the front end's activation bits below 8: its codes fit in k bits

    @classmethod
    def of(cls, name: str, shape: tuple, signature: str, quantization: dict | None, a_bits: int) -> "FeatureSpec":
        """The spec of features quantized as ``quantization`` (a manifest tensor's, None for float) by a front end
        with ``a_bits``-bit activations -- the one rule the server and the device runtime share."""
        q = quantization
        return cls(name=name, shape=shape, signature=signature, scale=q and q["scale"],
                   zero_point=q and q["zero_point"], qdtype=q and q["dtype"], code_bits=a_bits if q and a_bits < 8 else None)

    @classmethod
    def of_front_end(cls, entry: dict) -> "FeatureSpec":
        """What a front end (a manifest entry) sends the server: its ``features`` output, quantized as the manifest
        says, at the entry's activation bits."""
        t = next(t for t in entry["outputs"] if t["name"] == "features")
        return cls.of("features", tuple(int(d) for d in t["shape"][1:]), entry["signature"], t["quantization"],
                      entry["bits"]["a"])


def bad(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


def parse_request(body: bytes, spec: FeatureSpec, max_rows: int = MAX_ROWS) -> tuple[np.ndarray, str]:
    """JSON body -> (float32 features of shape [N, *spec.shape], "inputs" | "instances"); ApiError 400 otherwise.

    orjson refuses NaN/Infinity literals, integers beyond 64 bits and nesting deeper than 1024 levels (so no
    RecursionError); anything the checks below did not foresee is still the client's input, hence 400, not 500."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad(f"body is not valid JSON: {e}", "invalid_json") from None
    try:
        return _parse(req, spec, max_rows)
    except ApiError:
        raise
    except (RecursionError, OverflowError, TypeError, ValueError, KeyError, MemoryError) as e:
        raise bad(f"cannot interpret the request ({type(e).__name__}: {str(e)[:200]})") from None


def _parse(req, spec: FeatureSpec, max_rows: int) -> tuple[np.ndarray, str]:
    if not isinstance(req, dict):
        raise bad("body must be a JSON object with 'instances' or 'inputs'")
    unknown = set(req) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise bad(f"unknown field(s) {sorted(unknown)}: expected 'signature_name' and 'instances' or 'inputs'")
    sig = req.get("signature_name", spec.signature)
    if sig != spec.signature:
        raise bad(f"unknown signature_name {sig!r}: this model has {spec.signature!r}")
    if ("instances" in req) == ("inputs" in req):
        raise bad("send exactly one of 'instances' (row format) or 'inputs' (columnar format)", "missing_field")
    if "inputs" in req:
        x = _tensor(_unwrap(req["inputs"], spec), spec, batched=True)
        kind = "inputs"
    else:
        rows = req["instances"]
        if not isinstance(rows, list) or not rows:
            raise bad("'instances' must be a non-empty list")
        if len(rows) > max_rows:
            raise bad(f"{len(rows)} instances exceed the {max_rows}-row limit per request", "too_many_rows")
        x = np.stack([_tensor(_unwrap(r, spec), spec, batched=False) for r in rows])
        kind = "instances"
    if len(x) > max_rows:
        raise bad(f"{len(x)} rows exceed the {max_rows}-row limit per request", "too_many_rows")
    return x, kind


def _unwrap(value, spec: FeatureSpec):
    if isinstance(value, dict) and spec.name in value:
        if len(value) != 1:
            raise bad(f"unknown input(s) {sorted(set(value) - {spec.name})}: the model has one input {spec.name!r}")
        return value[spec.name]
    return value


def _tensor(value, spec: FeatureSpec, batched: bool) -> np.ndarray:
    if isinstance(value, list):
        arr, dtype = _from_list(value), "float32"
    elif isinstance(value, dict):
        arr, dtype = _from_object(value)
    else:
        raise bad(f"a tensor must be a nested list of numbers or an object with 'b64' or 'values', got "
                  f"{type(value).__name__}", "invalid_tensor")
    want = (arr.shape[0], *spec.shape) if batched and arr.ndim >= 1 else spec.shape
    if arr.shape != tuple(want) or (batched and arr.shape[0] == 0):
        expected = "[N, " + ", ".join(map(str, spec.shape)) + "]" if batched else list(spec.shape)
        raise bad(f"wrong shape {list(arr.shape)}: expected {expected}", "invalid_shape")
    if dtype == "float32":
        with np.errstate(over="ignore"):
            x = arr.astype(np.float32)  # values beyond float32 become inf and are refused below
        if not np.all(np.isfinite(x)):
            raise bad("features contain NaN or Inf", "not_finite")
        return x
    if spec.qdtype is None:
        raise bad(f"this model takes float32 features, not {dtype}", "invalid_dtype")
    if dtype != spec.qdtype:
        raise bad(f"quantized features must be {spec.qdtype}, got {dtype}", "invalid_dtype")
    scale, zp = value.get("scale"), value.get("zero_point")
    check_quantization(scale, zp, spec, dtype)
    return arr.dequantize(spec) if isinstance(arr, Packed) else dequantize(arr, spec)


def check_quantization(scale, zp, spec: FeatureSpec, dtype: str) -> None:
    if not _number(scale) or not isinstance(zp, int) or isinstance(zp, bool):
        raise bad(f"{dtype} features need numeric 'scale' and integer 'zero_point'", "missing_field")
    if not math.isclose(float(scale), spec.scale, rel_tol=1e-6) or zp != spec.zero_point:
        raise bad(f"quantization (scale {str(scale)[:40]}, zero_point {str(zp)[:40]}) differs from the manifest's "
                  f"(scale {spec.scale}, zero_point {spec.zero_point})", "invalid_quantization")


def dequantize(q: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    return ((q.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)).astype(np.float32)


def _number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer beyond float range
        return False


def _from_list(value: list) -> np.ndarray:
    try:
        arr = np.array(value)
    except (ValueError, TypeError):
        raise bad("tensor is ragged or nested too deep: every row must have the same length", "invalid_shape") from None
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise bad(f"tensor values must be numbers, got {arr.dtype.kind!r} values", "invalid_dtype")
    return arr


def _from_object(obj: dict) -> tuple[np.ndarray, str]:
    unknown = set(obj) - {"b64", "values", "dtype", "shape", "scale", "zero_point", "bits"}
    if unknown:
        raise bad(f"unknown tensor field(s) {sorted(unknown)[:10]}", "invalid_tensor")
    dtype = obj.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unsupported dtype {str(dtype)[:40]!r}: use one of {sorted(DTYPES)}", "invalid_dtype")
    bits = obj.get("bits")
    if bits is not None:
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise bad("'bits' must be an integer 1-8 (codes packed at k bits per value)", "invalid_bits")
        if dtype == "float32" or "b64" not in obj:
            raise bad("'bits' applies to int8/uint8 codes sent as 'b64'", "invalid_bits")
    shape = obj.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise bad("'shape' must be a list of integers", "invalid_shape")
        if any(d < 0 or d > 1 << 20 for d in shape) or len(shape) > 8:
            raise bad(f"'shape' {shape} has negative, huge or too many dimensions", "invalid_shape")
    if ("b64" in obj) == ("values" in obj):
        raise bad("a tensor object needs exactly one of 'b64' or 'values'", "missing_field")
    if "b64" in obj:
        if shape is None:
            raise bad("a 'b64' tensor needs its 'shape'", "missing_field")
        if not isinstance(obj["b64"], str):
            raise bad("'b64' must be a base64 string", "invalid_base64")
        try:
            raw = b64decode(obj["b64"])
        except (binascii.Error, ValueError):
            raise bad("'b64' is not valid base64", "invalid_base64") from None
        count = math.prod(shape)
        if bits is not None:
            return Packed(raw, shape, bits, obj.get("zero_point"), dtype), dtype
        if len(raw) != count * DTYPES[dtype].itemsize:
            raise bad(f"'b64' holds {len(raw)} bytes but shape {shape} of {dtype} needs "
                      f"{count * DTYPES[dtype].itemsize}", "invalid_shape")
        return np.frombuffer(raw, DTYPES[dtype]).reshape(shape), dtype
    arr = _from_list(obj["values"]) if isinstance(obj["values"], list) else None
    if arr is None:
        raise bad("'values' must be a nested list of numbers", "invalid_tensor")
    if dtype != "float32":
        info = np.iinfo(DTYPES[dtype])
        if arr.dtype.kind == "f" or arr.min() < info.min or arr.max() > info.max:
            raise bad(f"{dtype} values must be integers in [{info.min}, {info.max}]", "invalid_dtype")
    if shape is not None and list(arr.shape) != shape:
        raise bad(f"'values' have shape {list(arr.shape)}, not the declared {shape}", "invalid_shape")
    return arr, dtype


def b64decode(text: str) -> bytes:
    """Strict base64 (standard alphabet, no whitespace) with pybase64's SIMD decoder: 2 us instead of 60 for a
    64-image request. pybase64 also refuses excess padding, which the standard library's strict decoder accepts;
    its refusals are re-checked by that decoder, so exactly the same inputs are accepted as before."""
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(text, validate=True)


def packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned codes < 2**bits -> ``bits`` bits per value, least significant bit first."""
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    planes = np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


# k in 1, 2, 4, 8 divides a byte: one table lookup per byte gives its 8/k codes
_UNPACK = {k: ((np.arange(256)[:, None] >> (k * np.arange(8 // k))) & ((1 << k) - 1)).astype(np.int16)
           for k in (1, 2, 4, 8)}


def unpack_codes(raw: bytes, count: int, bits: int) -> np.ndarray:
    if len(raw) != packed_bytes(count, bits):
        raise bad(f"packed codes hold {len(raw)} bytes but {count} values at {bits} bits need "
                  f"{packed_bytes(count, bits)}", "invalid_shape")
    if bits in _UNPACK:
        return _UNPACK[bits][np.frombuffer(raw, np.uint8)].reshape(-1)[:count]
    planes = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:count * bits].reshape(count, bits)
    return planes @ (1 << np.arange(bits, dtype=np.int16))


_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


@functools.lru_cache(maxsize=64)
def _dequantize_table(bits: int, scale: float) -> np.ndarray:
    """byte -> its 8/bits codes as float32 ``code * scale``: equal to ``dequantize(code + zero_point)`` bit for bit
    (``(q - zero_point)`` is the code, exact in float32), in one lookup instead of five array operations."""
    return (_UNPACK[bits].astype(np.float32) * np.float32(scale)).astype(np.float32)


class Packed:
    """k-bit codes ``q - zero_point`` as received, checked (byte count, range); dequantized in one step."""

    def __init__(self, raw: bytes, shape: list[int], bits: int, zp, dtype: str):
        if not isinstance(zp, int) or isinstance(zp, bool):
            raise bad("packed codes need the integer 'zero_point'", "missing_field")
        lo, hi = _RANGE[dtype]
        if not lo <= zp <= hi or zp + (1 << bits) - 1 > hi:
            raise bad(f"packed {bits}-bit codes + zero_point {str(zp)[:40]} leave the {dtype} range", "invalid_dtype")
        count = math.prod(shape)
        if len(raw) != packed_bytes(count, bits):
            raise bad(f"packed codes hold {len(raw)} bytes but {count} values at {bits} bits need "
                      f"{packed_bytes(count, bits)}", "invalid_shape")
        self.raw, self.shape, self.bits, self.count, self.ndim = raw, tuple(shape), bits, count, len(shape)

    def dequantize(self, spec: FeatureSpec) -> np.ndarray:
        if self.bits in _UNPACK:
            table = _dequantize_table(self.bits, float(spec.scale))
            return table[np.frombuffer(self.raw, np.uint8)].reshape(-1)[:self.count].reshape(self.shape)
        codes = unpack_codes(self.raw, self.count, self.bits).astype(np.float32)
        return (codes * np.float32(spec.scale)).astype(np.float32).reshape(self.shape)


# -- the device side -----------------------------------------------------------------------------------
def quantize(features: np.ndarray, scale: float, zero_point: int, dtype: str = "int8") -> np.ndarray:
    """Float features from a front end (already on its grid) -> the integer tensor the front end computed."""
    info = np.iinfo(DTYPES[dtype])
    return np.clip(np.round(features / scale) + zero_point, info.min, info.max).astype(DTYPES[dtype])


def encode_request(features: np.ndarray, spec: FeatureSpec, packed: bool = True) -> bytes:
    """The exact request bytes the device sends: quantized int tensor as base64 when the front end has a feature
    quantization (its a-bit codes packed at a bits per value when ``packed`` and they fit), float32 base64
    otherwise; compact JSON with sorted keys (reproducible for golden tests)."""
    if spec.qdtype is not None:
        q = quantize(features, spec.scale, spec.zero_point, spec.qdtype)
        tensor = {"b64": base64.b64encode(q.tobytes()).decode(), "dtype": spec.qdtype, "shape": list(q.shape),
                  "scale": spec.scale, "zero_point": spec.zero_point}
        codes = q.astype(np.int32) - spec.zero_point
        k = spec.code_bits
        if packed and k and k < 8 and codes.min() >= 0 and codes.max() < (1 << k):
            tensor.update(b64=base64.b64encode(pack_codes(codes, k)).decode(), bits=k)
    else:
        f = np.ascontiguousarray(features, dtype="<f4")
        tensor = {"b64": base64.b64encode(f.tobytes()).decode(), "dtype": "float32", "shape": list(f.shape)}
    body = {"signature_name": spec.signature, "inputs": {spec.name: tensor}}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def request_bytes_for(feature_elements: int, bits: int) -> int:
    """Bytes of the request a device sends for one image's features at activation ``bits`` (32 = float)."""
    quantized = bits < 32
    spec = FeatureSpec("features", (feature_elements,), scale=1.0 if quantized else None,
                       zero_point=-128 if quantized else None, qdtype="int8" if quantized else None,
                       code_bits=bits if quantized and bits < 8 else None)
    return len(encode_request(np.zeros((1, feature_elements), np.float32), spec))
