"""Integer-exact reference for exported TFLite files: TFLite's kernel arithmetic re-done in numpy.

:class:`TfliteProgram` reads a ``.tflite`` flatbuffer (any file any tfbitmeta exporter writes: no per-model code)
and runs its operators on numpy arrays with the arithmetic of TFLite's built-in integer kernels
(docs/export.md, "Integer-exact reference"):

* int8 activations with per-tensor scale / zero point; int8 or packed INT4 weights with per-channel scales and
  zero point 0; int32 biases;
* the int32 accumulator (computed exactly: int8 x int8 sums are exact in float64) requantized with the
  fixed-point multiplier and shift of ``QuantizeMultiplier`` and TFLite's two roundings
  (``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``), plus the output zero point, clamped to
  the fused activation range;
* element-wise ADD / MUL with the 20-bit left shift of TFLite's int8 kernels, MEAN, MAX_POOL, MINIMUM/MAXIMUM,
  softmax through its exp lookup table, QUANTIZE / DEQUANTIZE.

Float operators (full-precision files, weight-only files such as ``w2afp``) are computed in float64: they agree
with the interpreter to float rounding, not bit for bit (XNNPACK's summation order).  :func:`compare` runs a
file both ways and reports the difference in integer codes per output; ``convert --verify`` and ``evaluate``
use it.  An operator the emulation does not know raises :class:`UnsupportedOp` naming it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tfbitmeta.errors import TfbitmetaError


class UnsupportedOp(TfbitmetaError):
    """The file contains an operator (or operand type) the integer reference does not emulate."""


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


# -- TFLite's fixed-point helpers (tensorflow/lite/kernels/internal/common.h semantics) ------------------------
def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real`` (double) as a Q31 multiplier and a power-of-two exponent, rounded half away from zero."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = int(math.floor(abs(q) * (1 << 31) + 0.5)) * (1 if q > 0 else -1)
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """High 32 bits of 2*a*b, rounded to nearest, as gemmlowp does it (its nudge of 1 - 2^30 for negative products
    makes ties round toward +inf on both sides: 0.5 -> 1, -0.5 -> 0).

    Branch-free int64 arithmetic (in place: the arrays are whole feature maps): ``x >> 63`` is -1 for negative x
    and 0 otherwise, which selects the negative nudge and turns the floor of ``>>`` into C++'s truncation."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    t = a * b
    sign = t >> 63
    t += 1 << 30
    t += sign & (1 - (1 << 31))               # nudge: 2^30 for ab >= 0, 1 - 2^30 otherwise
    t += (t >> 63) & ((1 << 31) - 1)          # truncate toward zero, not floor
    t >>= 31
    overflow = (a == -(1 << 31)) & (b == -(1 << 31))
    if overflow.any():
        t[np.broadcast_to(overflow, t.shape)] = (1 << 31) - 1
    return t


def rounding_divide_by_pot(x: np.ndarray, exponent) -> np.ndarray:
    """x / 2^exponent rounded to nearest, ties away from zero (gemmlowp's RoundingDivideByPOT)."""
    x = np.asarray(x, np.int64)
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    threshold = (mask >> 1) - (x >> 63)       # + 1 for negative x
    remainder = x & mask
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier, shift, ruy: bool = False) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier``: the requantization of an int32 accumulator (double rounding).

    The first rounding (``SaturatingRoundingDoublingHighMul``; ruy's ``(x * m + 2^30) >> 31``) breaks ties toward
    +inf in every kernel.  The second, the right shift, differs: gemmlowp's ``RoundingDivideByPOT`` breaks ties away
    from zero (add, mean, quantize); ``ruy=True`` is the x86 output stage of ruy's int8 GEMM (CONV_2D,
    FULLY_CONNECTED) and of the int8 depthwise kernel, ``(r + 2^(e-1)) >> e`` with an arithmetic shift: ties
    toward +inf.  The two differ
    only on exact ties of negative values (docs/export.md)."""
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    x = np.asarray(x, np.int64)
    if np.any(left):
        x = x * (np.int64(1) << left)
    high = saturating_rounding_doubling_high_mul(x, multiplier)
    if ruy:
        half = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), np.int64(0))
        high += half
        high >>= right
        return high
    return rounding_divide_by_pot(high, right)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """std::round / TfLiteRound."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


