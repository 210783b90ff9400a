"""Hybrid split federated learning (issue 4) on digits: few clients, 1-2 rounds, plain-TF and TFF engines."""
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from tfbitmeta.cli import main
from tfbitmeta.federated import partition, strategy
from tfbitmeta.federated.simulation import SimConfig, Simulation

SMALL = dict(dataset="digits", clients=3, classes_per_client=3, local_steps=3, batch_size=16, seed=0)


def small(**kw):
    return SimConfig(**{**SMALL, **kw})


def bank_close(a, b, tol):
    return all(np.allclose(a[k], b[k], atol=tol) for k in a)


# -- training --------------------------------------------------------------------------------------------
def test_one_round_lowers_the_loss():
    sim = Simulation(small(engine="tf", local_steps=8), progress=False)
    before = sim.loss()
    sim.run_round(0)
    after = sim.loss()
    assert after["exit_ce"] < before["exit_ce"] - 0.05, (before, after)
    assert after["server_ce"] < before["server_ce"], (before, after)


def test_tff_round_equals_plain_tf_round():
    """The TFF computations compute the same round as the plain-TF loop (same seed, same batches)."""
    banks, servers = [], []
    for engine in ("tf", "tff"):
        sim = Simulation(small(engine=engine, local_steps=2), progress=False)
        sim.run_round(0)
        banks.append(sim.global_bank)
        servers.append(sim.server_w)
        sim.executor.close()
    assert bank_close(banks[0], banks[1], 1e-4)
    assert bank_close(servers[0], servers[1], 1e-4)
    assert not bank_close(banks[0], Simulation(small(engine="tf"), progress=False).global_bank, 1e-4)


# -- what the server sees --------------------------------------------------------------------------------
def _server_received(algorithm):
    sim = Simulation(small(engine="tff", algorithm=algorithm, local_steps=1), progress=False)
    sim.run_round(0)
    sim.executor.close()
    arrays = [a for call in sim.executor.server_inputs for a in call[1:]]
    return sim, arrays


def test_labels_never_reach_the_server_in_the_default_mode():
    sim, arrays = _server_received("harmony")
    assert arrays and all(np.asarray(a).dtype == np.float32 for a in arrays)
    calls = {c[0] for c in sim.executor.server_inputs}
    assert calls == {"server_logits", "server_update"}
    # the server computations' declared inputs: float features and float logit gradients only
    for name in ("server_logits", "server_update"):
        sig = str(sim.executor.comps[name].type_signature.parameter)
        assert "int32" not in sig and "int64" not in sig, sig
    # the features of one client are not its labels in disguise: shape (2 views, Q, h, w, 16)
    assert np.asarray(arrays[0]).shape[1:3] == (2, SMALL["batch_size"])


def test_splitgp_baseline_does_send_labels():
    """Control for the test above: the SplitGP exchange hands the labels to a server computation."""
    sim, arrays = _server_received("splitgp")
    assert any(np.asarray(a).dtype.kind == "i" for a in arrays)
    assert "int32" in str(sim.executor.comps["server_label_gradients"].type_signature.parameter)


# -- aggregation -----------------------------------------------------------------------------------------
def test_heterofl_average_on_hand_made_weights():
    g = OrderedDict(w=np.array([1.0, 1.0, 1.0, 1.0], np.float32))
    a = OrderedDict(w=np.array([3.0, 5.0, 0.0, 0.0], np.float32))       # a narrow client: holds w[:2]
    b = OrderedDict(w=np.array([7.0, 9.0, 11.0, 0.0], np.float32))      # a wider one: holds w[:3]
    ma = OrderedDict(w=np.array([1, 1, 0, 0], np.float32))
    mb = OrderedDict(w=np.array([1, 1, 1, 0], np.float32))
    out = strategy.heterofl_average(g, [a, b], [ma, mb], [np.int32(10), np.int32(30)])
    # w0: (10*3 + 30*7)/40 = 6; w1: (10*5 + 30*9)/40 = 8; w2: only b holds it -> 11; w3: nobody -> unchanged 1
    np.testing.assert_allclose(np.asarray(out["w"]), [6.0, 8.0, 11.0, 1.0], rtol=1e-6)
    # a client whose update is not finite is left out
    bad = OrderedDict(w=np.array([np.nan, 5.0, 0.0, 0.0], np.float32))
    out = strategy.heterofl_average(g, [bad, b], [ma, mb], [np.int32(10), np.int32(30)])
    np.testing.assert_allclose(np.asarray(out["w"]), [7.0, 9.0, 11.0, 1.0], rtol=1e-6)


