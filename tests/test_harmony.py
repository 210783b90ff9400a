"""What the server trains on carries no client signature; deployment fine-tuning; the issue-13 report on a tiny
run (digits, 3 clients).  docs/harmony.md."""
from collections import OrderedDict

import numpy as np
import pytest
import tensorflow as tf

from tfbitmeta.federated import algorithms as AL
from tfbitmeta.federated.client import ClientWork
from tfbitmeta.federated.server import ServerWork
from tfbitmeta.federated.simulation import SimConfig, Simulation

SMALL = dict(dataset="digits", clients=3, classes_per_client=3, local_steps=2, batch_size=16, seed=0, engine="tf")


class RecordingServer(ServerWork):
    """Test double: remembers every feature batch the server's update trains on."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches = []

    def update(self, weights, feats, dlogits, lr_scale):
        self.batches.append((np.array(feats), np.array(dlogits)))
        return super().update(weights, feats, dlogits, lr_scale)


@pytest.fixture(scope="module")
def sim():
    s = Simulation(SimConfig(algorithm="harmony", **SMALL), progress=False)
    yield s
    s.process.close()


def _step(sim, server, head, y, x, sim_arch):
    alg = sim.alg
    cw = ClientWork(sim.space, server, alg, 0.05, 0.05)
    sp = sim.space
    bank = OrderedDict((k, tf.constant(v)) for k, v in sim.state["bank"].items())
    sw = OrderedDict((k, tf.constant(v)) for k, v in sim.state["server"].items())
    tasks = tf.constant([[4.0, 4.0], [8.0, 8.0]])
    cw.step(bank, OrderedDict((k, tf.constant(v)) for k, v in head.items()), sw, tf.constant(x), tf.constant(y),
            tf.constant(0), tasks, tf.constant(sim_arch), tf.constant([2.0, 2.0]))
    assert sp is sim.space


def test_no_client_signature_reaches_the_server_training_batch(sim):
    """Two clients that differ in everything personal (exit head, labels) send the server the same training
    batch for the same images and the same sampled view, and the server's cross-entropy ignores the client's own
    view: what the server learns from depends on the shared extractor, the image and a client-independent view."""
    rng = np.random.default_rng(0)
    x = sim.x_train[rng.choice(len(sim.x_train), 16)]
    head_a = {k: np.asarray(v) for k, v in sim.state["head"].items()}
    head_b = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in head_a.items()}
    y_a, y_b = rng.integers(0, 10, 16).astype(np.int32), rng.integers(0, 10, 16).astype(np.int32)
    servers = []
    for head, y in ((head_a, y_a), (head_b, y_b)):
        srv = RecordingServer(sim.space, 0.05, sim.alg.contrastive, sim.alg.temperature)
        _step(sim, srv, head, y, x, sim_arch=len(sim.archs) - 1)
        servers.append(srv)
    (fa, da), (fb, db) = servers[0].batches[0], servers[1].batches[0]
    np.testing.assert_array_equal(fa, fb)           # the server's inputs: identical features
    assert not np.allclose(da, db)                  # (the labels did differ: the gradients show it)
    assert np.all(da[0] == 0) and np.all(db[0] == 0)  # no cross-entropy on the client's own view
    assert np.abs(da[1]).sum() > 0


def test_sampled_views_are_balanced_and_independent_of_the_client(sim):
    """The view the server's cross-entropy trains on is drawn uniformly from architectures x bitwidths for every
    client, whatever its own architecture."""
    counts = np.zeros((sim.cfg.clients, len(sim.archs)))
    bits = np.zeros((sim.cfg.clients, len(sim.bit_choices)))
    state = sim.rng.bit_generator.state
    for _ in range(400):
        for k in range(sim.cfg.clients):
            d = sim._data(k)
            counts[k] += np.bincount(d["sim"], minlength=len(sim.archs))
            bits[k] += [(d["sim_bits"][:, 0] == b).sum() for b in sim.bit_choices]
    sim.rng.bit_generator.state = state
    share = counts / counts.sum(1, keepdims=True)
    assert np.all(np.abs(share - 1 / len(sim.archs)) < 0.08), share  # > 5 sigma at 800 draws
    bshare = bits / bits.sum(1, keepdims=True)
    assert np.all(np.abs(bshare - 1 / len(sim.bit_choices)) < 0.08), bshare


def test_harmony_components_are_parameters_and_deployment_ablations_train_the_same():
    h = AL.get("harmony")
    assert not h.share_head and h.lam_head == 1.0 and h.share_bank and not h.labels_to_server  # personal heads
    assert (h.router, h.keep_local, h.finetune_head, h.defer_own_classes) == ("mahalanobis", 0.95, False, False)
    shared = AL.get("harmony-shared-head")
    assert shared.share_head and shared.finetune_head and not AL.same_training(shared, h)
    variants = {n: AL.deployment_variants(n) for n in ("harmony", "harmony-shared-head")}
    assert variants == {"harmony": ["harmony-max-softmax", "harmony-defer"],
                        "harmony-shared-head": ["harmony-posterior", "harmony-no-finetune"]}
    for base, names in variants.items():
        for name in names:
            a = AL.get(name)
            assert AL.same_training(a, AL.get(base)) and a != AL.get(base), name
    assert not AL.same_training(AL.get("harmony-no-contrastive"), h)
    assert AL.deployment_variants("splitgp") == []
    s = AL.get("splitgp")
    assert s.router == "max_softmax" and s.keep_local is None and s.labels_to_server


def test_fine_tuning_the_head_lowers_the_client_loss_and_leaves_the_shared_path(sim, monkeypatch):
    from tfbitmeta.federated.personalize import fine_tune_head

    monkeypatch.setattr(sim, "alg", AL.get("harmony-shared-head"))  # the variant that fine-tunes at deployment
    monkeypatch.setattr(sim, "_personal_heads", {}, raising=False)
    k = 0
    bank, head = sim.deployed_weights(k, personal=False)
    tr = sim.parts[k].train
    x, y = sim.x_train[tr], sim.y_train[tr]
    own = np.array([sim.client_bits[k]] * 2, np.float32)
    cands = [np.array([b, b], np.float32) for b in sim.bit_choices]
    i = sim.client_arch[k]

    def loss(h):
        f = sim.space.extract(i, bank, tf.constant(x[:64]), tf.constant(own))
        lo = sim.space.exit_logits(h, f, tf.constant(own))
        return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y[:64], lo))), f.numpy()
    tuned = fine_tune_head(sim.space, i, bank, head, x, y, own, cands, steps=30, lr=0.05, batch_size=16, seed=0)
    (l0, f0), (l1, f1) = loss(head), loss(tuned)
    assert l1 < l0 - 0.05, (l0, l1)
    np.testing.assert_allclose(f0, f1)  # the features (server path) do not depend on the personal head
    assert set(tuned) == set(head)
    # what the client deploys is that fine-tuned head (with the simulation's steps), the bank unchanged
    b2, deployed = sim.deployed_weights(k)
    assert all(np.array_equal(b2[n], bank[n]) for n in bank)
    assert not all(np.allclose(deployed[n], head[n]) for n in head)


def test_report_routes_with_a_threshold_from_validation_id_data_only(sim):
    """The held-out validation images are ID images of the client and never training draws; the router's
    threshold is the quantile of their scores; the report decomposes exactly."""
    from tfbitmeta.federated import report
    from tfbitmeta.federated import routing as R

    validation = []
    for k, part in enumerate(sim.parts):
        part.train, val = R.hold_out_validation(part.train, sim.y_train, 0.2, 1000 + k)
        validation.append(val)
        assert np.isin(sim.y_train[val], part.id_classes).all() and not set(val) & set(part.train)
        drawn = np.concatenate([sim._data(k)["x"].reshape(-1, *sim.x_train.shape[1:]) for _ in range(3)])
        assert not any((sim.x_train[val][None] == d[None, None]).all(axis=(2, 3, 4)).any() for d in drawn[:20])
    sim.run_round(0)
    col = report.collect(sim, validation)
    rep = report.route(sim, col, "mahalanobis", keep_local=0.9, defer_own_classes=True)
    for k, c in enumerate(rep["clients"]):
        val_scores = col["clients"][k]["scores"]["mahalanobis"][0]
        assert len(val_scores) == len(validation[k])
        assert c["threshold"] == R.calibrate_threshold(val_scores, 0.9)
        assert c["keep_local_validation"] >= 0.9
        d = c["p1"]
        assert d["accuracy"] == pytest.approx(d["accuracy_from_parts"])
        assert 0 <= d["shortcut"] <= 1 and d["ood_samples"] == d["samples"] // 2
    assert set(rep["summary"]["scores"]) >= {"max_softmax", "energy", "mahalanobis"}
    al = report.alignment(sim, n_images=64)
    assert -1 <= al["other_image_cosine"] <= 1 and -1 <= al["same_image_cosine"] <= 1
    assert 0 <= al["server_label_agreement_across_architectures"] <= 1


def test_stored_runs_are_named_by_what_they_measured():
    """The benchmark's merge names a stored run by the algorithm it recorded: after a default changed (deferral,
    now off), the old "harmony" run is "harmony-defer" and the old "harmony-no-defer" run is today's "harmony";
    a run no name describes keeps its name and the table says how it was deployed."""
    import importlib.util
    from dataclasses import replace
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_harmony",
                                                  Path(__file__).parents[1] / "tools" / "bench_harmony.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def stored(base, **kw):
        return [{"algorithm": replace(AL.get(base), **kw).to_dict()}]
    assert bench.current_name("harmony", stored("harmony", defer_own_classes=True)) == "harmony-defer"
    assert bench.current_name("harmony-no-defer", stored("harmony", name="harmony-no-defer")) == "harmony"
    assert bench.current_name("harmony", stored("harmony")) == "harmony"
    old = stored("harmony-no-contrastive", defer_own_classes=True)
    assert bench.current_name("harmony-no-contrastive", old) == "harmony-no-contrastive"
    assert bench.deployment_difference("harmony-no-contrastive", old) == {"defer_own_classes": True}
    assert bench.deployment_difference("harmony", stored("harmony")) == {}
