"""The trained Keras model at one static bitwidth, as a float graph with FakeQuant ops the TFLite converter
turns into integer kernels.

The graph is produced by interpreting the functional model layer by layer (so it works for every family and
for any cut: front end, backend, full) with these rules:

* quantized conv / dense: kernel = integer codes x per-channel scale from the layer's scheme at the static
  bitwidth, with the following BatchNorm (calibrated statistics of that configuration) folded in -- folding
  multiplies each channel's scale, so the codes stay the same integers.  Emitted as
  ``fake_quant_with_min_max_vars_per_channel`` in a 4-bit container for 1-4 bit (INT4 in the file; codes of
  1-3 bit fit exactly inside it, which avoids the 3-bit zero-point failure of docs/stack.md, "TFLite converter") and an 8-bit
  container for 5-8 bit.
* ReLU + k-bit activation: ``FakeQuant(min=0, max=255/n, 8 bit)`` then ``min(., 1)`` -- an 8-bit tensor with
  scale 1/n holds the k-bit grid ``j/n`` exactly (n = 2^k - 1).  The quantization is applied *before* a
  max-pool that precedes it (max-pool commutes with clip and round), so the conv writes the grid directly.
* QLinear (a signed tensor without activation: MobileNetV2's bottleneck outputs and residual sums):
  ``FakeQuant(min=-128 s, max=127 s, 8 bit)`` with the layer's calibrated power-of-two scale ``s``: the int8
  tensor has scale ``s`` and zero point 0, exactly the Keras grid; a backend whose input is such a tensor pins its
  input quantization the same way.
* everything else (pooling, add, flatten, dense logits) keeps its Keras op; the converter calibrates those
  tensors on representative data.

TFLite adds the (folded) bias in int32 steps of ``s_in * s_w``; a bias between two steps shifts every
pre-activation by up to half a step and flips k-bit activations that lie that close to a rounding boundary.
``aligned_biases`` moves each configuration's calibrated BN mean (or a config-independent layer bias) by at
most half a step so the folded bias lies on that grid: the Keras model and the integer model then compute
the same integers up to float rounding.  The shift is at most half an accumulator step of the layer input
(see ``alignment_report``).
"""
from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export.emulate import quantize_multiplier
from tfbitmeta.models.dropout import CheckpointedDropout
from tfbitmeta.quant.bitwidth import FP, Config
from tfbitmeta.quant.layers import LINEAR_CODES, BitBatchNorm, QConv2D, QDense, QDepthwiseConv2D, QLinear, QReLU

QUANT_LAYERS = (QConv2D, QDense, QDepthwiseConv2D)


def container_bits(bits: int, int4: bool = True) -> int:
    """The integer type a k-bit weight is stored in: INT4 for 1-4 bit (INT8 with ``int4=False``), INT8 for 5-8."""
    if bits <= 4 and int4:
        return 4
    if bits <= 8:
        return 8
    raise TfbitmetaError(f"{bits}-bit weights have no integer TFLite container; export fp or 1-8 bit")


def _producer(kt):
    return kt._keras_history.layer


def _inputs_of_tensor(kt):
    """The Keras tensors the node that produced ``kt`` consumed (layers are called in several graphs)."""
    layer, node_index, _ = kt._keras_history
    return layer.inbound_nodes[node_index].keras_inputs


def _consumers(layer, model):
    """Layers of ``model`` that consume ``layer``'s output."""
    names = {id(m) for m in model.layers}
    found = {id(n.outbound_layer): n.outbound_layer for n in layer.outbound_nodes if id(n.outbound_layer) in names}
    return list(found.values())


_SCALE_PRESERVING = (tf.keras.layers.MaxPool2D, tf.keras.layers.Flatten, tf.keras.layers.Reshape,
                     tf.keras.layers.Dropout, CheckpointedDropout)