def test_personal_heads_stay_and_shared_heads_average():
    harmony = Simulation(small(engine="tf", local_steps=1), progress=False)
    fedavg = Simulation(small(engine="tf", algorithm="fedavg", local_steps=1), progress=False)
    for sim in (harmony, fedavg):
        sim.run_round(0)
    heads = [s["head"]["kernel"] for s in harmony.states]
    assert not np.allclose(heads[0], heads[1])
    heads = [s["head"]["kernel"] for s in fedavg.states]
    assert all(np.allclose(h, heads[0]) for h in heads) and np.allclose(heads[0], fedavg.global_head["kernel"])


# -- inference rule --------------------------------------------------------------------------------------
def test_early_exit_and_fallback_accounting():
    sim = Simulation(small(engine="tf"), progress=False)
    sim.run_round(0)
    x = sim.x_test[:50]
    pred, off, exit_pred, server_pred = sim.predict(0, x, threshold=0.0)
    assert not off.any() and (pred == exit_pred).all()
    pred, off, exit_pred, server_pred = sim.predict(0, x, threshold=1.01)
    assert off.all() and (pred == server_pred).all()
    pred, off, exit_pred, server_pred = sim.predict(0, x, threshold=0.3)
    np.testing.assert_array_equal(pred, np.where(off, server_pred, exit_pred))
    assert 0 < off.sum() < len(x) or off.sum() in (0, len(x))
    results = sim.evaluate()
    c = results["clients"][0]
    assert c["p0"]["samples"] < c["p1"]["samples"] <= 2 * c["p0"]["samples"]
    assert 0.0 <= c["p1"]["offload_ratio"] <= 1.0
    lat = results["latency_model"]
    assert c["p1"]["latency_ms"] >= c["p0"]["latency_ms"] - 1e-9 or c["p1"]["offload_ratio"] < c["p0"]["offload_ratio"]
    assert lat["rtt_ms"] > 0


# -- data ------------------------------------------------------------------------------------------------
def test_shards_and_ood_split():
    y = np.repeat(np.arange(10), 50)
    parts = partition.shards(y, num_clients=6, classes_per_client=2, seed=3)
    for p in parts:
        assert len(p.id_classes) == 2 and set(np.unique(y[p.train])) == set(p.id_classes)
    all_idx = np.concatenate([p.train for p in parts])
    assert len(all_idx) == len(np.unique(all_idx))                   # no example given to two clients
    y_test = np.repeat(np.arange(10), 20)
    for p_ood in (0.0, 0.5, 1.0):
        idx, is_ood = partition.test_indices(y_test, parts[0].id_classes, p_ood, seed=1)
        id_idx = idx[~is_ood]
        assert set(id_idx) == set(np.flatnonzero(np.isin(y_test, parts[0].id_classes)))  # every ID test sample
        assert is_ood.sum() == round(p_ood * len(id_idx))
        assert not np.isin(y_test[idx[is_ood]], parts[0].id_classes).any()
    with pytest.raises(Exception, match="classes"):
        partition.shards(y, num_clients=2, classes_per_client=11, seed=0)


# -- faults ----------------------------------------------------------------------------------------------
def test_dropout_round_completes_with_the_rest():
    sim = Simulation(small(engine="tf", clients=4, dropout=0.5, local_steps=1), progress=False)
    recs = [sim.run_round(r) for r in range(6)]
    assert all(r["participants"] + r["dropped"] == 4 for r in recs)
    assert any(0 < r["dropped"] for r in recs) and any(r["participants"] > 0 for r in recs)


@pytest.mark.parametrize("engine", ["tf", "tff"])
def test_nan_update_is_rejected_and_state_stays_finite(engine):
    sim = Simulation(small(engine=engine, local_steps=2), progress=False)
    clean = sim._batch

    def poisoned(k):
        b = clean(k)
        if k == 0:
            b["x_q"] = np.full_like(b["x_q"], np.nan)
            b["x_s"] = np.full_like(b["x_s"], np.nan)
        return b
    sim._batch = poisoned
    rec = sim.run_round(0)
    sim.executor.close()
    assert rec["rejected_updates"] >= 2, rec                 # client 0's steps, at the client and at the server
    for tree in (sim.global_bank, sim.server_w, *[s["head"] for s in sim.states]):
        assert all(np.isfinite(v).all() for v in tree.values())
    assert sim.history[-1]["exit_loss"] == sim.history[-1]["exit_loss"]  # the healthy clients' loss is a number


