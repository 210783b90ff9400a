"""Few-shot MEBQAT: Omniglot loader, episodes, ProtoNet distances, CI math, meta-learning lowers the query loss.

Runs on a small synthetic Omniglot written in the official layout (5 alphabets x 6 characters x 20 drawers of
105x105 binary PNGs), so CI needs no data download.
"""
import json
import math
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from tfbitmeta.cli import main
from tfbitmeta.data.episodes import EpisodeSampler, Setting
from tfbitmeta.data.omniglot import load_omniglot, split_alphabets
from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.meta.confidence import mean_ci
from tfbitmeta.meta.fewshot import FewShotConfig, TaskSampler, parse_train_bits, prepare
from tfbitmeta.meta.protonet import proto_loss, prototypes, squared_distances
from tfbitmeta.runs import TrainConfig
from tfbitmeta.quant.bitwidth import FP

ALPHABETS = {"Alpha": 6, "Beta": 6, "Gamma": 6, "Delta": 6, "Epsilon": 6}


def _character(rng):
    """A random 'character': a few thick strokes on a white 105x105 canvas (True = background)."""
    img = np.ones((105, 105), bool)
    for _ in range(3):
        r0, c0 = rng.integers(15, 90, 2)
        if rng.random() < 0.5:
            img[r0:r0 + 8, max(c0 - 25, 5):c0 + 25] = False
        else:
            img[max(r0 - 25, 5):r0 + 25, c0:c0 + 8] = False
    return img


def write_omniglot(root, alphabets=ALPHABETS, drawers=20, set_name="images_background", seed=0):
    rng = np.random.default_rng(seed)
    for alphabet, n in alphabets.items():
        for c in range(1, n + 1):
            base = _character(rng)
            d = root / set_name / alphabet / f"character{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(1, drawers + 1):
                img = np.roll(base, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
                Image.fromarray(img).convert("1").save(d / f"{c:04d}_{k:02d}.png")
    return root


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    return write_omniglot(tmp_path_factory.mktemp("omniglot"))


def _zip(folder, zpath, alphabets):
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            rel = p.relative_to(folder)
            if rel.parts[1] in alphabets:
                zf.write(p, rel.as_posix())


# -- loader ----------------------------------------------------------------------------------------------
def test_loader_shapes_rotations_and_alphabet_split(omni):
    data = load_omniglot(omni, seed=0)
    splits = (data.train, data.val, data.test)
    assert sum(len(s.alphabets) for s in splits) == 5
    for a, b in ((data.train, data.val), (data.train, data.test), (data.val, data.test)):
        assert not set(a.alphabets) & set(b.alphabets)  # classes split by alphabet, never by image
    base = {n for s in (data.val, data.test) for n in s.class_names}
    assert not base & {n.split("@")[0] for n in data.train.class_names}
    assert data.test.images.shape[1:] == (20, 28, 28, 1) and data.test.images.dtype == np.uint8
    assert data.train.num_classes == 4 * 6 * len(data.train.alphabets)  # + 90/180/270 degree rotations
    n = data.train.num_classes // 4
    np.testing.assert_array_equal(data.train.images[n], np.rot90(data.train.images[0], 1, axes=(1, 2)))
    assert data.train.class_names[n] == data.train.class_names[0] + "@rot90"
    assert data.val.num_classes == 6 * len(data.val.alphabets)  # no rotations outside train
    assert data.test.images.mean() < 128 and data.test.images.max() == 255  # strokes bright on black


def test_split_is_seeded_and_documented_fractions():
    sizes = {f"A{i}": 10 + i for i in range(10)}
    s0, s0b, s1 = split_alphabets(sizes, 0, 0.15, 0.25), split_alphabets(sizes, 0, 0.15, 0.25), split_alphabets(sizes, 1, 0.15, 0.25)
    assert s0 == s0b and s0 != s1
    total = sum(sizes.values())
    train, val, test = s0
    assert sum(sizes[a] for a in test) >= 0.25 * total and sum(sizes[a] for a in val) >= 0.15 * total
    assert sorted(train + val + test) == sorted(sizes)


def test_zips_equal_folder_and_duplicates_collapse(omni, tmp_path):
    zdir = tmp_path / "zips"
    zdir.mkdir()
    _zip(omni, zdir / "images_background_small1.zip", {"Alpha", "Beta", "Gamma"})
    _zip(omni, zdir / "images_background_small2.zip", {"Gamma", "Delta", "Epsilon"})  # Gamma in both
    a, b = load_omniglot(omni), load_omniglot(zdir)
    assert a.test.class_names == b.test.class_names
    np.testing.assert_array_equal(a.test.images, b.test.images)
    assert a.train.num_classes == b.train.num_classes


def test_loader_errors(tmp_path):
    with pytest.raises(TfbitmetaError, match="does not exist"):
        load_omniglot(tmp_path / "nope")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.ones((105, 105), bool)).convert("1").save(flat / "0001_01.png")
    with pytest.raises(TfbitmetaError, match="no Omniglot images found.*<set>/<Alphabet>/<characterNN>"):
        load_omniglot(flat)
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(TfbitmetaError, match="not a valid zip"):
        load_omniglot(tmp_path)
    two = write_omniglot(tmp_path / "two", {"A": 3, "B": 3}, drawers=3)
    with pytest.raises(TfbitmetaError, match="at least 3"):
        load_omniglot(two)


