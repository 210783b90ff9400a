"""Integer-exact reference (tfbitmeta.export.emulate) vs the TFLite interpreter, --verify pass/fail, early-exit
report, weight-only (w2afp) export."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from tfbitmeta.cli import main
from tfbitmeta.export import deployed, emulate


@pytest.fixture(scope="module", params=["grid", "gap"])
def run_1bit(request, tmp_path_factory):
    """A small digits MEBQAT run whose candidates include 1 bit (the session's tiny run has 2, 4, 8, fp), with the
    default grid exit head (max-pool, flatten, dense) and with the global-average one (its MEAN op)."""
    from conftest import train_digits

    out = tmp_path_factory.mktemp("runs") / f"tiny1_{request.param}"
    return train_digits(out, "1,2,4,8,fp", 120, "--exit-head", request.param)


def test_fixed_point_helpers_match_tflite_rounding():
    # QuantizeMultiplier: 0.75 = 0.75 * 2^0 -> Q31 round(0.75 * 2^31); 1.0 -> 0.5 * 2^1
    assert emulate.quantize_multiplier(0.75) == (round(0.75 * 2**31), 0)
    assert emulate.quantize_multiplier(1.0) == (1 << 30, 1)
    # RoundingDivideByPOT rounds ties away from zero
    x = np.array([5, -5, 6, -6, 7, -7])
    np.testing.assert_array_equal(emulate.rounding_divide_by_pot(x, 1), [3, -3, 3, -3, 4, -4])
    # the doubling high mul breaks ties toward +inf (gemmlowp's nudge): -0.5 -> 0, 0.5 -> 1, -2.5 -> -2
    np.testing.assert_array_equal(emulate.saturating_rounding_doubling_high_mul(np.array([-1, 1, -5]), 1 << 30),
                                  [0, 1, -2])
    # x 0.25 = high mul by 0.5 (exact here: even inputs) then one rounding shift; ruy's GEMM output stage breaks
    # that shift's ties toward +inf
    m, s = emulate.quantize_multiplier(0.25)
    assert (m, s) == (1 << 30, -1)
    x2 = 2 * x
    np.testing.assert_array_equal(emulate.multiply_by_quantized_multiplier(x2, m, s), [3, -3, 3, -3, 4, -4])
    np.testing.assert_array_equal(emulate.multiply_by_quantized_multiplier(x2, m, s, ruy=True), [3, -2, 3, -3, 4, -3])


def test_emulation_equals_interpreter_bit_for_bit_at_every_bitwidth_and_exit(run_1bit):
    """Every output of every front end and backend, 1/2/4/8 bit and fp, on the whole digits test set."""
    from tfbitmeta.data import datasets
    from tfbitmeta.runs import RunDir

    run = RunDir(run_1bit)
    bm, norm = run.load_model(), run.normalization()
    data = datasets.load("digits")
    rep_px, rep = norm.pixels(data.x_val[:100]).numpy(), norm.apply(data.x_val[:100]).numpy()
    pixels = norm.pixels(data.x_test).numpy()
    for cfg in [(1, 1), (2, 2), (4, 4), (8, 8), (32, 32)]:
        for split in bm.exits:
            bufs = deployed.deployed_parts(bm, cfg, norm, split, rep_px, rep)
            front = emulate.compare(bufs["front_end"], {"image": pixels})
            back = emulate.compare(bufs["backend"], {"features": front["interpreter"]["features"]})
            for r in (front, back):
                if cfg == (32, 32):  # float files: float64 reference, agreement to float rounding
                    assert not r["integer"]
                    assert all(o["max_abs_diff"] < 1e-4 for o in r["outputs"].values()), r["outputs"]
                    continue
                assert r["integer"] and r["bit_exact"], (cfg, split, r["outputs"])
                for o in r["outputs"].values():
                    assert o["max_code_diff"] == 0 and o["images_differing"] == 0
                    assert o.get("top1_agreement", 1.0) == 1.0
            head_ops = {"MEAN"} if bm.cfg.exit_head == "gap" else {"RESHAPE"}  # global average / flatten
            assert {"CONV_2D", "SOFTMAX", "MAX_POOL_2D"} | head_ops <= set(front["ops"]), front["ops"]


def test_verify_passes_on_the_default_run(exported):
    out, manifest, r = exported
    assert r.exit_code == 0, r.output
    assert "bit-exact" in r.output
    for f in manifest["files"]:
        v = f["verify"]
        assert v["passed"], f
        if f["bits"]["name"] != "fp":
            assert v["integer_reference"]["bit_exact"] and v["weights"]["passed"] and not v["weights"]["unmatched"]


def _tamper(buf: bytes) -> bytes:
    """Negate the codes of the largest integer kernel of a file."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    g = model.subgraphs[0]
    int8 = schema.TensorType.INT8
    cands = [t for t in g.tensors if t.type == int8 and t.shape is not None and len(t.shape) == 4
             and model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data)]
    t = max(cands, key=lambda t: len(model.buffers[t.buffer].data))
    data = np.asarray(model.buffers[t.buffer].data, np.uint8).view(np.int8)
    model.buffers[t.buffer].data = (-data.astype(np.int16)).clip(-127, 127).astype(np.int8).view(np.uint8)
    b = flatbuffers.Builder(0)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_verify_fails_on_a_tampered_file(tiny_run, tmp_path, monkeypatch):
    import tfbitmeta.export.convert as convert

    real = convert.convert_part

    def tampered(part, representative, quantized, float16=False):
        buf = real(part, representative, quantized, float16)
        return _tamper(buf) if quantized and part.kind == "front_end" else buf

    monkeypatch.setattr(convert, "convert_part", tampered)
    r = CliRunner().invoke(main, ["convert", str(tiny_run), "--bits", "8", "--out", str(tmp_path), "--verify",
                                  "--verify-images", "100", "--no-latency"])
    assert r.exit_code == 1, r.output
    assert "verification failed" in r.output and "front_8_exit3.tflite" in r.output
    assert "backend_8_split3.tflite" not in r.output.splitlines()[-1]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    front = next(f for f in manifest["files"] if f["path"] == "front_8_exit3.tflite")
    assert front["verify"]["weights"]["unmatched"]  # the interpreter and the reference agree on the wrong file