# -- CLI -------------------------------------------------------------------------------------------------
def _stray_workers():
    """Orphaned worker_binary processes: their Python parent is gone (re-parented to init or a subreaper)."""
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if "worker_binary" not in " ".join(p.info["cmdline"] or []):
                continue
            parent = p.parent()
            if parent is None or parent.pid == 1 or "python" not in " ".join(parent.cmdline()).lower():
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_simulate_cli_end_to_end_leaves_no_worker(tmp_path):
    """Runs the real command with its output piped (an orphaned worker would hold the pipe open and hang)."""
    out = tmp_path / "sfl"
    cmd = [sys.executable, "-m", "tfbitmeta.cli", "simulate", "--dataset", "digits", "--clients", "3",
           "--classes-per-client", "3", "--rounds", "2", "--local-steps", "2", "--batch-size", "16",
           "--architectures", "cnn-w1,cnn-w05,mobilenet", "--bits", "2,4,8", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mean" in r.stdout and "offload p=1" in r.stdout
    assert (out / "results.json").exists() and (out / "results.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["bank.npz", "client0.npz", "client1.npz",
                                                                       "client2.npz", "server.npz"]
    assert _stray_workers() == []
    # `tfbitmeta convert` accepts the run: every client's front end + the backend, verified against the simulation
    models = tmp_path / "models"
    r = CliRunner().invoke(main, ["convert", str(out), "--out", str(models), "--verify"])
    assert r.exit_code == 0, r.output
    import json

    from tfbitmeta.export.convert import validate_manifest

    manifest = json.loads((models / "manifest.json").read_text())
    validate_manifest(manifest)
    fronts = [f for f in manifest["files"] if f["kind"] == "front_end"]
    assert [f["architecture"] for f in fronts] == ["cnn-w1", "cnn-w05", "mobilenet"]
    assert [f["bits"]["w"] for f in fronts] == [2, 4, 8]
    assert all(f["verify"]["passed"] and f["verify"]["features_equal_fraction"] == 1.0 for f in fronts)


@pytest.mark.parametrize("args,message", [
    (["--algorithm", "fedprox"], "Invalid value for '--algorithm'"),
    (["--classes-per-client", "11"], "the dataset has 10 classes"),
    (["--bits", "2,16"], "client bitwidths must come from 1-8 and fp"),
    (["--bits", "9"], "bitwidth"),
    (["--architectures", "resnet"], "unknown architecture 'resnet'"),
])
def test_simulate_bad_input(tmp_path, args, message):
    r = CliRunner().invoke(main, ["simulate", "--dataset", "digits", "--clients", "2", "--rounds", "1",
                                  "--engine", "tf", "--out", str(tmp_path / "x"), "--quiet", *args])
    assert r.exit_code != 0
    assert message in r.output, r.output


# -- scale-out -------------------------------------------------------------------------------------------
def test_two_workers_give_the_same_round_as_one(tmp_path):
    """Two worker_binary processes on 127.0.0.1 (TFF's mergeable-comp context) compute the same round."""
    import socket
    import time

    import tensorflow_federated as tff

    binary = os.path.join(os.path.dirname(tff.__file__), "data", "worker_binary")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    procs = [subprocess.Popen([binary, f"--port={p}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in ports]
    try:
        results = []
        for workers in ([], [f"127.0.0.1:{p}" for p in ports]):
            sim = Simulation(small(engine="tff", workers=workers, local_steps=2), progress=False)
            t0 = time.perf_counter()
            rec = sim.run_round(0)
            sim.executor.close()
            results.append((rec, sim.global_bank, sim.server_w, [s["head"] for s in sim.states], time.perf_counter() - t0))
        (r1, bank1, srv1, heads1, _), (r2, bank2, srv2, heads2, _) = results
        assert r1["server_ce"] == pytest.approx(r2["server_ce"], abs=1e-6)
        assert r1["exit_loss"] == pytest.approx(r2["exit_loss"], abs=1e-6)
        assert bank_close(bank1, bank2, 1e-6) and bank_close(srv1, srv2, 1e-6)
        assert all(bank_close(a, b, 1e-6) for a, b in zip(heads1, heads2))   # client order preserved
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_unreachable_worker_is_a_clear_error():
    with pytest.raises(Exception, match="no TFF worker answers at 127.0.0.1:9"):
        from tfbitmeta.federated import executors
        import tensorflow_federated as tff
        executors._set_remote_context(tff, ["127.0.0.1:9"], wait_seconds=1.0)
