"""The issue-13 report of a simulation (docs/harmony.md, "Diagnostics"): per client, the arrays the device would
compute on its validation ID images and on its test images, routed and decomposed by
:mod:`~tfbitmeta.federated.routing` and :mod:`~tfbitmeta.federated.diagnostics`.

Everything is computed with the deployable models: each front end's per-bitwidth BatchNorm calibrated on the
client's own training images (as ``Simulation.finalize`` does), the server backend's on features from every
client.  Per client:

* the *personal path* (its exit head on its extractor, fine-tuned at deployment when the algorithm does) gives
  the local answers and the exit-head scores;
* the *shared path* (the aggregated extractor; with a shared head, that head) gives the features the server
  reads, the Mahalanobis statistics and the federated class posterior.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfbitmeta.federated import diagnostics as D
from tfbitmeta.federated import routing as R
from tfbitmeta.federated.latency import LatencyModel
from tfbitmeta.quant.bitwidth import FP
from tfbitmeta.quant.calibration import calibrate_batchnorm

SCORE_KINDS = ("max_softmax", "energy", "mahalanobis", "posterior")
OOD_FRACTIONS = (0.0, 0.5, 1.0)


def _bits(b) -> np.ndarray:
    return np.array([float(b), float(b)], np.float32)


def _run(model, x, bits, batch: int = 500) -> dict:
    out = {"exit_logits": [], "features": []}
    b = _bits(bits)
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        o = model([xb, np.tile(b, (len(xb), 1))], training=False)
        out["exit_logits"].append(o["exit"].numpy())
        out["features"].append(o["features"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def front_arrays(sim, k: int, bank: dict, head: dict, images: dict) -> dict:
    """Client k's front end with ``(bank, head)``, BatchNorm calibrated at its bitwidth on its own training images,
    run on each named image set: ``{name: {"exit_logits", "features"}}``."""
    sp, i, b = sim.space, sim.client_arch[k], sim.client_bits[k]
    sp.client_model(i, bank, head)
    calibrate_batchnorm(sp.fronts[i], [tf.constant(x) for x in sim.calibration_images(k)], [(b, b)])
    return {name: _run(sp.fronts[i], x, b) for name, x in images.items()}


def server_logits(sim, features: list, calibration_features: list) -> list:
    """The backend on each client's test features, its BatchNorm calibrated on features from every client."""
    from tfbitmeta.federated.architectures import SERVER

    sbm = sim.space.server_bitmodel(sim.state["server"])
    backend = sbm.backend(SERVER.split)
    pooled = np.concatenate(calibration_features)
    pooled = pooled[np.random.default_rng([sim.cfg.seed, 7]).permutation(len(pooled))]
    calibrate_batchnorm(backend, [tf.constant(pooled[j:j + 256]) for j in range(0, len(pooled), 256)], [(FP, FP)])
    fp = _bits(FP)
    out = []
    for f in features:
        out.append(np.concatenate([backend([f[j:j + 500], np.tile(fp, (len(f[j:j + 500]), 1))], training=False).numpy()
                                   for j in range(0, len(f), 500)]))
    return out


def collect(sim, validation: list, personal_heads: list | None = None, router_heads: list | None = None) -> dict:
    """Run every client's deployable models on its validation ID images and test images (the expensive part).

    ``validation[k]``: client k's held-out validation indices into the training set; ``personal_heads[k]``: the
    exit head it answers with (default: the head it deploys); ``router_heads[k]``: a shared all-class head for
    the posterior score (None: no posterior)."""
    alg = sim.alg
    x_test = sim.norm.apply(sim.data.x_test).numpy()
    y_test = sim.data.y_test.astype(np.int32)
    outs, test_feats, calib_feats = [], [], []
    for k in range(sim.cfg.clients):
        part = sim.parts[k]
        idx, is_ood = D.test_images(y_test, part.id_classes, max(OOD_FRACTIONS), sim.cfg.seed + k)
        tr = R.fit_images(part.train, sim.cfg.seed, k)
        images = {"validation": sim.x_train[validation[k]], "test": x_test[idx], "train": sim.x_train[tr],
                  "calibration": np.concatenate(sim.calibration_images(k))}
        given = personal_heads is not None and personal_heads[k] is not None
        bank, head = sim.deployed_weights(k, personal=not given)
        if given:
            head = personal_heads[k]
        personal = front_arrays(sim, k, bank, head, images)
        o = {"id_classes": part.id_classes, "test_indices": idx, "is_ood": is_ood,
             "validation": {"exit_logits": personal["validation"]["exit_logits"],
                            "features": personal["validation"]["features"]},
             "test": {"exit_logits": personal["test"]["exit_logits"], "features": personal["test"]["features"]},
             "train": {"features": personal["train"]["features"], "y": sim.y_train[tr]}}
        if router_heads is not None and router_heads[k] is not None:
            shared = front_arrays(sim, k, bank, router_heads[k], {"validation": images["validation"],
                                                                  "test": images["test"]})
            o["validation"]["shared_logits"] = shared["validation"]["exit_logits"]
            o["test"]["shared_logits"] = shared["test"]["exit_logits"]
        outs.append(o)
        test_feats.append(personal["test"]["features"])
        calib_feats.append(personal["calibration"]["features"])
    if alg.split:
        logits = server_logits(sim, test_feats, calib_feats)
    else:  # no server: its columns describe the one model
        logits = [o["test"]["exit_logits"] for o in outs]
    for o, lo in zip(outs, logits):
        o["server_pred"] = lo.argmax(1)
        o["scores"] = R.client_scores(SCORE_KINDS, id_classes=o["id_classes"], validation=o["validation"],
                                      test=o["test"], train=o["train"])
    owner = D.owner_predictions(y_test, [o["id_classes"] for o in outs], [o["test_indices"] for o in outs],
                                [o["server_pred"] for o in outs])
    for o, ow in zip(outs, owner):
        o["owner_server_pred"] = ow
        for big in ("validation", "test", "train"):  # keep what routing needs, drop the feature maps
            o[big] = {"exit_logits": o[big].get("exit_logits")} if big == "test" else {}
    return {"clients": outs, "y_test": y_test}


