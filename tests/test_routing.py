"""Routing scores, per-client calibration on validation ID data, and the hybrid-accuracy decomposition (issue 13).
Pure numpy: no TensorFlow, no TFF."""
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.federated import diagnostics as D
from tfbitmeta.federated import routing as R


def test_modules_do_not_import_tensorflow_federated():
    """In a fresh interpreter (this session may already hold TFF from other tests)."""
    code = ("import sys; import tfbitmeta.federated.routing, tfbitmeta.federated.diagnostics; "
            "sys.exit(int('tensorflow_federated' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


# -- scores ------------------------------------------------------------------------------------------------
def test_scores_rank_a_confident_image_above_an_unsure_one():
    logits = np.array([[6.0, 0.0, 0.0], [0.4, 0.3, 0.2]])
    for kind in ("max_softmax", "entropy", "energy"):
        s = R.score(kind, exit_logits=logits)
        assert s[0] > s[1], kind
    assert np.allclose(R.max_softmax(logits), np.exp(logits).max(1) / np.exp(logits).sum(1))
    assert np.allclose(R.energy(logits), np.log(np.exp(logits).sum(1)))


def test_class_posterior_is_the_mass_on_the_client_classes():
    logits = np.log(np.array([[0.5, 0.2, 0.2, 0.1], [0.05, 0.05, 0.6, 0.3]]))
    assert np.allclose(R.class_posterior(logits, [0, 1]), [0.7, 0.1])
    with pytest.raises(TfbitmetaError):
        R.class_posterior(logits, [7])


def test_mahalanobis_uses_a_tied_covariance():
    rng = np.random.default_rng(0)
    # two ID classes elongated along x; an OOD point at the same Euclidean distance along y must score lower
    cov = np.diag([9.0, 0.25])
    a = rng.multivariate_normal([0, 0], cov, 400)
    b = rng.multivariate_normal([10, 0], cov, 400)
    m = R.Mahalanobis.fit(np.concatenate([a, b]), np.repeat([3, 7], 400))
    assert m.classes.tolist() == [3, 7]
    s = m.score(np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]))
    assert s[0] > s[1] > s[2]
    # feature maps are flattened per image, or pooled over space on request
    maps = rng.normal(size=(300, 3, 3, 2))
    labels = np.repeat([0, 1], 150)
    assert R.Mahalanobis.fit(maps, labels).means.shape == (2, 18)
    pooled = R.Mahalanobis.fit(maps, labels, pool=True)
    assert pooled.means.shape == (2, 2) and pooled.score(maps[:5]).shape == (5,)


# -- calibration -------------------------------------------------------------------------------------------
def test_threshold_keeps_the_target_share_of_validation_id_local():
    rng = np.random.default_rng(1)
    val = rng.normal(size=997)
    for keep in (0.5, 0.9, 0.95, 0.99):
        router = R.Router("max_softmax", keep_local=keep).calibrate(val)
        kept = 1 - router.offload(val).mean()
        assert keep <= kept <= keep + 1.5 / len(val), (keep, kept)
    assert R.Router(keep_local=1.0).calibrate(val).offload(val).sum() == 0
    assert R.Router(keep_local=0.0).calibrate(val).offload(val).all()
    with pytest.raises(TfbitmetaError):
        R.Router().offload(val)  # not calibrated


def test_router_threshold_depends_on_validation_id_data_only():
    """Calibration sees the client's validation ID scores and nothing else: OOD data and test data cannot move
    the threshold, and a different validation set does."""
    rng = np.random.default_rng(2)
    val_id = rng.normal(1.0, 1.0, 300)
    r1 = R.Router("posterior", keep_local=0.95).calibrate(val_id)
    # the test set (ID and many OOD images) is only scored, never consulted for the threshold
    test = np.concatenate([rng.normal(1.0, 1.0, 300), rng.normal(-3.0, 1.0, 3000)])
    before = r1.threshold
    r1.offload(test)
    assert r1.threshold == before
    assert R.Router("posterior", keep_local=0.95).calibrate(val_id[::-1].copy()).threshold == before
    assert R.Router("posterior", keep_local=0.95).calibrate(val_id + 0.5).threshold != before


