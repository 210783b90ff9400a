"""Layers: FP mode equals plain Keras, precision policy, no retrace across bitwidths, serialization, BN."""
import numpy as np
import pytest
import tensorflow as tf

from tfbitmeta.quant import CUSTOM_OBJECTS, BitBatchNorm, BitSpace, QConv2D, QDense, QDepthwiseConv2D, QReLU, bits_tensor
from tfbitmeta.quant.bitwidth import FP
from tfbitmeta.quant.calibration import calibrate_batchnorm, with_bn_statistics
from tfbitmeta.quant.quantizers import get_scheme

X = tf.constant(np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype(np.float32))


@pytest.mark.parametrize("make_q,make_plain,x", [
    (lambda: QConv2D(5, 3, padding="same", use_bias=True), lambda: tf.keras.layers.Conv2D(5, 3, padding="same"), X),
    (lambda: QDepthwiseConv2D(3, padding="same", use_bias=True),
     lambda: tf.keras.layers.DepthwiseConv2D(3, padding="same"), X),
    (lambda: QDense(7), lambda: tf.keras.layers.Dense(7), tf.reshape(X, (4, -1))),
])
def test_fp_mode_equals_plain_keras(make_q, make_plain, x):
    q, plain = make_q(), make_plain()
    y = q([x, bits_tensor((FP, FP), 4)])
    plain(x)
    plain.set_weights(q.get_weights())
    np.testing.assert_allclose(y.numpy(), plain(x).numpy(), atol=1e-5)
    y4 = q([x, bits_tensor((4, 4), 4)])
    assert not np.allclose(y4.numpy(), y.numpy())


def test_fixed_precision_layer_ignores_bits_except_fp_task():
    layer = QDense(3, scheme="exact", precision=8)
    x = tf.ones((2, 5))
    y2 = layer([x, bits_tensor((2, 2), 2)])
    y4 = layer([x, bits_tensor((4, 4), 2)])
    np.testing.assert_allclose(y2.numpy(), y4.numpy())
    k8 = get_scheme("exact").quantize_weight(layer.kernel, tf.constant(8.0), [0])
    np.testing.assert_allclose(y2.numpy(), (x @ k8 + layer.bias).numpy(), atol=1e-6)
    yfp = layer([x, bits_tensor((FP, FP), 2)])
    np.testing.assert_allclose(yfp.numpy(), (x @ layer.kernel + layer.bias).numpy(), atol=1e-6)


def small_model(scheme="exact", mode="calibrated"):
    space = BitSpace((2, 4, 8, FP))
    img, bits = tf.keras.Input((6, 6, 3), name="image"), tf.keras.Input((2,), name="bits")
    h = QConv2D(4, 3, padding="same", scheme=scheme, precision=8, candidates=space)([img, bits])
    h = BitBatchNorm(space, mode=mode)([h, bits])
    h = QReLU(scheme=scheme, candidates=space)([h, bits])
    h = QDepthwiseConv2D(3, padding="same", scheme=scheme, candidates=space)([h, bits])
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    out = QDense(3, scheme=scheme, candidates=space)([h, bits])
    return tf.keras.Model([img, bits], out)


def test_changing_bits_does_not_retrace():
    model = small_model()
    fn = tf.function(lambda x, b: model([x, b], training=True))
    for cfg in [(2, 2), (4, 4), (8, 8), (FP, FP), (4, 8)]:
        fn(X, bits_tensor(cfg, 4))
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_serialization_round_trip(tmp_path, fmt):
    model = small_model("dorefa")
    cfg = model.get_config()
    layer_cfgs = [c["config"] for c in cfg["layers"] if c["class_name"] in CUSTOM_OBJECTS]
    assert len(layer_cfgs) == 5
    assert all(c["candidates"]["bits"] == [2, 4, 8, FP] for c in layer_cfgs)
    assert all(c["scheme"] == "dorefa" for c in layer_cfgs if "scheme" in c)
    path = str(tmp_path / ("m.keras" if fmt == "keras" else "saved"))
    model.save(path)
    loaded = tf.keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS)
    for c in [(2, 2), (4, 4), (FP, FP)]:
        np.testing.assert_allclose(model([X, bits_tensor(c, 4)], training=True).numpy(),
                                   loaded([X, bits_tensor(c, 4)], training=True).numpy(), atol=1e-5)
    rebuilt = tf.keras.Model.from_config(cfg, custom_objects=CUSTOM_OBJECTS)
    assert rebuilt.count_params() == model.count_params()
    # registered with Keras (package "tfbitmeta"): no custom_objects needed, candidates revived as a BitSpace
    reloaded = tf.keras.models.load_model(path)
    assert all(isinstance(layer.candidates, BitSpace) for layer in reloaded.layers if hasattr(layer, "candidates"))
    assert tf.keras.utils.get_registered_name(QConv2D) == "tfbitmeta>QConv2D"
    np.testing.assert_allclose(model([X, bits_tensor((4, 4), 4)], training=True).numpy(),
                               reloaded([X, bits_tensor((4, 4), 4)], training=True).numpy(), atol=1e-5)