def route(sim, collected: dict, router: str, keep_local: float, fixed_threshold: float | None = None,
          defer_own_classes: bool = False, latency: LatencyModel | None = None, flops: dict | None = None) -> dict:
    """Route and decompose the collected outputs (cheap: deployment-time variants reuse one :func:`collect`).
    ``router``: a score of :data:`routing.SCORES`, or ``"local"`` / ``"server"`` (no routing)."""
    latency = latency or LatencyModel()
    flops = flops or {}
    y_test = collected["y_test"]
    feature_elements = int(np.prod(sim.space.feature_shape))
    clients = []
    for k, o in enumerate(collected["clients"]):
        rep = D.evaluate_client(y_test[o["test_indices"]], o["is_ood"], o["id_classes"],
                                o["test"]["exit_logits"].argmax(1), o["server_pred"], o["scores"], router, keep_local,
                                OOD_FRACTIONS, owner_server_pred=o["owner_server_pred"],
                                fixed_threshold=fixed_threshold, defer_own_classes=defer_own_classes)
        arch = sim.archs[sim.client_arch[k]].name
        for p in OOD_FRACTIONS:
            d = rep[f"p{p:g}"]
            d["latency_ms"] = latency.mean_ms(k, flops.get(arch, 0.0), d["offload_ratio"], feature_elements,
                                              sim.client_bits[k], flops.get("server", 0.0))
        rep.update(client=k, architecture=arch, bits=sim.client_bits[k],
                   id_classes=[int(c) for c in o["id_classes"]])
        clients.append(rep)
    summary = D.summarize(clients, OOD_FRACTIONS)
    for p in OOD_FRACTIONS:
        summary[f"p{p:g}"]["latency_ms"] = D.across_clients([c[f"p{p:g}"] for c in clients], "latency_ms")
    return {"clients": clients, "summary": summary, "latency_model": latency.describe(), "router": router,
            "keep_local": keep_local, "defer_own_classes": defer_own_classes}


def model_flops(sim) -> dict:
    """FLOPs per image of every architecture's front end and of the server backend (TF profiler)."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    from tfbitmeta.federated.architectures import SERVER

    def profile(model, shape):
        fn = tf.function(lambda x, b: model([x, b], training=False)).get_concrete_function(
            tf.TensorSpec([1, *shape], tf.float32), tf.TensorSpec([1, 2], tf.float32))
        opts = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation()) \
            .with_empty_output().build()
        return float(model_analyzer.profile(fn.graph, options=opts).total_float_ops)

    sp = sim.space
    out = {a.name: profile(fe, sp.input_shape) for a, fe in zip(sim.archs, sp.fronts)}
    out["server"] = profile(sp.server_bm.backend(SERVER.split), sp.feature_shape)
    return out


def alignment(sim, n_images: int = 300, seed: int = 0) -> dict:
    """How well the contrastive alignment works: the same test images through every architecture's extractor
    (shared bank, BatchNorm calibrated on a pooled sample of training images, the middle candidate bitwidth).
    Reports the mean cosine similarity of one image's features across two architectures against that of two
    different images, and how often the server gives one image the same label whichever extractor made it."""
    from tfbitmeta.federated.architectures import SERVER

    if len(sim.archs) < 2 or not sim.alg.split:
        return {}
    sp = sim.space
    rng = np.random.default_rng([seed, 11])
    x = sim.norm.apply(sim.data.x_test[rng.choice(len(sim.data.x_test), n_images, replace=False)]).numpy()
    calib = sim.x_train[rng.choice(len(sim.x_train), 512, replace=False)]
    b = sim.bit_choices[len(sim.bit_choices) // 2]
    bank = {k: np.asarray(v) for k, v in sim.state["bank"].items()}
    head = {k: np.asarray(v) for k, v in sim.state["head"].items()}
    feats = []
    for i in range(len(sim.archs)):
        sp.client_model(i, bank, head)
        calibrate_batchnorm(sp.fronts[i], [tf.constant(calib[j:j + 256]) for j in range(0, 512, 256)], [(b, b)])
        feats.append(_run(sp.fronts[i], x, b)["features"])
    backend = sp.server_bitmodel(sim.state["server"]).backend(SERVER.split)
    calibrate_batchnorm(backend, [tf.constant(f) for f in feats], [(FP, FP)])
    preds = [backend([f, np.tile(_bits(FP), (len(f), 1))], training=False).numpy().argmax(1) for f in feats]
    flat = [f.reshape(len(f), -1) / (np.linalg.norm(f.reshape(len(f), -1), axis=1, keepdims=True) + 1e-12)
            for f in feats]
    same, other, agree = [], [], []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            same.append(float(np.mean(np.sum(flat[i] * flat[j], 1))))
            other.append(float(np.mean(np.sum(flat[i] * np.roll(flat[j], 1, axis=0), 1))))
            agree.append(float(np.mean(preds[i] == preds[j])))
    return {"same_image_cosine": float(np.mean(same)), "other_image_cosine": float(np.mean(other)),
            "server_label_agreement_across_architectures": float(np.mean(agree)), "bits": int(b),
            "images": int(n_images)}