def test_exit_report_is_computed():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    final = np.eye(3)[y] * 0.9 + 0.05                      # the full model is always right
    exit_probs = np.full((200, 3), 0.2)
    conf = rng.uniform(0.4, 1.0, 200)
    wrong = conf < 0.6                                     # the exit is wrong exactly when unsure
    pred = np.where(wrong, (y + 1) % 3, y)
    exit_probs[np.arange(200), pred] = conf
    t = deployed.choose_threshold(exit_probs, final, y, max_loss=0.0)
    assert 0.55 <= t <= 0.6 + 1e-9
    rep = deployed.exit_report(exit_probs, final, y, t)
    assert rep["exit_fraction"] == pytest.approx(float(np.mean(conf >= t)))
    assert rep["exit_or_continue_accuracy"] == 1.0 and rep["full_accuracy"] == 1.0 and rep["loss_pp"] == 0.0
    loose = deployed.exit_report(exit_probs, final, y, 0.0)
    assert loose["exit_fraction"] == 1.0 and loose["exit_or_continue_accuracy"] == pytest.approx(1 - np.mean(wrong))


def test_manifest_threshold_is_the_validation_choice_and_the_test_report_recomputes(exported, tiny_run):
    from tfbitmeta.data import datasets
    from tfbitmeta.export.convert import run_tflite
    from tfbitmeta.runs import RunDir

    out, manifest, _ = exported
    norm = RunDir(tiny_run).normalization()
    data = datasets.load("digits")
    px, y = norm.pixels(data.x_test[:200]).numpy(), data.y_test[:200]
    for f in (f for f in manifest["files"] if f["kind"] == "front_end"):
        pol = f["exit_policy"]
        assert f["exit_threshold"] == pol["threshold"] and "validation" in pol["chosen_on"]
        front = run_tflite(out / f["path"], px)
        back = run_tflite(out / f"backend_{f['bits']['name']}_split{f['split']}.tflite", front["features"])
        rep = deployed.exit_report(front["exit_probs"], back["probs"], y, pol["threshold"])
        assert rep["exit_fraction"] == pytest.approx(pol["test"]["exit_fraction"])
        assert rep["exit_or_continue_accuracy"] == pytest.approx(pol["test"]["exit_or_continue_accuracy"])


def test_w2afp_exports_and_verifies(tiny_run, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tiny_run), "--bits", "w2afp", "--out", str(tmp_path), "--verify",
                                  "--verify-images", "100", "--no-latency"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == {"front_w2afp_exit3.tflite", "backend_w2afp_split3.tflite"}
    for f in manifest["files"]:
        assert f["bits"] == {"w": 2, "a": 32, "name": "w2afp"} and f["weight_grid_bits"] == 2
        assert f["verify"]["passed"] and f["verify"]["top1_agreement"] >= 0.995
    # the inner convolutions' float weights lie on a 2-bit grid: at most 3 values per output channel
    prog = emulate.TfliteProgram((tmp_path / "backend_w2afp_split3.tflite").read_bytes())
    kernels = [t.data for t in prog.tensors if t.data is not None and t.dtype == "float32" and len(t.shape) == 4]
    assert any(len(np.unique(k[0])) <= 3 for k in kernels)


