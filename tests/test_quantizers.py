"""Quantizer values against numbers computed by hand from docs/quantizers.md ("dorefa", "exact"), and STE gradients."""
import numpy as np
import pytest
import tensorflow as tf

from tfbitmeta.quant.bitwidth import FP
from tfbitmeta.quant.quantizers import SCHEMES, get_scheme, quantize_activation


def f(x):
    return tf.constant(x, tf.float32)


def test_activation_values_2bit():
    x = f([-0.5, 0.2, 0.5, 0.9, 1.7])
    # clip -> [0, .2, .5, .9, 1]; *3 -> [0, .6, 1.5, 2.7, 3]; round half to even -> [0, 1, 2, 3, 3]; /3
    np.testing.assert_allclose(quantize_activation(x, f(2.0)).numpy(), [0, 1 / 3, 2 / 3, 1, 1], atol=1e-6)
    # 1-bit: threshold at 0.5 (round half to even sends 0.5 to 0)
    np.testing.assert_allclose(quantize_activation(x, f(1.0)).numpy(), [0, 0, 0, 1, 1], atol=1e-6)
    # FP is a plain, unclipped ReLU
    np.testing.assert_allclose(quantize_activation(x, f(FP)).numpy(), [0, 0.2, 0.5, 0.9, 1.7], atol=1e-6)


def test_dorefa_weights_by_hand():
    w = np.array([0.5, -0.25, 1.0, 0.0], np.float32)
    e = np.abs(w).mean()  # 0.4375
    t = np.tanh(w) / np.abs(np.tanh(w)).max()
    u = (t + 1) / 2
    q = np.round(u * 3) / 3
    expected2 = (2 * q - 1) * e
    got = get_scheme("dorefa").quantize_weight(f(w), f(2.0), [0]).numpy()
    np.testing.assert_allclose(got, expected2, atol=1e-6)
    # by hand: t = [.6068, -.3216, 1, 0], u = [.8034, .3392, 1, .5], u*3 = [2.41, 1.02, 3, 1.5] -> q = [2, 1, 3, 2]/3
    np.testing.assert_allclose(q, [2 / 3, 1 / 3, 1, 2 / 3], atol=1e-6)
    np.testing.assert_allclose(get_scheme("dorefa").quantize_weight(f(w), f(1.0), [0]).numpy(),
                               np.sign(w) * e, atol=1e-6)
    np.testing.assert_allclose(get_scheme("dorefa").quantize_weight(f(w), f(FP), [0]).numpy(), w)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_exact_weights_are_integer_multiples_of_one_scale_per_channel(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 0.1, size=(3, 3, 4, 6)).astype(np.float32)
    scheme = get_scheme("exact")
    codes, scale = scheme.codes(f(w), f(bits), [0, 1, 2])
    codes, scale = codes.numpy(), scale.numpy()
    m = 1 if bits == 1 else 2 ** (bits - 1) - 1
    assert scale.shape == (1, 1, 1, 6)
    np.testing.assert_array_equal(codes, np.round(codes))
    assert np.abs(codes).max() <= m
    q = scheme.quantize_weight(f(w), f(bits), [0, 1, 2]).numpy()
    np.testing.assert_allclose(q, codes * scale, rtol=1e-6)
    for c in range(6):  # at most 2m+1 levels per output channel
        assert len(np.unique(q[..., c])) <= 2 * m + 1
    if bits == 1:
        np.testing.assert_allclose(scale.ravel(), np.abs(w).mean(axis=(0, 1, 2)), rtol=1e-6)
        assert set(np.unique(codes)) == {-1.0, 1.0}  # sign codes, no zero
    else:
        assert np.abs(codes).max() == m


