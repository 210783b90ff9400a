"""Model families and their parts: front end + backend reproduce the full model; bad splits are refused."""
import numpy as np
import pytest
import tensorflow as tf

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.models import ModelConfig, build
from tfbitmeta.quant import BitSpace, bits_tensor
from tfbitmeta.quant.bitwidth import FP

FAMILIES = [("svhn_cnn", (24, 24, 1), 1), ("preact_resnet20", (8, 8, 1), 8), ("mobilenet_v2", (16, 16, 3), 0.25)]


@pytest.mark.parametrize("family,shape,width", FAMILIES)
def test_parts_compose_to_full_model(family, shape, width):
    bm = build(ModelConfig(family=family, input_shape=shape, width=width, candidates=BitSpace((2, 4, FP)),
                           bn_mode="batch", scheme="exact", first_last=8))
    x = tf.constant(np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32))
    split = bm.exits[0]
    for cfg in [(2, 2), (4, 4), (FP, FP)]:
        b = bits_tensor(cfg, 3)
        full = bm.keras([x, b], training=False)
        fe = bm.front_end(split)([x, b], training=False)
        np.testing.assert_allclose(fe["exit"].numpy(), full[f"exit{split}"].numpy(), atol=1e-4)
        logits = bm.backend(split)([fe["features"], b], training=False)
        np.testing.assert_allclose(logits.numpy(), full["logits"].numpy(), atol=1e-4)
        np.testing.assert_allclose(bm.extractor(split)([x, b]).numpy(), fe["features"].numpy(), atol=1e-5)
    # parts share the full model's weights (no copies)
    assert {id(v) for v in bm.backend(split).trainable_variables} <= {id(v) for v in bm.keras.trainable_variables}


def test_configurable_split_and_errors():
    bm = build(ModelConfig(family="svhn_cnn", input_shape=(24, 24, 1), width=1, exits=(2, 5)))
    assert set(bm.keras.output.keys()) == {"exit2", "exit5", "logits"}
    assert bm.feature_shape(5)[-1] == 16
    with pytest.raises(TfbitmetaError, match="exit 3 does not exist"):
        bm.front_end(3)
    with pytest.raises(TfbitmetaError, match="split 9 does not exist"):
        bm.backend(9)
    with pytest.raises(TfbitmetaError, match="at least 24"):
        build(ModelConfig(family="svhn_cnn", input_shape=(8, 8, 1)))
    with pytest.raises(TfbitmetaError, match="unknown model"):
        build(ModelConfig(family="vgg"))


def test_grid_exit_head_keeps_the_layout_and_old_runs_keep_gap():
    """The "grid" exit head (the default of `tfbitmeta train`) max-pools to 3x3 and flattens: its dense layer reads
    9 x C features, and a feature moved across the map changes its answer; "gap" reads C averages, blind to it.  run.json
    written before the field existed loads as "gap"; an unknown kind is refused."""
    from tfbitmeta.meta.train import ModelOptions

    assert ModelOptions().exit_head == "grid"
    heads = {k: build(ModelConfig(family="svhn_cnn", input_shape=(28, 28, 1), width=1, exit_head=k,
                                  candidates=BitSpace((4, FP)), bn_mode="batch")) for k in ("grid", "gap")}
    c = heads["gap"].feature_shape(3)[-1]
    assert heads["gap"].feature_shape(3) == (6, 6, c)
    dense = {k: bm.keras.get_layer("exit3_logits").kernel.shape[0] for k, bm in heads.items()}
    assert dense == {"grid": 9 * c, "gap": c}
    f = np.zeros((2, 6, 6, c), np.float32)
    f[0, 2, 1, :], f[1, 2, 4, :] = 1.0, 1.0  # one feature moved 3 px right (its 3x3 conv response stays inside)
    b = bits_tensor((FP, FP), 2)
    out = {k: bm.exit_head(3)([tf.constant(f), b], training=False).numpy() for k, bm in heads.items()}
    np.testing.assert_allclose(out["gap"][0], out["gap"][1], atol=1e-5)  # the average cannot tell where
    assert np.abs(out["grid"][0] - out["grid"][1]).max() > 1e-3
    d = heads["gap"].cfg.to_dict()
    assert d["exit_head"] == "gap"
    del d["exit_head"]
    assert ModelConfig.from_dict(d).exit_head == "gap"
    with pytest.raises(TfbitmetaError, match="unknown exit head"):
        ModelConfig(exit_head="mean")


def test_svhn_cnn_reference_shape_and_size():
    """ep=2 at the reference's 40x40x3 input: 8 conv/FC layers, ~132k parameters (docs/method.md, "Models")."""
    bm = build(ModelConfig(family="svhn_cnn", input_shape=(40, 40, 3), width=2, exits=()))
    n = sum(int(np.prod(v.shape)) for v in bm.keras.trainable_variables if "gamma" not in v.name and "beta" not in v.name)
    assert 125_000 < n < 140_000


def test_max_pool_shares_tied_gradients_and_matches_keras_elsewhere():
    from tfbitmeta.models.pooling import MaxPool2D

    x = tf.constant(np.array([[1, 1, 0, 2], [0, 1, 3, 3], [5, 0, 0, 0], [0, 0, 0, 0]], np.float32)[None, :, :, None])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = MaxPool2D(2)(x, training=True)
    g = tape.gradient(y, x)[0, :, :, 0].numpy()
    assert np.array_equal(y[0, :, :, 0].numpy(), [[1, 3], [5, 0]])
    np.testing.assert_allclose(g, [[1 / 3, 1 / 3, 0, 0], [0, 1 / 3, 0.5, 0.5], [1, 0, 0.25, 0.25], [0, 0, 0.25, 0.25]])
    z = tf.random.stateless_normal([2, 9, 9, 3], seed=[0, 1])  # no ties: Keras' own gradient, overlapping windows too
    for size, stride in [(2, 2), (3, 2), (4, 2)]:
        grads = []
        for layer, kw in [(MaxPool2D(size, stride), {"training": True}), (tf.keras.layers.MaxPool2D(size, stride), {})]:
            with tf.GradientTape() as tape:
                tape.watch(z)
                out = layer(z, **kw)
                loss = tf.reduce_sum(out * tf.cos(out))
            grads.append((out.numpy(), tape.gradient(loss, z).numpy()))
        np.testing.assert_array_equal(grads[0][0], grads[1][0])
        np.testing.assert_allclose(grads[0][1], grads[1][1], atol=1e-6)