# -- the file -------------------------------------------------------------------------------------------------
@dataclass
class Tensor:
    name: str
    dtype: str                      # "int8", "int4", "int32", "float32", ...
    shape: tuple
    scale: np.ndarray | None        # float32, per tensor (1,) or per channel
    zero_point: np.ndarray | None
    axis: int
    data: np.ndarray | None         # constants (INT4 unpacked to int8 values)

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.dtype in ("int8", "int4", "int16", "uint8")


_NP = {"INT8": np.int8, "INT32": np.int32, "FLOAT32": np.float32, "FLOAT16": np.float16, "INT64": np.int64,
       "UINT8": np.uint8, "INT16": np.int16}


def _unpack_int4(raw: bytes, n: int) -> np.ndarray:
    """Packed INT4: two signed nibbles per byte, the low nibble first."""
    b = np.frombuffer(raw, np.uint8)
    nib = np.stack([b & 0x0F, b >> 4], -1).reshape(-1)[:n].astype(np.int16)
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8)


class TfliteProgram:
    """One signature of a ``.tflite`` file, runnable with TFLite's integer arithmetic (module doc)."""

    def __init__(self, buf: bytes, signature: str | None = None):
        schema = _schema()
        buf = bytes(buf)
        model = schema.ModelT.InitFromPackedBuf(buf, 0)
        type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self.op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        sigs = model.signatureDefs or []
        sig = next((s for s in sigs if signature is None or s.signatureKey.decode() == signature), None)
        if sig is None and sigs:
            raise TfbitmetaError(f"no signature {signature!r} in the file")
        sub = sig.subgraphIndex if sig is not None else 0
        g = model.subgraphs[sub]
        self.tensors = []
        for t in g.tensors:
            tname = type_names[t.type]
            shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
            q = t.quantization
            scale = zp = None
            axis = 0
            if q is not None and q.scale is not None and len(q.scale):
                scale = np.asarray(q.scale, np.float32)
                zp = np.asarray(q.zeroPoint, np.int64)
                axis = int(q.quantizedDimension)
            raw = model.buffers[t.buffer].data
            data = None
            if raw is not None and len(raw):
                raw = bytes(np.asarray(raw, np.uint8))
                n = int(np.prod(shape)) if shape else 1
                if tname == "INT4":
                    data = _unpack_int4(raw, n).reshape(shape)
                elif tname in _NP:
                    data = np.frombuffer(raw, _NP[tname]).reshape(shape).copy()
                else:
                    raise UnsupportedOp(f"constant tensor of type {tname}")
            self.tensors.append(Tensor(t.name.decode(), tname.lower(), shape, scale, zp, axis, data))
        self.ops = []
        for op in g.operators:
            c = model.operatorCodes[op.opcodeIndex]
            code = max(c.builtinCode, c.deprecatedBuiltinCode)
            self.ops.append((self.op_names.get(code, str(code)), [int(i) for i in op.inputs],
                             [int(i) for i in op.outputs], op.builtinOptions))
        if sig is not None:
            self.inputs = {t.name.decode(): int(t.tensorIndex) for t in sig.inputs}
            self.outputs = {t.name.decode(): int(t.tensorIndex) for t in sig.outputs}
        else:
            self.inputs = {self.tensors[i].name: int(i) for i in g.inputs}
            self.outputs = {self.tensors[i].name: int(i) for i in g.outputs}
        self.producer = {o: k for k, (_, _, outs, _) in enumerate(self.ops) for o in outs}

    @property
    def op_types(self) -> list[str]:
        return sorted({name for name, *_ in self.ops})

    def code_tensor(self, output: str) -> int | None:
        """The int8 tensor behind a float output (the input of its DEQUANTIZE), if any."""
        idx = self.outputs[output]
        k = self.producer.get(idx)
        if k is not None and self.ops[k][0] == "DEQUANTIZE":
            src = self.ops[k][1][0]
            if self.tensors[src].quantized:
                return src
        return idx if self.tensors[idx].quantized else None

    def run(self, feeds: dict[str, np.ndarray], keep: bool = False) -> dict:
        """Float outputs by signature name; with ``keep`` also ``"_values"``: every tensor's value (int8 tensors as
        their integer codes).  Images are independent: the result does not depend on how many the interpreter is
        invoked with at once."""
        ctx: dict = {}
        values: dict[int, np.ndarray] = {}
        for name, idx in self.inputs.items():
            values[idx] = np.asarray(feeds[name])
        for opname, ins, outs, opt in self.ops:
            fn = _KERNELS.get(opname)
            if fn is None:
                raise UnsupportedOp(f"operator {opname} is not emulated")
            args = [None if i < 0 else (values[i] if i in values else self._const(i)) for i in ins]
            tin = [None if i < 0 else self.tensors[i] for i in ins]
            tout = self.tensors[outs[0]]
            values[outs[0]] = fn(args, tin, tout, opt, ctx)
        out = {name: values[idx] for name, idx in self.outputs.items()}
        if keep:
            out["_values"] = values
        return out

    def _const(self, i):
        t = self.tensors[i]
        if t.data is None:
            raise TfbitmetaError(f"tensor {t.name!r} has no value (graph input not fed?)")
        return t.data