def test_hold_out_validation_is_a_stratified_disjoint_split_of_the_client_data():
    y = np.repeat([2, 5, 9], [50, 30, 1])
    idx = np.arange(len(y)) + 100
    labels = np.concatenate([np.full(100, -1), y])
    train, val = R.hold_out_validation(idx, labels, 0.2, seed=0)
    assert not set(train) & set(val) and set(train) | set(val) == set(idx)
    assert np.bincount(labels[val], minlength=10)[[2, 5, 9]].tolist() == [10, 6, 0]
    assert set(labels[train]) == {2, 5, 9}
    t2, v2 = R.hold_out_validation(idx, labels, 0.2, seed=0)
    assert np.array_equal(v2, val)


# -- diagnostics -------------------------------------------------------------------------------------------
def test_auroc_matches_sklearn_and_orientation():
    rng = np.random.default_rng(3)
    id_s, ood_s = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    ref = roc_auc_score(np.r_[np.ones(150), np.zeros(200)], np.r_[-ood_s, -id_s])
    assert D.auroc(id_s, ood_s) == pytest.approx(ref)
    # hand count, ties one half: OOD {0, 1}, ID {1, 2} -> pairs (0<1, 0<2, 1=1, 1<2) = 3.5 / 4
    assert D.auroc([1.0, 2.0], [0.0, 1.0]) == pytest.approx(0.875)
    assert D.auroc([1.0], []) is None


def test_shortcut_metric_on_a_hand_made_case():
    # client owns classes {0, 1}; six OOD images (classes 4..9) and two ID images
    y = np.array([0, 1, 4, 5, 6, 7, 8, 9])
    is_ood = ~np.isin(y, [0, 1])
    server = np.array([0, 1, 0, 1, 6, 7, 1, 2])  # OOD answers: 0, 1 (own), 6, 7 (right), 1 (own), 2 (other)
    assert D.shortcut_rate(server, is_ood, [0, 1]) == pytest.approx(3 / 6)
    assert D.shortcut_rate(server, np.zeros(8, bool), [0, 1]) is None


def test_decomposition_adds_up_on_a_hand_made_case():
    y = np.array([0, 0, 1, 1, 4, 5, 6, 7])
    is_ood = ~np.isin(y, [0, 1])
    exit_pred = np.array([0, 1, 1, 1, 0, 1, 0, 7])
    server_pred = np.array([0, 0, 0, 1, 4, 1, 6, 0])
    offload = np.array([False, True, True, False, True, True, False, False])
    owner = np.array([0, 0, 1, 1, 4, 5, 6, 7])
    d = D.decompose(y, is_ood, exit_pred, server_pred, offload, [0, 1], owner_server_pred=owner)
    # ID: img0 kept right, img1 offloaded right, img2 offloaded wrong, img3 kept right
    # OOD: img4 offloaded right, img5 offloaded wrong, img6 kept (exit wrong), img7 kept (exit right)
    assert d["counts"] == {"id_local_exit_right": 2, "id_served_server_right": 1,
                           "ood_served_server_right": 1, "ood_local_exit_right": 1}
    assert d["accuracy"] == pytest.approx(5 / 8) == pytest.approx(d["accuracy_from_parts"])
    assert d["ood_recall"] == 0.5 and d["id_false_offload"] == 0.5
    assert d["server_acc_received_ood"] == 0.5 and d["server_acc_all_ood"] == 0.5
    assert d["server_acc_received_id"] == 0.5
    assert d["shortcut"] == 0.5  # img5 -> 1 and img7 -> 0 (own classes)
    assert d["oracle_accuracy"] == pytest.approx((3 + 2) / 8)  # exit right on 3 ID, server right on 2 OOD
    assert d["server_acc_ood_via_owner"] == 1.0
    with pytest.raises(TfbitmetaError):
        D.decompose(y, np.zeros(8, bool), exit_pred, server_pred, offload, [0, 1])