def test_cli_missing_data_dir_is_one_line_error(tmp_path):
    r = CliRunner().invoke(main, ["train", "--method", "mebqat-proto", "--dataset", "omniglot", "--data-dir",
                                  str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 1 and "Error: Omniglot folder" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--method", "protonet", "--bits", "4", "--dataset", "digits",
                                  "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 1 and "run on --dataset omniglot" in r.output


# -- episodes --------------------------------------------------------------------------------------------
def test_episode_shapes_labels_and_determinism(omni):
    data = load_omniglot(omni)
    s = Setting(4, 2, 3)
    sampler = EpisodeSampler(data.train.images, s, seed=5)
    ep = sampler.episode(7)
    assert ep.support.shape == (4 * 2, 28, 28, 1) and ep.query.shape == (4 * 3, 28, 28, 1)
    assert ep.support_labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # class-major
    assert ep.query_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(set(ep.classes.tolist())) == 4
    for c in range(4):  # support and query drawings of a class are distinct images of that class
        imgs = data.train.images[ep.classes[c]]
        sup = [int(np.argmax([np.array_equal(x, y) for y in imgs])) for x in ep.support[2 * c:2 * c + 2]]
        qry = [int(np.argmax([np.array_equal(x, y) for y in imgs])) for x in ep.query[3 * c:3 * c + 3]]
        assert not set(sup) & set(qry)
    again = EpisodeSampler(data.train.images, s, seed=5).episode(7)
    np.testing.assert_array_equal(ep.query, again.query)
    assert not np.array_equal(sampler.episode(8).classes, ep.classes) or not np.array_equal(
        sampler.episode(8).support, ep.support)


def test_episode_classes_disjoint_between_splits(omni):
    data = load_omniglot(omni)
    seen = {}
    for split in (data.train, data.val, data.test):
        sampler = EpisodeSampler(split.images, Setting(2, 1, 1), seed=0)
        seen[split.name] = {split.class_names[c].split("@")[0] for i in range(30) for c in sampler.episode(i).classes}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"] and not seen["val"] & seen["test"]


def test_episode_errors(omni):
    data = load_omniglot(omni)
    with pytest.raises(TfbitmetaError, match="20-way episodes need 20 classes"):
        EpisodeSampler(data.test.images, Setting(20, 1, 15), 0, "test")
    with pytest.raises(TfbitmetaError, match="exceed the 20 images"):
        EpisodeSampler(data.test.images, Setting(2, 6, 15), 0, "test")


# -- ProtoNet distances and CI math ---------------------------------------------------------------------
def test_protonet_distances_and_loss_as_specified():
    rng = np.random.default_rng(0)
    ways, shots, queries, dim = 3, 2, 4, 5
    zs = rng.normal(size=(ways * shots, dim)).astype(np.float32)
    zq = rng.normal(size=(ways * queries, dim)).astype(np.float32)
    protos = zs.reshape(ways, shots, dim).mean(1)
    np.testing.assert_allclose(prototypes(zs, ways, shots).numpy(), protos, rtol=1e-6)
    d = np.array([[np.sum((q - p) ** 2) for p in protos] for q in zq])  # squared Euclidean
    np.testing.assert_allclose(squared_distances(zq, protos).numpy(), d, rtol=1e-5)
    y = np.repeat(np.arange(ways), queries)
    logits = -d
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    loss, acc = proto_loss(np.concatenate([zs, zq]), ways, shots, queries)
    assert float(loss) == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)
    assert float(acc) == pytest.approx(np.mean(np.argmin(d, 1) == y))


def test_confidence_interval_math():
    mean, h = mean_ci([0.0, 1.0])
    assert mean == 0.5 and h == pytest.approx(12.7062047 * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)  # t_{.975,1}
    x = np.random.default_rng(0).uniform(size=600)
    mean, h = mean_ci(x)
    assert h == pytest.approx(1.9639 * x.std(ddof=1) / math.sqrt(600), rel=1e-3)  # ~ 1.96 std / sqrt(n)
    assert mean_ci([0.7, 0.7, 0.7]) == (pytest.approx(0.7), pytest.approx(0.0, abs=1e-12))
    assert math.isnan(mean_ci([0.3])[1])
    assert mean_ci([1, 0, 1, 1], level=0.99)[1] > mean_ci([1, 0, 1, 1])[1]


# -- methods: bitwidth tasks ------------------------------------------------------------------------------
def test_task_sampling_per_method():
    maml = TaskSampler(FewShotConfig(method="mebqat-maml", meta_batch=16), seed=0)
    drawn = [tuple(int(v) for v in row) for step in range(40) for row in maml.tasks(step)]
    assert maml.tasks(3).shape == (16, 2) and len(maml.configs) == 73
    assert set(drawn) <= set(maml.configs) and len(set(drawn)) > 60  # each episode its own (w, a)
    np.testing.assert_array_equal(maml.tasks(3), maml.tasks(3))
    proto = TaskSampler(FewShotConfig(method="mebqat-proto", num_tasks=4), seed=0)
    assert proto.tasks(0).shape == (4, 2)
    qat = TaskSampler(FewShotConfig(method="fomaml", meta_batch=4, train_bits=(4,)), seed=0)
    assert qat.tasks(9).tolist() == [[4, 4]] * 4
    assert TaskSampler(FewShotConfig(method="protonet", train_bits=(FP,)), 0).tasks(0).tolist() == [[FP, FP]]
    with pytest.raises(TfbitmetaError, match="one bitwidth"):
        parse_train_bits("protonet", "2,4")
    assert parse_train_bits("mebqat-proto", "all") == (2, 3, 4, 5, 6, 7, 8, 16, FP)


# -- meta-learning lowers the query loss ------------------------------------------------------------------
def _trainer(tmp_path, omni, method, steps, **kw):
    fcfg = FewShotConfig(method=method, data_dir=str(omni), ways=3, shots=1, queries=3, meta_batch=2,
                         inner_steps=2, eval_inner_steps=2, val_episodes=2, steps_per_epoch=steps, **kw)
    tcfg = TrainConfig(method=method, dataset="omniglot", steps=steps, lr=3e-3)
    return prepare(tmp_path / method, tcfg, fcfg, width=0.5, progress=False)


def _mean_query_loss(tr, cfgs, n=8):
    s = Setting(3, 1, 3)
    sampler = EpisodeSampler(tr.data.val.images, s, seed=123)
    losses = []
    for i in range(n):
        ep = sampler.episode(i)
        xs, xq = tr.norm.apply(ep.support), tr.norm.apply(ep.query)
        for cfg in cfgs:
            if tr.fcfg.kind == "maml":
                loss, _ = tr.algo.episode_loss(xs, tf.constant(ep.support_labels), xq, tf.constant(ep.query_labels), cfg)
            else:
                loss, _ = tr.algo.episode_loss(tf.concat([xs, xq], 0), cfg, 3, 1, 3)
            losses.append(float(loss))
    return float(np.mean(losses))


@pytest.mark.parametrize("method", ["mebqat-proto", "mebqat-maml"])
def test_few_meta_steps_lower_the_query_loss(tmp_path, omni, method):
    tr = _trainer(tmp_path, omni, method, steps=30)
    cfgs = [(2.0, 2.0), (4.0, 4.0), (float(FP), float(FP))]
    before = _mean_query_loss(tr, cfgs)
    weights = [v.numpy() for v in tr.model.weights]
    fit = tr.fit()
    after = _mean_query_loss(tr, cfgs)
    assert fit.steps == 30
    print(method, before, after)
    assert after < 0.85 * before, (before, after)
    assert any(not np.array_equal(w, v.numpy()) for w, v in zip(weights, tr.model.weights))


def test_maml_bn_gamma_fixed_and_theta_restored(tmp_path, omni):
    tr = _trainer(tmp_path, omni, "fomaml", steps=3, train_bits=(4,))
    gammas = [m.gamma for m in tr.model.submodules if hasattr(m, "gamma")]
    assert gammas and all(id(g) not in {id(v) for v in tr.algo.outer_vars} for g in gammas)
    assert not {id(m.beta) for m in tr.model.submodules if hasattr(m, "beta")} & {id(v) for v in tr.algo.inner_vars}
    theta = [v.numpy() for v in tr.algo.outer_vars]
    ep = tr.train_episodes.episode(0)
    tr.algo.episode_loss(tr.norm.apply(ep.support), tf.constant(ep.support_labels), tr.norm.apply(ep.query),
                         tf.constant(ep.query_labels), (2.0, 2.0))
    for t, v in zip(theta, tr.algo.outer_vars):
        np.testing.assert_array_equal(t, v.numpy())  # adaptation works on a copy
    tr.fit()
    assert all(np.all(g.numpy() == 1.0) for g in gammas)


# -- CLI end to end ---------------------------------------------------------------------------------------
def test_cli_train_and_evaluate_every_bitwidth_with_ci(tmp_path, omni):
    out = tmp_path / "proto"
    r = CliRunner().invoke(main, ["train", "--method", "mebqat-proto", "--dataset", "omniglot", "--data-dir", str(omni),
                                  "--ways", "3", "--shots", "1", "--steps", "4", "--width", "0.5", "--eval-episodes", "3",
                                  "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "3w1s" in r.output and "±" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(out), "--episodes", "4", "--bits", "2,4,fp", "--setting", "3w1s,2w5s",
                                  "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(x["setting"], x["bits"]) for x in rows] == [(s, b) for s in ("3w1s", "2w5s") for b in ("2", "4", "fp")]
    for x in rows:
        assert 0 <= x["acc"] <= 1 and x["ci95"] >= 0 and x["episodes"] == 4
    assert (out / "accuracy_vs_bits.png").stat().st_size > 0


def test_cli_maml_head_mismatch_and_resume(tmp_path, omni):
    out = tmp_path / "maml"
    args = ["train", "--method", "fomaml", "--bits", "4", "--dataset", "omniglot", "--data-dir", str(omni), "--ways", "3",
            "--steps", "2", "--width", "0.5", "--meta-batch", "1", "--inner-steps", "1", "--eval-episodes", "2",
            "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["evaluate", str(out), "--episodes", "2", "--setting", "2w1s"])
    assert r.exit_code == 1 and "3-way classifier" in r.output
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "--resume" in r.output


def test_protonet_embedding_exports_to_tflite(tmp_path, omni):
    from tfbitmeta.export.convert import analyzer_types
    from tfbitmeta.export.embedding import export_embedding

    tr = _trainer(tmp_path, omni, "protonet", steps=10, train_bits=(4,))
    tr.fit()
    tr.finalize()
    e = export_embedding(tr.run.path, "4", tmp_path / "models", verify_episodes=5, calib_images=256,
                         setting="3w1s", progress=lambda m: None)
    path = tmp_path / "models" / "embedding_4.tflite"
    assert path.exists() and e["bytes"] == path.stat().st_size and e["embedding_dim"] == 8
    assert "INT4" in analyzer_types(path)
    v = e["verify"]
    assert v["prediction_agreement"] >= 0.8, v
    assert abs(v["tflite_acc"] - v["keras_calibrated_acc"]) <= 0.1, v