def test_calibrated_bn_batch1_equals_batched_and_slots_differ():
    model = small_model()
    images = [tf.constant(np.random.default_rng(i).normal(1.0, 2.0, size=(32, 6, 6, 3)).astype(np.float32))
              for i in range(3)]
    calibrate_batchnorm(model, images, [(2, 2), (4, 4), (8, 8), (FP, FP)])
    bn = [m for m in model.submodules if isinstance(m, BitBatchNorm)][0]
    stats = bn.moving_mean.numpy()
    # the conv before this BN has fixed 8-bit weights: same statistics at 2 and 8 bit, float ones in the FP task
    np.testing.assert_allclose(stats[bn.candidates.slot((2, 2))], stats[bn.candidates.slot((8, 8))])
    assert not np.allclose(stats[bn.candidates.slot((2, 2))], stats[bn.candidates.slot((FP, FP))])
    # the calibrated mean is the mean of the per-batch means
    x8 = bits_tensor((8, 8), 32)
    conv = model.layers[2]
    expect = np.mean([tf.reduce_mean(conv([im, x8]), axis=(0, 1, 2)).numpy() for im in images], axis=0)
    np.testing.assert_allclose(stats[bn.candidates.slot((8, 8))], expect, rtol=1e-4, atol=1e-5)
    x = images[0][:8]
    for cfg in [(2, 2), (4, 4), (FP, FP)]:
        batched = model([x, bits_tensor(cfg, 8)], training=False).numpy()
        single = np.concatenate([model([x[i:i + 1], bits_tensor(cfg, 1)], training=False).numpy() for i in range(8)])
        np.testing.assert_allclose(single, batched, atol=1e-5)
    # the reference's batch-statistics BN cannot run batch-1: a single image normalizes to beta
    batch_bn = with_bn_statistics(model, "batch")
    batched = batch_bn([x, bits_tensor((4, 4), 8)], training=False).numpy()
    single = np.concatenate([batch_bn([x[i:i + 1], bits_tensor((4, 4), 1)], training=False).numpy() for i in range(8)])
    assert not np.allclose(single, batched, atol=1e-3)
    # the twin shares the variables and leaves the model's own statistics alone
    assert {id(v) for v in batch_bn.weights} == {id(v) for v in model.weights}
    assert all(layer.mode == "calibrated" for layer in model.layers if isinstance(layer, BitBatchNorm))
    calibrated_twin = with_bn_statistics(model, "calibrated")
    assert calibrated_twin is model


def test_batch_statistics_twin_equals_training_mode_normalization():
    """The "batch" twin normalizes like training mode (batch statistics) and a function traced on it stays so."""
    model = small_model()
    twin = with_bn_statistics(model, "batch")
    fn = tf.function(lambda x, b: twin([x, b], training=False))
    for cfg in [(2, 2), (FP, FP)]:
        np.testing.assert_allclose(fn(X, bits_tensor(cfg, 4)).numpy(),
                                   model([X, bits_tensor(cfg, 4)], training=True).numpy(), atol=1e-6)
    assert not np.allclose(model([X, bits_tensor((2, 2), 4)], training=False).numpy(),
                           fn(X, bits_tensor((2, 2), 4)).numpy(), atol=1e-3)