def _int8_file(fn, input_shape, seed=0):
    """``fn`` (float ops on one NHWC input) converted to a full-integer file with random representative data."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    rep = rng.normal(size=(64, *input_shape)).astype(np.float32)
    module = tf.Module()
    module.serve = tf.function(fn, input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name="x")])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([rep[i:i + 1]] for i in range(len(rep)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


@pytest.mark.parametrize("kind", ["depthwise", "depthwise_relu", "add", "conv_signed"])
def test_kernels_match_the_interpreter_on_signed_outputs(kind):
    """The kernels a MobileNetV2 uses, on small synthetic files whose outputs are signed (no ReLU hides the rounding of
    negative ties): depthwise conv (depth multiplier 2, stride 2, 'same'), ADD of two tensors on different scales,
    a 1x1 conv; bit for bit at batch 1 and batch 16."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    dw = tf.constant(rng.normal(size=(3, 3, 4, 2)).astype(np.float32))
    k1 = tf.constant(rng.normal(size=(1, 1, 4, 6)).astype(np.float32) * 0.3)
    k2 = tf.constant(rng.normal(size=(1, 1, 4, 6)).astype(np.float32) * 2.0)
    b = tf.constant(rng.normal(size=(6,)).astype(np.float32))
    fns = {
        "depthwise": lambda x: {"y": tf.nn.depthwise_conv2d(x, dw, (1, 2, 2, 1), "SAME")},
        "depthwise_relu": lambda x: {"y": tf.nn.relu(tf.nn.depthwise_conv2d(x, dw, (1, 1, 1, 1), "SAME"))},
        "add": lambda x: {"y": tf.nn.conv2d(x, k1, 1, "VALID") + tf.nn.bias_add(tf.nn.conv2d(x, k2, 1, "VALID"), b)},
        "conv_signed": lambda x: {"y": tf.nn.bias_add(tf.nn.conv2d(x, k2, 1, "VALID"), b)},
    }
    buf = _int8_file(fns[kind], (7, 7, 4))
    prog = emulate.TfliteProgram(buf)
    expected_op = {"depthwise": "DEPTHWISE_CONV_2D", "depthwise_relu": "DEPTHWISE_CONV_2D", "add": "ADD",
                   "conv_signed": "CONV_2D"}[kind]
    assert expected_op in prog.op_types
    x = np.random.default_rng(2).normal(size=(200, 7, 7, 4)).astype(np.float32) * 1.5
    for batch in (1, 16):
        r = emulate.compare(buf, {"x": x}, batch=batch)
        assert r["integer"] and r["bit_exact"], (kind, batch, r["outputs"])


def test_add_on_power_of_two_grids_is_exact_and_rounds_as_qlinear():
    """Two tensors on QLinear grids (scales 2^-4 and 2^-5) added onto a coarser 2^-3 grid: exact ties are common; the
    interpreter, the reference and the Keras QLinear rounding (half away from zero) give the same codes."""
    import tensorflow as tf

    from tfbitmeta.quant.layers import round_half_away

    def grid(x, s):
        return tf.quantization.fake_quant_with_min_max_args(x, min=-128 * s, max=127 * s, num_bits=8)

    k = tf.constant(np.random.default_rng(3).normal(size=(1, 1, 4, 4)).astype(np.float32))
    fn = lambda x: {"y": grid(grid(x, 2 ** -4) + grid(tf.nn.conv2d(x, k, 1, "VALID"), 2 ** -5), 2 ** -3)}  # noqa: E731
    buf = _int8_file(fn, (5, 5, 4))
    x = np.random.default_rng(4).normal(size=(100, 5, 5, 4)).astype(np.float32) * 2
    r = emulate.compare(buf, {"x": x})
    assert r["bit_exact"] and "ADD" in r["ops"], r["outputs"]
    # what the Keras side computes: each operand on its grid (its int8 code from the file), the sum rounded
    prog = emulate.TfliteProgram(buf)
    values = prog.run({"x": x}, keep=True)["_values"]
    add = next(op for op in prog.ops if op[0] == "ADD")
    a, b = (values[i].astype(np.float64) * float(prog.tensors[i].scale[0]) for i in add[1])
    assert {float(prog.tensors[i].scale[0]) for i in add[1]} == {2 ** -4, 2 ** -5}
    want = np.clip(round_half_away(tf.constant((a + b) / 2 ** -3)).numpy(), -128, 127)
    ties = np.mean(np.abs(((a + b) / 2 ** -3) % 1 - 0.5) < 1e-9)
    assert ties > 0.05  # the case the rounding rule decides
    np.testing.assert_array_equal(values[add[2][0]], want)