def test_accuracy_at_p_and_across_clients():
    assert D.accuracy_at(0, 0.9, 0.3) == 0.9
    assert D.accuracy_at(1, 0.9, 0.3) == pytest.approx(0.6)
    assert D.accuracy_at(0.5, 0.9, 0.3) == pytest.approx(0.7)
    rows = [{"a": 0.9}, {"a": 0.5}, {"a": None}, {"a": 0.7}]
    assert D.across_clients(rows, "a") == {"mean": pytest.approx(0.7), "worst": 0.5, "worst_client": 1}
    assert D.owners([[0, 1], [1, 2]]) == {0: [0], 1: [0, 1], 2: [1]}


def test_sweep_trades_offload_for_accuracy():
    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(100, int), np.full(100, 5)]
    is_ood = y == 5
    scores = np.where(is_ood, rng.normal(-2, 1, 200), rng.normal(2, 1, 200))
    exit_pred = np.zeros(200, int)
    server_pred = y.copy()
    rows = D.sweep(rng.normal(2, 1, 100), scores, y, is_ood, exit_pred, server_pred, keep_rates=(0.5, 0.9, 1.0))
    offl = [r["offload_ratio"] for r in rows]
    assert offl[0] > offl[1] > offl[2] == 0.0
    assert rows[2]["accuracy"] == 0.5 and rows[1]["accuracy"] > 0.9


def test_client_scores_and_evaluate_client_end_to_end():
    """A synthetic client: two ID classes, features that separate ID from OOD, an exit head confident on
    everything; the calibrated Mahalanobis router finds OOD, max-softmax does not."""
    rng = np.random.default_rng(5)
    ids = np.array([1, 3])
    y_test = np.repeat(np.arange(6), 100)
    centres = rng.normal(0, 4, (6, 8))

    def feats(y):
        return centres[y] + rng.normal(0, 1, (len(y), 8))

    def exit_logits(y):  # confident on one of its two classes, whatever the image
        z = np.full((len(y), 6), -5.0)
        z[np.arange(len(y)), np.where(y == 3, 3, 1)] = 5.0
        return z
    idx, is_ood = D.test_images(y_test, ids, 1.0, seed=0)
    assert is_ood.sum() == (~is_ood).sum() == 200 and not np.isin(y_test[idx][is_ood], ids).any()
    assert len(D.at_fraction(is_ood, 0.5)) == 300
    y = y_test[idx]
    y_tr, y_val = rng.choice(ids, 400), rng.choice(ids, 100)
    val = {"exit_logits": exit_logits(y_val), "features": feats(y_val)}
    test = {"exit_logits": exit_logits(y), "features": feats(y)}
    scores = R.client_scores(["max_softmax", "mahalanobis", "posterior"], id_classes=ids, validation=val, test=test,
                             train={"features": feats(y_tr), "y": y_tr})
    assert set(scores) == {"max_softmax", "mahalanobis"}  # no shared head: no posterior score
    exit_pred = test["exit_logits"].argmax(1)
    server_pred = y.copy()
    # a second client owning every other class, whose server path is always right
    other = np.flatnonzero(~np.isin(y_test, ids))
    owner = D.owner_predictions(y_test, [ids, np.array([0, 2, 4, 5])], [idx, other], [server_pred, y_test[other]])[0]
    assert np.array_equal(owner, y)
    rep = D.evaluate_client(y, is_ood, ids, exit_pred, server_pred, scores, "mahalanobis", 0.95,
                            owner_server_pred=owner)
    assert rep["keep_local_validation"] >= 0.95
    assert rep["scores"]["mahalanobis"]["auroc"] > 0.95 > rep["scores"]["max_softmax"]["auroc"]
    assert rep["p1"]["ood_recall"] > 0.9 and rep["p1"]["accuracy"] > 0.9
    assert rep["p0"]["ood_samples"] == 0 and rep["p1"]["ood_samples"] == rep["p1"]["samples"] // 2
    assert rep["p1"]["server_acc_ood_via_owner"] == 1.0
    summary = D.summarize([rep, rep])
    assert summary["p1"]["accuracy"]["mean"] == pytest.approx(rep["p1"]["accuracy"])
    assert summary["scores"]["mahalanobis"]["auroc"]["worst"] == pytest.approx(rep["scores"]["mahalanobis"]["auroc"])