def test_exact_8bit_close_to_float():
    w = np.random.default_rng(0).normal(0, 0.1, size=(64, 10)).astype(np.float32)
    q = get_scheme("exact").quantize_weight(f(w), f(8.0), [0]).numpy()
    assert np.abs(q - w).max() < np.abs(w).max() / 127


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_weight_ste_gradient(name):
    w = tf.Variable(np.random.default_rng(1).normal(0, 0.1, size=(8, 4)).astype(np.float32))
    for bits in (1.0, 2.0, 4.0, float(FP)):
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(get_scheme(name).quantize_weight(w, f(bits), [0]) * 3.0)
        g = tape.gradient(y, w).numpy()
        assert np.isfinite(g).all() and np.abs(g).sum() > 0
        if name == "dorefa" and bits == 1.0:  # sign(W / E) * E with an identity STE: d/dW = (1 / E) * E = 1
            np.testing.assert_allclose(g, 3.0, rtol=1e-5)
        if name == "exact" and bits > 1.0:  # identity inside the clipping range, zero outside
            assert np.all(np.isclose(g, 0.0) | np.isclose(g, 3.0, rtol=1e-5))
            assert np.isclose(g, 3.0, rtol=1e-5).mean() > 0.5


def test_activation_ste_gradient_inside_unit_interval_only():
    x = tf.Variable([-0.5, 0.2, 0.7, 1.5])
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(quantize_activation(x, f(4.0)))
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 0])


def test_gaussian_clip_ratios_match_the_optimal_uniform_quantizer():
    """r_k = m x the MSE-optimal step of a uniform 2m+1-level quantizer of a unit Gaussian (Max, 1960: step 1.224
    for 3 levels, 0.6508 for 7), increasing with k; entries that are not bit values of the grid are unused."""
    from tfbitmeta.quant.quantizers import gaussian_clip_ratios

    r = gaussian_clip_ratios()
    assert r.shape == (FP + 1,)
    assert abs(r[2] - 1.224) < 0.011 and abs(r[3] - 3 * 0.6508) < 0.011
    assert np.all(np.diff(r[2:17]) > 0) and r[16] < 10
    # each entry is a minimum of the quantization MSE (independent check on a finer sample)
    x = np.random.default_rng(0).normal(size=200_000)
    for k in (2, 4, 6):
        m = 2 ** (k - 1) - 1

        def mse(ratio):
            s = ratio / m
            return np.mean((x - np.clip(np.round(x / s), -m, m) * s) ** 2)
        assert mse(r[k]) <= min(mse(r[k] * 0.9), mse(r[k] * 1.1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exact_scale_and_max_code_by_hand(bits):
    from tfbitmeta.quant.quantizers import Exact, gaussian_clip_ratios

    w = np.random.default_rng(bits).normal(0, 0.1, size=(50, 3)).astype(np.float32)
    w[0, 0] = 1.0  # an outlier in channel 0: clipped at r_k x rms, not at max|w|
    m = 2 ** (bits - 1) - 1
    assert float(Exact.max_code(f(bits))) == m and float(Exact.max_code(f(1.0))) == 1
    rms = np.sqrt(np.mean(w ** 2, axis=0))
    expected = np.minimum(np.abs(w).max(axis=0), gaussian_clip_ratios()[bits] * rms) / m
    codes, scale = get_scheme("exact").codes(f(w), f(bits), [0])
    np.testing.assert_allclose(scale.numpy().ravel(), expected, rtol=1e-5)
    assert np.abs(codes.numpy()).max() == m  # the grid is used to its ends
    np.testing.assert_array_equal(codes.numpy(), np.clip(np.round(w / expected), -m, m))


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_quantizes_activations_the_shared_way(name):
    x = f([-1.0, 0.1, 0.4, 0.75, 3.0])
    for bits in (1.0, 3.0, 8.0, float(FP)):
        np.testing.assert_array_equal(get_scheme(name).quantize_activation(x, f(bits)).numpy(),
                                      quantize_activation(x, f(bits)).numpy())
    with pytest.raises(ValueError, match="unknown quantizer scheme"):
        get_scheme("lsq")