# -- kernels ----------------------------------------------------------------------------------------------
_ACT = {0: None, 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}


def _qrange(t: Tensor) -> tuple[int, int]:
    return {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}[t.dtype]


def _act_range(t: Tensor, fused: int) -> tuple[int, int]:
    """CalculateActivationRangeQuantized."""
    lo, hi = _qrange(t)
    act = _ACT.get(int(fused or 0), "?")
    if act == "?":
        raise UnsupportedOp(f"fused activation {fused}")
    if act is None:
        return lo, hi
    s, z = float(t.scale[0]), int(t.zero_point[0])
    q = lambda f: z + int(round_half_away(np.float32(f) / np.float32(s)))  # noqa: E731
    if act == "RELU":
        return max(lo, q(0.0)), hi
    if act == "RELU6":
        return max(lo, q(0.0)), min(hi, q(6.0))
    return max(lo, q(-1.0)), min(hi, q(1.0))


def _float_act(y, fused):
    act = _ACT.get(int(fused or 0), "?")
    if act == "?":
        raise UnsupportedOp(f"fused activation {fused}")
    if act == "RELU":
        return np.maximum(y, 0)
    if act == "RELU6":
        return np.clip(y, 0, 6)
    if act == "RELU_N1_TO_1":
        return np.clip(y, -1, 1)
    return y


def _pad_amounts(size, k, stride, dilation, padding) -> tuple[int, int, int]:
    """(output size, pad before, pad after) as TFLite computes them (0 = SAME, 1 = VALID)."""
    eff = (k - 1) * dilation + 1
    if padding == 0:
        out = (size + stride - 1) // stride
        total = max((out - 1) * stride + eff - size, 0)
        return out, total // 2, total - total // 2
    return (size - eff + stride) // stride, 0, 0


def _windows(x, kh, kw, sh, sw, dh, dw, padding, pad_value=0.0):
    """(N, OH, OW, kh, kw, C) windows of an NHWC array."""
    n, h, w, c = x.shape
    oh, pt, pb = _pad_amounts(h, kh, sh, dh, padding)
    ow, pl, pr = _pad_amounts(w, kw, sw, dw, padding)
    if pt or pb or pl or pr:
        x = np.pad(x, [(0, 0), (pt, pb), (pl, pr), (0, 0)], constant_values=pad_value)
    v = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    v = v[:, ::sh, ::sw, :, ::dh, ::dw][:, :oh, :ow]          # (N, OH, OW, C, kh, kw)
    return np.moveaxis(v, 3, -1)                              # (N, OH, OW, kh, kw, C)