def test_deferring_own_classes_recovers_false_offloads():
    # two ID images offloaded by mistake: the server names an ID class (wrong one for img1); one OOD image the
    # server gets right, one it maps to an own class (lost either way)
    y = np.array([0, 1, 5, 6])
    is_ood = ~np.isin(y, [0, 1])
    exit_pred = np.array([0, 1, 0, 0])
    server_pred = np.array([0, 0, 5, 1])
    offload = np.ones(4, bool)
    pred, served = R.answer(exit_pred, server_pred, offload, [0, 1], defer_own_classes=True)
    assert pred.tolist() == [0, 1, 5, 0] and served.tolist() == [False, False, True, False]
    plain = D.decompose(y, is_ood, exit_pred, server_pred, offload, [0, 1])
    defer = D.decompose(y, is_ood, exit_pred, server_pred, offload, [0, 1], defer_own_classes=True)
    assert plain["accuracy"] == 0.5 and defer["accuracy"] == 0.75
    assert defer["counts"]["id_local_exit_right"] == 2 and defer["served_ratio"] == 0.25
    assert defer["ood_recall"] == plain["ood_recall"] == 1.0  # routing itself is unchanged


# -- the deployed (compact) Mahalanobis router -------------------------------------------------------------
def _spiked(n=40, d=120, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    x = rng.normal(size=(n, d)) * np.linspace(3.0, 0.2, d) + 4.0 * y[:, None] * rng.normal(size=d)
    return x, y, rng.normal(size=(25, d)) * 2.0


def test_deployed_router_is_exact_at_full_rank_with_fewer_images_than_features():
    """Ledoit-Wolf with n < d: every direction the images do not span has the same variance, so keeping the
    top n components reproduces the full-precision score to float32 accuracy; fewer keep the ranking close."""
    x, y, t = _spiked()
    full = R.Mahalanobis.fit(x, y)
    exact = full.deployed(rank=len(x))
    np.testing.assert_allclose(exact.score(t), full.score(t), rtol=1e-4)
    assert np.corrcoef(full.deployed(rank=8).score(t), full.score(t))[0, 1] > 0.9


def test_deployed_router_survives_its_file_and_rejects_a_bad_one():
    x, y, t = _spiked()
    dep = R.Mahalanobis.fit(x, y).deployed(rank=16)
    buf = dep.to_bytes()
    assert len(buf) == 4 * (3 + 16) * x.shape[1]
    back = R.DeployedMahalanobis.from_bytes(buf, 3, 16, x.shape[1], dep.isotropic)
    np.testing.assert_array_equal(back.score(t), dep.score(t))
    with pytest.raises(TfbitmetaError, match="need"):
        R.DeployedMahalanobis.from_bytes(buf[:-4], 3, 16, x.shape[1], dep.isotropic)
    with pytest.raises(TfbitmetaError, match="non-finite"):
        R.DeployedMahalanobis.from_bytes(np.full(len(buf) // 4, np.nan, "<f4").tobytes(), 3, 16, x.shape[1], 1.0)
    with pytest.raises(TfbitmetaError, match="positive"):
        R.DeployedMahalanobis.from_bytes(buf, 3, 16, x.shape[1], -1.0)
