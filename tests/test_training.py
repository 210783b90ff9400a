"""The training core: task sampling, loss goes down, and resume after a real kill equals a continuous run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfbitmeta.meta.methods import MEBQAT, AnyPrecision, Dedicated, make_method
from tfbitmeta.runs import TrainConfig
from tfbitmeta.meta.train import ModelOptions, prepare
from tfbitmeta.quant import BitSpace
from tfbitmeta.quant.bitwidth import DEFAULT_BITS, FP


def test_mebqat_tasks_guaranteed_then_uniform():
    m = MEBQAT(BitSpace(DEFAULT_BITS), seed=0, num_tasks=4)
    drawn = []
    for step in range(400):
        t = m.tasks(step)
        assert t.shape == (4, 2)
        assert tuple(t[0]) == (FP, FP) and tuple(t[1]) == (1, 1)
        drawn += [tuple(int(v) for v in row) for row in t[2:]]
    np.testing.assert_array_equal(m.tasks(7), m.tasks(7))  # deterministic per step (resume)
    assert set(drawn) <= set(BitSpace(DEFAULT_BITS).configs)
    assert len(set(drawn)) > 60  # uniform over 75 configurations: 800 draws cover almost all
    assert tuple(MEBQAT(BitSpace((2, 4, FP)), num_tasks=3).tasks(0)[0]) == (FP, FP)
    assert AnyPrecision(BitSpace((2, 4, FP), w_eq_a=True)).num_tasks == 3
    assert Dedicated(BitSpace((4,), w_eq_a=True)).tasks(0).tolist() == [[4, 4]]


@pytest.mark.parametrize("method", ["mebqat", "anyprec", "dedicated"])
def test_few_steps_lower_the_loss(tmp_path, method):
    bits = (4,) if method == "dedicated" else (2, 4, 8, FP)
    run, tr = prepare(tmp_path / method, TrainConfig(method=method, dataset="digits", steps=40, batch_size=64, lr=3e-3),
                      ModelOptions(family="preact_resnet20", width=8, bits=bits, w_eq_a=method != "mebqat"))
    x = tr.norm.apply(tr.splits.x_train[:64])
    y = tf.constant(tr.splits.y_train[:64])
    tasks = tf.constant(tr.method.tasks(0))
    first = float(tf.reduce_mean(tr.train_step(x, y, tasks)[0]))
    for _ in range(25):
        losses, _ = tr.train_step(x, y, tasks)
    assert float(tf.reduce_mean(losses)) < 0.7 * first
    assert tr.train_step.experimental_get_tracing_count() == 1


def _train_cmd(out: Path, *extra):
    return [sys.executable, "-m", "tfbitmeta.cli", "train", "--dataset", "digits", "--steps", "120",
            "--batch-size", "32", "--limit-train", "400", "--bits", "2,4,fp", "--ckpt-every", "10",
            "--seed", "5", "--quiet", "--out", str(out), *extra]


def _variables(ckpt_dir: Path) -> dict:
    reader = tf.train.load_checkpoint(str(ckpt_dir))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "save_counter" not in k}


def test_resume_after_kill_equals_continuous_run(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cont = tmp_path / "continuous"
    subprocess.run(_train_cmd(cont), check=True, env=env, stdout=subprocess.DEVNULL)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "ckpt").glob("ckpt-30.index")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed; make it longer"
    latest = tf.train.latest_checkpoint(str(killed / "ckpt"))
    assert latest is not None and int(latest.rsplit("-", 1)[1]) < 120
    subprocess.run(_train_cmd(killed, "--resume"), check=True, env=env, stdout=subprocess.DEVNULL)

    a, b = _variables(cont / "model"), _variables(killed / "model")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ca, cb = _variables(cont / "ckpt"), _variables(killed / "ckpt")
    for k in ca:  # optimizer state included
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


def test_unknown_method():
    from tfbitmeta.errors import TfbitmetaError

    with pytest.raises(TfbitmetaError):
        make_method("sgd", BitSpace())


def test_exit_distillation_trains_the_exit_and_extractor_never_the_backend():
    """The exits' KL to the final head (default ``exit_distill``) is in the step's loss, and its gradient reaches
    the exit head and the extractor under it only: with plain SGD the backend's update is the same with or without
    it, the exit head's is not."""
    from tfbitmeta.meta.loop import exit_distillation, make_train_step
    from tfbitmeta.models import ModelConfig, build

    final = tf.constant([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    assert float(exit_distillation(final, final)) == pytest.approx(0.0, abs=1e-6)
    exit_logits = tf.Variable([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(final)
        kl = exit_distillation(final, exit_logits)
    assert float(kl) > 0.1
    assert tape.gradient(kl, final) is None and float(tf.reduce_max(tf.abs(tape.gradient(kl, exit_logits)))) > 0

    bm = build(ModelConfig(family="svhn_cnn", input_shape=(24, 24, 1), width=1, candidates=BitSpace((4, FP)),
                           bn_mode="batch", dropout=0.0, exit_head="grid"))
    model, init = bm.keras, bm.keras.get_weights()
    x = tf.constant(np.random.default_rng(0).normal(size=(16, 24, 24, 1)).astype(np.float32))
    y = tf.constant(np.arange(16) % 10, tf.int32)
    tasks = tf.constant([[FP, FP], [4, 4]], tf.float32)

    def update(exit_distill):
        model.set_weights(init)
        step = make_train_step(model, tf.keras.optimizers.SGD(1.0), True, 0.5, 1e6, (24, 24, 1), exit_distill)
        step(x, y, tasks)
        return {v.name: v.numpy() - w for v, w in zip(model.weights, init)}

    plain, distilled = update(0.0), update(1.0)
    backend = {v.name for v in bm.backend(3).trainable_variables}
    exit_head = {v.name for v in bm.exit_head(3).trainable_variables}
    extractor = {v.name for v in bm.extractor(3).trainable_variables}
    assert backend and exit_head and not backend & (exit_head | extractor)
    for name in backend:
        np.testing.assert_allclose(distilled[name], plain[name], atol=1e-6, err_msg=name)
    assert max(float(np.abs(distilled[n] - plain[n]).max()) for n in exit_head) > 1e-4
    assert max(float(np.abs(distilled[n] - plain[n]).max()) for n in extractor) > 1e-6