def _full_model_input(layer, model):
    """The Keras tensor ``layer`` consumes in ``model``'s own graph (layers are called again by the parts)."""
    names = {id(m) for m in model.layers}
    for node in layer.inbound_nodes:
        ins = node.keras_inputs
        if ins and id(_producer(ins[0])) in names:
            return ins[0]
    return None


class ExportGraph:
    """Evaluates Keras tensors of ``model`` at configuration ``cfg`` with export semantics."""

    def __init__(self, model: tf.keras.Model, cfg: Config, normalization=None, int4: bool = True):
        """With ``normalization``, the image input takes pixel values in [0, 255] and the normalization
        ``(p * input_scale - mean) / std`` is folded into the first layer(s): the int8 input then holds the
        pixels exactly, and with one channel the folded kernel keeps its integer codes (scale x 1/(255 std)).
        Exact for 'valid' first convs; with 'same' padding the border pixels see a zero-pixel pad instead of a
        zero-normalized one."""
        self.model, self.cfg, self.int4 = model, (int(cfg[0]), int(cfg[1])), int4
        self.norm = normalization
        image = model.inputs[0]
        self._first = {id(n.outbound_layer) for n in image._keras_history.layer.outbound_nodes} if normalization else set()
        self.fp = self.cfg == (FP, FP)
        self.bits_value = np.array([[float(self.cfg[0]), float(self.cfg[1])]], np.float32)
        # everything numeric is computed eagerly here; evaluate() may then run inside a tf.function
        self._kernels, self._act_bits, self._affine, self._linear = {}, {}, {}, {}
        for layer in model.layers:
            if isinstance(layer, QUANT_LAYERS):
                self._kernels[id(layer)] = self._kernel_arrays(layer)
            elif isinstance(layer, QReLU):
                self._act_bits[id(layer)] = int(layer.act_bits(tf.constant(self.bits_value)).numpy())
            elif isinstance(layer, QLinear):
                self._linear[id(layer)] = self._linear_scale(layer)
            elif isinstance(layer, BitBatchNorm):
                self._affine[id(layer)] = self._bn_affine(layer)

    # -- static bitwidth of a layer -----------------------------------------------------------------
    def weight_bits(self, layer) -> int:
        return int(layer.weight_bits(tf.constant(self.bits_value)).numpy())

    def _linear_scale(self, layer: QLinear) -> float | None:
        """The grid step of a QLinear at this configuration; None when it is the identity (fp, uncalibrated)."""
        b = tf.constant(self.bits_value)
        if int(layer.act_bits(b).numpy()) >= FP:
            return None
        s = float(layer.scale.numpy()[layer.candidates.slot(self.cfg)])
        return s if s > 0 else None

    def linear_quant(self, layer: QLinear, x):
        s = self._linear[id(layer)]
        if s is None:
            return x
        lo, hi = LINEAR_CODES
        return tf.quantization.fake_quant_with_min_max_args(x, min=lo * s, max=hi * s, num_bits=8)

    def pin_input(self, kt, x):
        """``x`` fed for the Keras tensor ``kt``: on the producer's QLinear grid when it has one (a backend's
        features input then has the front end's int8 scale instead of a calibrated one)."""
        src = _producer(kt)
        return self.linear_quant(src, x) if isinstance(src, QLinear) else x

    # -- folded, quantized kernels --------------------------------------------------------------------
    def _bn_affine(self, bn: BitBatchNorm):
        slot = bn.candidates.slot(self.cfg)
        var = bn.moving_variance.numpy()[slot]
        a = bn.gamma.numpy() / np.sqrt(var + bn.epsilon)
        return a, bn.beta.numpy() - bn.moving_mean.numpy()[slot] * a

    def _folded_bn(self, layer):
        cons = _consumers(layer, self.model)
        if len(cons) == 1 and isinstance(cons[0], BitBatchNorm):
            return cons[0]
        return None

    def weight_limit_bytes(self) -> int:
        """Physical size of the weights of the layers in the last evaluated graph: kernel parameters x container
        bits / 8 (32 for float), plus int32 biases."""
        total = 0.0
        for layer in self.used:
            flat, bias, _, cb, _ = self._kernels[id(layer)]
            total += flat.size * (cb or 32) / 8 + 4 * bias.size
        return int(total)

    def _kernel_arrays(self, layer):
        """Folded float kernel, bias, per-channel scale (None at FP) and container bits, as numpy."""
        is_dw = isinstance(layer, QDepthwiseConv2D)
        w = (layer.depthwise_kernel if is_dw else layer.kernel).numpy()
        out_ch = w.shape[-2] * w.shape[-1] if is_dw else w.shape[-1]
        axes = [0, 1] if is_dw else list(range(w.ndim - 1))
        bias = layer.bias.numpy() if layer.use_bias else np.zeros(out_ch, np.float32)
        bits = self.weight_bits(layer)
        bn = self._folded_bn(layer)
        a, b = self._bn_affine(bn) if bn is not None else (np.ones(out_ch, np.float32), np.zeros(out_ch, np.float32))
        if bits >= FP:
            wq, scale = w, None
        else:
            codes, s = layer.scheme.codes(tf.constant(w), tf.constant(float(bits)), axes)
            codes, s = codes.numpy(), s.numpy()
            wq = codes * s
        if id(layer) in self._first and not is_dw:
            # fold (p * input_scale - mean) / std into the kernel: per input channel c, factor k_c = scale / std_c
            std, mean = np.asarray(self.norm.std, np.float32), np.asarray(self.norm.mean, np.float32)
            bias = bias - np.tensordot(wq.reshape(-1, wq.shape[-2], wq.shape[-1]).sum(0), mean / std, axes=([0], [0]))
            k_c = np.float32(self.norm.input_scale) / std
            wq = wq * k_c.reshape([1] * (wq.ndim - 2) + [-1, 1])
            if bits < FP:
                if np.allclose(k_c, k_c[0]):
                    s = s * k_c[0]
                else:  # channels with different std: no common grid; the converter re-quantizes this kernel
                    s = np.abs(wq).max(axis=tuple(axes), keepdims=True) / (2 ** (container_bits(bits, self.int4) - 1) - 1)
        bias = bias * a + b
        shape = w.shape
        flat = wq.reshape(*shape[:2], 1, out_ch) if is_dw else wq
        flat = flat * a.reshape([1] * (flat.ndim - 1) + [-1])
        if isinstance(layer, QDense):
            flat = flat.reshape(1, 1, *flat.shape)  # exported as a 1x1 conv (see apply)
        scale, cb = None, None
        if bits < FP:
            # codes c (|c| <= m) are stored as c*K with scale s/K, K = floor(M/m) for container maximum M: the
            # same real weights, but TFLite quantizes the (folded) bias to int32 steps of s_in * s_w, and a K
            # times finer weight scale makes that rounding K times smaller (it caused ~8 % activation flips at
            # 2 bit with K = 1).
            cb = container_bits(bits, self.int4)
            m = 1 if bits <= 1 else 2 ** (bits - 1) - 1
            scale = np.abs(s).reshape(-1) * np.abs(a) / ((2 ** (cb - 1) - 1) // m)
        return flat.astype(np.float32), bias.astype(np.float32), scale, cb, shape

    def kernel(self, layer):
        """(kernel tensor, bias) for a quantized layer: a FakeQuant per channel on the folded integer grid."""
        flat, bias, scale, cb, shape = self._kernels[id(layer)]
        if scale is None:
            kt = tf.constant(flat)
        else:
            m = 2 ** (cb - 1) - 1
            kt = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                tf.constant(flat), min=tf.constant((-m * scale).astype(np.float32)),
                max=tf.constant((m * scale).astype(np.float32)), num_bits=cb, narrow_range=True)
        if isinstance(layer, QDepthwiseConv2D):
            kt = tf.reshape(kt, shape)
        return kt, bias

    def integer_weights(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(layer name, integer codes in TFLite's layout, per-channel scale) of every quantized kernel in the last
        evaluated graph: what the exported file must hold (``convert --verify`` checks it)."""
        out, seen = [], set()
        for layer in self.used:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            flat, bias, scale, cb, shape = self._kernels[id(layer)]
            if scale is None:
                continue
            codes = np.rint(flat / scale.reshape([1] * (flat.ndim - 1) + [-1])).astype(np.int64)
            # TF (kh, kw, in, out) -> TFLite (out, kh, kw, in); depthwise (kh, kw, 1, C) -> (1, kh, kw, C)
            tfl = codes.transpose(2, 0, 1, 3) if isinstance(layer, QDepthwiseConv2D) else codes.transpose(3, 0, 1, 2)
            out.append((layer.name, tfl, scale))
        return out

    # -- bias alignment ---------------------------------------------------------------------------------
    def input_scale(self, layer):
        """Scale of the int8 tensor a quantized layer reads, when the export fixes it: 1/n after a k-bit
        activation, s after a QLinear (through max-pool / flatten / dropout), 1 for the pixel input; None when
        calibrated."""
        kt = _full_model_input(layer, self.model)
        while kt is not None:
            src = _producer(kt)
            if isinstance(src, QReLU):
                bits = self._act_bits[id(src)]
                return None if bits >= FP else 1.0 / (2.0 ** bits - 1.0)
            if isinstance(src, QLinear):
                return self._linear[id(src)]
            if isinstance(src, tf.keras.layers.InputLayer):
                return 1.0 if id(layer) in self._first else None
            if not isinstance(src, _SCALE_PRESERVING):
                return None
            kt = _inputs_of_tensor(kt)[0]
        return None

    def bias_grid(self, layer):
        """Per-channel int32 bias step ``s_in * s_w`` of ``layer`` in the integer model, or None."""
        flat, bias, scale, cb, shape = self._kernels[id(layer)]
        s_in = self.input_scale(layer)
        if scale is None or s_in is None:
            return None
        return np.float32(s_in) * scale.astype(np.float32)

    def requant_shift(self, layer):
        """(quantizer, per-channel right shift of TFLite's requantization) for a quantized conv whose input and
        output grids the export fixes (conv -> [folded BN] -> [max-pool] -> QReLU / QLinear), else None."""
        grid = self.bias_grid(layer)
        if grid is None:
            return None
        nxt = layer
        while True:
            cons = _consumers(nxt, self.model)
            if len(cons) != 1:
                return None
            nxt = cons[0]
            if not (isinstance(nxt, BitBatchNorm) and self._folded_bn(layer) is nxt) and \
                    not isinstance(nxt, tf.keras.layers.MaxPool2D):
                break
        if isinstance(nxt, QReLU):
            bits = self._act_bits[id(nxt)]
            s_out = None if bits >= FP else 1.0 / (2.0 ** bits - 1.0)
        elif isinstance(nxt, QLinear):
            s_out = self._linear[id(nxt)]
        else:
            return None
        if s_out is None:
            return None
        # the file's float32 scales, as the interpreter computes the multiplier from them
        s_in = np.float32(self.input_scale(layer))
        s_w = self._kernels[id(layer)][2].astype(np.float32)
        real = [float(s_in) * float(w) / float(np.float32(s_out)) for w in s_w]
        return nxt, np.array([max(-quantize_multiplier(r)[1], 0) for r in real], np.float64)

    # -- activations ------------------------------------------------------------------------------------
    def act_quant(self, layer: QReLU, x):
        bits = self._act_bits[id(layer)]
        if bits >= FP:
            return tf.nn.relu(x)
        n = 2.0 ** bits - 1.0
        y = tf.quantization.fake_quant_with_min_max_args(x, min=0.0, max=255.0 / n, num_bits=8)
        if n != 255.0:
            y = tf.quantization.fake_quant_with_min_max_args(tf.minimum(y, 1.0), min=0.0, max=255.0 / n, num_bits=8)
        return y

    # -- interpreter ------------------------------------------------------------------------------------
    def evaluate(self, outputs: dict, given: dict):
        """``outputs``: name -> Keras tensor; ``given``: id(Keras tensor) -> tf tensor (the graph's inputs)."""
        memo = dict(given)
        self.used = []  # quantized layers this graph contains (for the size report)

        def deps(layer, ins):
            """The Keras tensors ``apply`` evaluates for ``layer`` (a QReLU after a max-pool reads the pool's input)."""
            if isinstance(layer, QReLU) and isinstance(_producer(ins[0]), tf.keras.layers.MaxPool2D):
                return [_inputs_of_tensor(ins[0])[0], *ins[1:]]
            return ins

        def ev(root):
            # depth-first with an explicit stack: a deep model (MobileNetV2's backend) exceeds Python's recursion limit
            stack = [root]
            while stack:
                kt = stack[-1]
                if id(kt) in memo:
                    stack.pop()
                    continue
                layer = _producer(kt)
                if isinstance(layer, tf.keras.layers.InputLayer):
                    if layer.name != "bits":
                        raise TfbitmetaError(f"export: no value for input {layer.name!r}")
                    memo[id(kt)] = tf.constant(self.bits_value)
                    continue
                ins = _inputs_of_tensor(kt)
                missing = [t for t in deps(layer, ins) if id(t) not in memo]
                if missing:
                    stack.extend(missing)
                    continue
                memo[id(kt)] = self.apply(layer, ins, ev)
                stack.pop()
            return memo[id(root)]

        return {k: ev(v) for k, v in outputs.items()}

    def _pad_with_mean_pixel(self, x, layer):
        """A 'same' first conv with the normalization folded in: the Keras model pads the *normalized* image with
        0, i.e. with the mean pixel; pad the pixels with the (rounded) mean pixel so the folded conv sees the same
        border (an explicit PAD, then a 'valid' conv).  Exact when the mean is a whole pixel value, as
        ``Normalization.fit`` makes it; runs normalized before that have < 0.5 pixel of error at the border."""
        pads = []
        for size, k, st in zip(x.shape[1:3], layer.kernel_size, layer.strides):
            total = max((-(-int(size) // st) - 1) * st + k - int(size), 0)
            pads.append([total // 2, total - total // 2])
        mean_pixel = np.round(np.asarray(self.norm.mean, np.float64) / self.norm.input_scale)
        means = np.broadcast_to(mean_pixel, (int(x.shape[-1]),))
        if len(set(means.tolist())) == 1:  # one fill value (grayscale): a single PAD, no slicing
            return tf.pad(x, [[0, 0], *pads, [0, 0]], constant_values=float(means[0]))
        chans = [tf.pad(x[..., c:c + 1], [[0, 0], *pads, [0, 0]], constant_values=float(m))
                 for c, m in enumerate(means)]
        return tf.concat(chans, -1)

    def apply(self, layer, ins, ev):
        if isinstance(layer, QUANT_LAYERS):
            x = ev(ins[0])
            self.used.append(layer)
            k, bias = self.kernel(layer)
            if isinstance(layer, QDense):
                # as a 1x1 conv: TF 2.14's converter rejects per-channel FULLY_CONNECTED weights ("mismatched
                # quantized axes" on the transpose); CONV_2D keeps the per-output-channel integer grid
                y = tf.reshape(tf.nn.conv2d(tf.reshape(x, [-1, 1, 1, x.shape[-1]]), k, 1, "VALID"), [-1, k.shape[-1]])
            elif isinstance(layer, QDepthwiseConv2D):
                y = tf.nn.depthwise_conv2d(x, k, strides=(1,) + layer.strides + (1,), padding=layer.padding.upper())
            elif id(layer) in self._first and layer.padding == "same":
                y = tf.nn.conv2d(self._pad_with_mean_pixel(x, layer), k, strides=layer.strides, padding="VALID")
            else:
                y = tf.nn.conv2d(x, k, strides=layer.strides, padding=layer.padding.upper())
            return tf.nn.bias_add(y, bias)
        if isinstance(layer, BitBatchNorm):
            x = ev(ins[0])
            if isinstance(_producer(ins[0]), QUANT_LAYERS) and self._folded_bn(_producer(ins[0])) is layer:
                return x  # folded into the conv
            a, b = self._affine[id(layer)]
            return x * a + b
        if isinstance(layer, QReLU):
            src = _producer(ins[0])
            if isinstance(src, tf.keras.layers.MaxPool2D):  # quantize first: the conv writes the grid directly
                return src(self.act_quant(layer, ev(_inputs_of_tensor(ins[0])[0])))
            return self.act_quant(layer, ev(ins[0]))
        if isinstance(layer, QLinear):
            return self.linear_quant(layer, ev(ins[0]))
        if isinstance(layer, (CheckpointedDropout, tf.keras.layers.Dropout)):
            return ev(ins[0])
        args = [ev(t) for t in ins]
        return layer(args if len(args) > 1 else args[0], training=False)


@contextlib.contextmanager
def aligned_biases(model: tf.keras.Model, cfg: Config, normalization=None, int4: bool = True,
                   report: list | None = None):
    """Within the block, ``model`` at ``cfg`` has each folded bias on the TFLite int32 bias grid (module doc), and
    each quantizer written by an integer conv rounds twice as that conv's requantization does
    (``requant_shift``, :class:`tfbitmeta.quant.layers.QReLU`): the Keras model then computes the file's codes.

    A BN-folded layer moves the BN mean of ``cfg``'s slot; a layer without BN moves its own bias (shared by
    every configuration, hence export one configuration per block).  Variables are restored on exit.  ``report``
    collects per layer the largest move in units of the bias step (<= 0.5) and of the BN standard deviation."""
    g = ExportGraph(model, cfg, normalization, int4)
    saved, requants = [], []
    try:
        for layer in model.layers:
            if not isinstance(layer, QUANT_LAYERS):
                continue
            grid = g.bias_grid(layer)
            if grid is None:
                continue
            bias = g._kernels[id(layer)][1].astype(np.float64)
            target = np.round(bias / grid) * grid
            delta = target - bias
            bn = g._folded_bn(layer)
            if bn is not None:
                a, _ = g._bn_affine(bn)
                slot = bn.candidates.slot(g.cfg)
                mean = bn.moving_mean.numpy()
                saved.append((bn.moving_mean, mean.copy()))
                mean[slot] = (mean[slot] - delta / a).astype(np.float32)
                bn.moving_mean.assign(mean)
                var = bn.moving_variance.numpy()[slot]
                moved_std = float(np.max(np.abs(delta / a) / np.sqrt(var + bn.epsilon)))
            elif layer.use_bias:
                saved.append((layer.bias, layer.bias.numpy().copy()))
                layer.bias.assign((layer.bias.numpy() + delta).astype(np.float32))
                moved_std = None
            else:
                continue
            if report is not None:
                report.append({"layer": layer.name, "max_bias_steps": float(np.max(np.abs(delta / grid))),
                               "max_bn_std": moved_std})
        for layer in model.layers:
            if isinstance(layer, QUANT_LAYERS):
                requant = g.requant_shift(layer)
                if requant is not None:
                    target, right = requant
                    shifts = target.requant_shift.copy()
                    shifts[target.candidates.slot(g.cfg)] = right
                    requants.append((target, target.requant_shift))
                    target.requant_shift = shifts
        yield
    finally:
        for var, value in reversed(saved):
            var.assign(value)
        for layer, shifts in reversed(requants):
            layer.requant_shift = shifts