def _per_channel_requant(acc, tin, tw, tout, fused, ruy: bool):
    """int32 accumulator -> output codes (PopulateConvolutionQuantizationParams + the output stage).
    ``ruy``: the kernel is a ruy GEMM (conv, fully connected), whose output stage rounds ties toward +inf."""
    s_in = float(tin.scale[0])
    s_out = float(tout.scale[0])
    ws = tw.scale if len(tw.scale) > 1 else np.repeat(tw.scale, acc.shape[-1])
    mults, shifts = zip(*(quantize_multiplier(s_in * float(s) / s_out) for s in ws))
    y = multiply_by_quantized_multiplier(acc, np.asarray(mults, np.int64), np.asarray(shifts, np.int64),
                                         ruy=ruy)
    y = y + int(tout.zero_point[0])
    lo, hi = _act_range(tout, fused)
    return np.clip(y, lo, hi).astype(_NP[tout.dtype.upper()])


def _int_operand(x, t: Tensor):
    return np.asarray(x, np.float64) - float(t.zero_point[0])


def _bias(args, tins):
    return args[2] if len(args) > 2 and args[2] is not None else None


def _check_weight_zero(tw: Tensor):
    if tw.zero_point is not None and np.any(tw.zero_point != 0):
        raise UnsupportedOp("weights with a non-zero zero point")


def _is_int(tin: Tensor) -> bool:
    return tin.dtype in ("int8", "uint8", "int16")


def _output_stage(acc, args, tins, tout, fused, integer: bool, ruy: bool):
    """Accumulator + bias -> output: requantized codes for integer kernels, float (+ activation) otherwise."""
    b = _bias(args, tins)
    if integer:
        acc = np.rint(acc).astype(np.int64)
        if b is not None:
            acc = acc + np.asarray(b, np.int64)
        return _per_channel_requant(acc, tins[0], tins[1], tout, fused, ruy)
    if b is not None:
        acc = acc + np.asarray(b, np.float64)
    return _float_act(acc, fused).astype(np.float32)


def _conv2d(args, tins, tout, opt, ctx):
    x, w = args[0], args[1]
    tin, tw = tins[0], tins[1]
    windows_fp = not _is_int(tin)
    wv = np.asarray(w, np.float64)                              # (O, kh, kw, I)
    if not windows_fp:
        _check_weight_zero(tw)
        xin = _int_operand(x, tin)
    else:
        xin = np.asarray(x, np.float64)
        if tw.quantized:                                        # float conv with int weights (not expected)
            raise UnsupportedOp("hybrid CONV_2D (float input, integer weights)")
    o, kh, kw, i = wv.shape
    win = _windows(xin, kh, kw, opt.strideH, opt.strideW, opt.dilationHFactor, opt.dilationWFactor, opt.padding)
    acc = win.reshape(*win.shape[:3], -1) @ wv.reshape(o, -1).T  # exact for integers (< 2^53)
    return _output_stage(acc, args, tins, tout, opt.fusedActivationFunction, not windows_fp, ruy=True)


def _depthwise(args, tins, tout, opt, ctx):
    x, w = args[0], args[1]
    tin, tw = tins[0], tins[1]
    fp = not _is_int(tin)
    wv = np.asarray(w, np.float64)                              # (1, kh, kw, C*m)
    _, kh, kw, cm = wv.shape
    xin = np.asarray(x, np.float64) if fp else _int_operand(x, tin)
    if not fp:
        _check_weight_zero(tw)
    c = xin.shape[-1]
    mult = cm // c
    win = _windows(xin, kh, kw, opt.strideH, opt.strideW, opt.dilationHFactor, opt.dilationWFactor, opt.padding)
    if mult != 1:
        win = np.repeat(win, mult, axis=-1)
    acc = np.einsum("nhwijc,ijc->nhwc", win, wv[0], optimize=True)
    # DepthwiseConvPerChannel rounds its output shift upward (DepthwiseConvOutputRounding::kUpward), as ruy does;
    # measured on signed outputs (tests/test_emulate.py)
    return _output_stage(acc, args, tins, tout, opt.fusedActivationFunction, not fp, ruy=True)


def _fully_connected(args, tins, tout, opt, ctx):
    x, w = args[0], args[1]
    tin, tw = tins[0], tins[1]
    fp = not _is_int(tin)
    wv = np.asarray(w, np.float64)                              # (O, I)
    xin = np.asarray(x, np.float64) if fp else _int_operand(x, tin)
    xin = xin.reshape(-1, wv.shape[1])
    acc = xin @ wv.T
    keep = bool(getattr(opt, "keepNumDims", False))
    shape = (*np.asarray(x).shape[:-1], wv.shape[0]) if keep else acc.shape
    if not fp:
        _check_weight_zero(tw)
    y = _output_stage(acc, args, tins, tout, opt.fusedActivationFunction, not fp, ruy=True)
    return y.reshape(shape)


def _pool(kind):
    def run(args, tins, tout, opt, ctx):
        x, tin = args[0], tins[0]
        fp = not _is_int(tin)
        pad = -np.inf if kind == "max" else 0.0
        win = _windows(np.asarray(x, np.float64), opt.filterHeight, opt.filterWidth, opt.strideH, opt.strideW, 1, 1,
                       opt.padding, pad_value=pad)
        if kind == "max":
            y = win.max(axis=(3, 4))
            if fp:
                return _float_act(y, opt.fusedActivationFunction).astype(np.float32)
            if not _same_q(tin, tout):
                raise UnsupportedOp("MAX_POOL_2D with different input and output quantization")
            lo, hi = _act_range(tout, opt.fusedActivationFunction)
            return np.clip(y, lo, hi).astype(_NP[tout.dtype.upper()])
        if fp:
            if opt.padding == 0:
                raise UnsupportedOp("float AVERAGE_POOL_2D with SAME padding")
            return _float_act(win.mean(axis=(3, 4)), opt.fusedActivationFunction).astype(np.float32)
        if opt.padding == 0 or not _same_q(tin, tout):
            raise UnsupportedOp("int8 AVERAGE_POOL_2D with SAME padding or requantization")
        count = opt.filterHeight * opt.filterWidth
        s = np.rint(win.sum(axis=(3, 4))).astype(np.int64)
        y = np.where(s > 0, (s + count // 2) // count, -((-s + count // 2) // count))
        lo, hi = _act_range(tout, opt.fusedActivationFunction)
        return np.clip(y, lo, hi).astype(_NP[tout.dtype.upper()])
    return run


def _same_q(a: Tensor, b: Tensor) -> bool:
    return (a.scale is not None and b.scale is not None and float(a.scale[0]) == float(b.scale[0])
            and int(a.zero_point[0]) == int(b.zero_point[0]))


def _minmax(fn):
    def run(args, tins, tout, opt, ctx):
        if _is_int(tins[0]):
            if not (_same_q(tins[0], tout) and _same_q(tins[1], tout)):
                raise UnsupportedOp("int8 MINIMUM/MAXIMUM with operands on different grids")
            return fn(np.asarray(args[0]), np.asarray(args[1])).astype(np.int8)
        return fn(np.asarray(args[0], np.float32), np.asarray(args[1], np.float32)).astype(np.float32)
    return run


def _mean(args, tins, tout, opt, ctx):
    x, axes = args[0], np.asarray(args[1]).reshape(-1)
    tin = tins[0]
    axes = tuple(int(a) % np.asarray(x).ndim for a in axes)
    keep = bool(getattr(opt, "keepDims", False))
    if not _is_int(tin):
        return np.asarray(x, np.float64).mean(axis=axes, keepdims=keep).astype(np.float32)
    n = int(np.prod([np.asarray(x).shape[a] for a in axes]))
    total = np.asarray(x, np.int64).sum(axis=axes, keepdims=keep)
    s_in, s_out = float(tin.scale[0]), float(tout.scale[0])
    z_in, z_out = int(tin.zero_point[0]), int(tout.zero_point[0])
    # reference_integer_ops::Mean (reduce.cc, int8): sum of (q - z_in); the multiplier of s_in / s_out absorbs
    # 1/n as an integer division after a left shift of floor(log2 n)
    mult, shift = quantize_multiplier(s_in / s_out)
    div_shift = min(int(n).bit_length() - 1, 32, 31 + shift)
    mult = (mult << div_shift) // n
    y = multiply_by_quantized_multiplier(total - n * z_in, mult, shift - div_shift) + z_out
    lo, hi = _qrange(tout)
    return np.clip(y, lo, hi).astype(_NP[tout.dtype.upper()])


def _softmax(args, tins, tout, opt, ctx):
    x, tin = args[0], tins[0]
    beta = float(getattr(opt, "beta", 1.0))
    if not _is_int(tin):
        z = np.asarray(x, np.float64) * beta
        z = np.exp(z - z.max(-1, keepdims=True))
        return (z / z.sum(-1, keepdims=True)).astype(np.float32)
    if tout.dtype != "int8" or tin.dtype != "int8":
        raise UnsupportedOp("softmax other than int8 -> int8")
    # PopulateSoftmaxLookupTable: table[255 - v] = expf(-s_in * beta * v); optimized int8 Softmax
    scale = np.float32(-float(tin.scale[0]) * beta)
    table = np.zeros(256, np.float32)
    v = np.arange(256)
    # expf: glibc's float exp is (almost always) correctly rounded; numpy's float32 exp is not (measured: one
    # Fashion-MNIST image tied at .5 with numpy's and rounded down in the interpreter), so exp in float64, rounded
    table[255 - v] = np.exp((scale * v.astype(np.float32)).astype(np.float64)).astype(np.float32)
    q = np.asarray(x, np.int64)
    mx = q.max(-1, keepdims=True)
    vals = table[255 - mx + q]                                   # table_offset[q] with offset 255 - max
    total = np.zeros(q.shape[:-1] + (1,), np.float32)
    for j in range(q.shape[-1]):                                 # float32 sum in kernel order
        total = (total + vals[..., j:j + 1]).astype(np.float32)
    inv = (np.float32(1.0) / (total * np.float32(tout.scale[0]))).astype(np.float32)
    p = (vals * inv).astype(np.float32)
    y = round_half_away(p.astype(np.float64)) + int(tout.zero_point[0])
    return np.clip(y, -128, 127).astype(np.int8)


def _binary(kind):
    def run(args, tins, tout, opt, ctx):
        a, b = np.asarray(args[0]), np.asarray(args[1])
        ta, tb = tins
        fused = getattr(opt, "fusedActivationFunction", 0) if opt is not None else 0
        if not _is_int(ta):
            y = a.astype(np.float64) + b if kind == "add" else (a.astype(np.float64) * b if kind == "mul"
                                                                  else a.astype(np.float64) - b)
            return _float_act(y, fused).astype(np.float32)
        za, zb, zo = int(ta.zero_point[0]), int(tb.zero_point[0]), int(tout.zero_point[0])
        sa, sb, so = float(ta.scale[0]), float(tb.scale[0]), float(tout.scale[0])
        xa, xb = a.astype(np.int64) - za, b.astype(np.int64) - zb
        lo, hi = _act_range(tout, fused)
        if kind == "mul":
            m, s = quantize_multiplier(sa * sb / so)
            y = multiply_by_quantized_multiplier(xa * xb, m, s) + zo
            return np.clip(y, lo, hi).astype(_NP[tout.dtype.upper()])
        # add / sub (int8): inputs rescaled to twice the larger scale after a 20-bit left shift
        left = 20
        twice = 2.0 * max(sa, sb)
        ma, sha = quantize_multiplier(sa / twice)
        mb, shb = quantize_multiplier(sb / twice)
        mo, sho = quantize_multiplier(twice / ((1 << left) * so))
        ya = multiply_by_quantized_multiplier(xa * (1 << left), ma, sha)
        yb = multiply_by_quantized_multiplier(xb * (1 << left), mb, shb)
        raw = ya + yb if kind == "add" else ya - yb
        y = multiply_by_quantized_multiplier(raw, mo, sho) + zo
        return np.clip(y, lo, hi).astype(_NP[tout.dtype.upper()])
    return run


def _reshape(args, tins, tout, opt, ctx):
    x = np.asarray(args[0])
    shape = list(tout.shape)
    if shape and x.size != int(np.prod(shape)):
        shape[0] = -1
    return x.reshape(shape) if shape else x.reshape(())


def _quantize(args, tins, tout, opt, ctx):
    x, tin = args[0], tins[0]
    lo, hi = _qrange(tout)
    zo = int(tout.zero_point[0])
    out_type = _NP[tout.dtype.upper()]
    if _is_int(tin):  # requantize
        m, s = quantize_multiplier(float(tin.scale[0]) / float(tout.scale[0]))
        y = multiply_by_quantized_multiplier(np.asarray(x, np.int64) - int(tin.zero_point[0]), m, s) + zo
        return np.clip(y, lo, hi).astype(out_type)
    y = round_half_away(np.asarray(x, np.float32).astype(np.float64) / np.float64(np.float32(tout.scale[0]))) + zo
    return np.clip(y, lo, hi).astype(out_type)


def _dequantize(args, tins, tout, opt, ctx):
    x, tin = np.asarray(args[0]), tins[0]
    if tin.dtype == "float16":
        return x.astype(np.float32)
    if tin.scale is not None and len(tin.scale) > 1:  # per-channel constant weights (weight-only files)
        shape = [1] * x.ndim
        shape[tin.axis] = -1
        s = tin.scale.reshape(shape).astype(np.float64)
        z = tin.zero_point.reshape(shape)
        return ((x.astype(np.float64) - z) * s).astype(np.float32)
    return (np.float64(np.float32(tin.scale[0])) * (x.astype(np.int64) - int(tin.zero_point[0]))).astype(np.float32)


def _relu(kind):
    def run(args, tins, tout, opt, ctx):
        x, tin = np.asarray(args[0]), tins[0]
        if not _is_int(tin):
            return {"RELU": lambda v: np.maximum(v, 0), "RELU6": lambda v: np.clip(v, 0, 6)}[kind](x).astype(np.float32)
        if not _same_q(tin, tout):
            raise UnsupportedOp(f"int8 {kind} with requantization")
        lo, hi = _act_range(tout, 1 if kind == "RELU" else 3)
        return np.clip(x, lo, hi).astype(np.int8)
    return run


def _pad(args, tins, tout, opt, ctx):
    """PAD / PADV2: data movement; the fill is the output zero point (PAD) or the raw constant (PADV2), as in
    TFLite's kernel (no requantization: the output shares the input's scale and zero point)."""
    x = np.asarray(args[0])
    paddings = np.asarray(args[1], np.int64).reshape(-1, 2)
    if len(args) > 2 and args[2] is not None:
        fill = np.asarray(args[2]).reshape(-1)[0]
    else:
        fill = int(tout.zero_point[0]) if _is_int(tout) else 0
    if _is_int(tins[0]) and not _same_q(tins[0], tout):
        raise UnsupportedOp("int8 PAD with requantization")
    return np.pad(x, [tuple(int(v) for v in p) for p in paddings], constant_values=fill).astype(x.dtype)


def _strided_slice(args, tins, tout, opt, ctx):
    """STRIDED_SLICE without ellipsis/new-axis/shrink masks (what the export graph emits): pure indexing."""
    x = np.asarray(args[0])
    begin, end, strides = (np.asarray(a, np.int64).reshape(-1) for a in args[1:4])
    o = opt
    masks = {k: int(getattr(o, k, 0) or 0) for k in ("beginMask", "endMask", "ellipsisMask", "newAxisMask",
                                                      "shrinkAxisMask")}
    if masks["ellipsisMask"] or masks["newAxisMask"] or masks["shrinkAxisMask"]:
        raise UnsupportedOp("STRIDED_SLICE with ellipsis/new-axis/shrink masks")
    index = []
    for d in range(len(begin)):
        b = None if masks["beginMask"] >> d & 1 else int(begin[d])
        e = None if masks["endMask"] >> d & 1 else int(end[d])
        index.append(slice(b, e, int(strides[d])))
    return x[tuple(index)]


def _concatenation(args, tins, tout, opt, ctx):
    axis = int(getattr(opt, "axis", 0))
    if any(_is_int(t) and not _same_q(t, tout) for t in tins):
        raise UnsupportedOp("int8 CONCATENATION with requantization")
    return np.concatenate([np.asarray(a) for a in args], axis=axis)


_KERNELS = {
    "CONV_2D": _conv2d, "DEPTHWISE_CONV_2D": _depthwise, "FULLY_CONNECTED": _fully_connected,
    "MAX_POOL_2D": _pool("max"), "AVERAGE_POOL_2D": _pool("avg"), "MEAN": _mean, "SOFTMAX": _softmax,
    "ADD": _binary("add"), "SUB": _binary("sub"), "MUL": _binary("mul"),
    "MINIMUM": _minmax(np.minimum), "MAXIMUM": _minmax(np.maximum), "RESHAPE": _reshape,
    "QUANTIZE": _quantize, "DEQUANTIZE": _dequantize, "RELU": _relu("RELU"), "RELU6": _relu("RELU6"),
    "PAD": _pad, "PADV2": _pad, "STRIDED_SLICE": _strided_slice, "CONCATENATION": _concatenation,
}


# -- emulation vs interpreter ------------------------------------------------------------------------------
def run_interpreter(buf: bytes, feeds: dict[str, np.ndarray], batch: int = 1) -> dict:
    """The TFLite interpreter through its signature runner (as the device runtime and the server use it), invoked
    with ``batch`` images per call (1 = the device's case), by signature output name."""
    import tensorflow as tf

    it = tf.lite.Interpreter(model_content=buf)
    runner = it.get_signature_runner()
    n = len(next(iter(feeds.values())))
    outs = [runner(**{k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def run_emulation(program: TfliteProgram, feeds: dict[str, np.ndarray], chunk: int = 256) -> dict:
    """The integer reference on ``feeds``, computed ``chunk`` images at a time (vectorized)."""
    n = len(next(iter(feeds.values())))
    outs = [program.run({k: v[i:i + chunk] for k, v in feeds.items()}) for i in range(0, n, chunk)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def codes(program: TfliteProgram, name: str, values: np.ndarray) -> np.ndarray | None:
    """Integer codes of a dequantized float output (exact: DEQUANTIZE is a scaled copy)."""
    idx = program.code_tensor(name)
    if idx is None:
        return None
    t = program.tensors[idx]
    return np.rint(np.asarray(values, np.float64) / np.float64(np.float32(t.scale[0]))).astype(np.int64) + \
        int(t.zero_point[0])


def compare(buf: bytes, feeds: dict[str, np.ndarray], batch: int = 1, interpreter: dict | None = None) -> dict:
    """Interpreter vs integer reference on ``feeds``: per output, images whose codes differ, the largest code
    difference, top-1 agreement (for probability outputs) and the largest float difference; ``bit_exact`` when
    every integer output is identical.  ``interpreter``: its outputs, if already computed."""
    program = TfliteProgram(buf)
    got = interpreter if interpreter is not None else run_interpreter(buf, feeds, batch)
    ref = run_emulation(program, feeds)
    report, exact = {}, True
    for name in program.outputs:
        a, b = np.asarray(got[name]), np.asarray(ref[name])
        ca, cb = codes(program, name, a), codes(program, name, b)
        r = {"max_abs_diff": float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0}
        if ca is not None:
            d = np.abs(ca - cb).reshape(len(ca), -1)
            r["integer"] = True
            r["max_code_diff"] = int(d.max()) if d.size else 0
            r["images_differing"] = int(np.sum(d.max(-1) > 0)) if d.size else 0
            exact = exact and r["max_code_diff"] == 0
        else:
            r["integer"] = False
        if a.ndim == 2:
            r["top1_agreement"] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
        report[name] = r
    integer = any(r["integer"] for r in report.values())
    return {"images": int(len(next(iter(feeds.values())))), "ops": program.op_types, "outputs": report,
            "integer": integer, "bit_exact": bool(exact and integer), "reference": ref, "interpreter": got}
