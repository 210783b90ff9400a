"""Device runtime: choose a front end, verify it, run it, exit early when confident, else ask the server.

The server being down, slow or answering nonsense never raises: the local (early-exit head) answer is returned,
marked ``offline``.  Front ends fetched from the server for bitwidths the local manifest lacks are kept in
``<models>/.device-cache/`` and verified against their sha256 on every load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.quant.bitwidth import Config, bit_name, config_name
from tfbitmeta.serve.payload import FeatureSpec, encode_request


@dataclasses.dataclass
class Answer:
    label: str
    confidence: float
    decision: str                      # "early_exit" | "server" | "offline"
    local_label: str
    local_confidence: float
    server_label: str | None
    server_confidence: float | None
    front_end: str
    bits: str
    threshold: float
    exit_probs: list[float]
    server_probs: list[float] | None
    latency_ms: dict
    offline_reason: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.decision != "early_exit"


def feature_spec(entry: dict) -> FeatureSpec:
    """What the server expects for a front end's features (its quantization, if any)."""
    t = next(t for t in entry["outputs"] if t["name"] == "features")
    q = t["quantization"]
    return FeatureSpec(name="features", shape=tuple(t["shape"][1:]), signature=entry["signature"],
                       scale=q and q["scale"], zero_point=q and q["zero_point"], qdtype=q and q["dtype"])


def backend_name(entry: dict) -> str:
    """The server model that answers for this front end: the manifest entry's ``backend`` field."""
    try:
        return entry["backend"]
    except KeyError:
        raise TfbitmetaError(f"manifest entry {entry.get('path')!r} names no backend: re-export the models with "
                             "`tfbitmeta convert`") from None


class DeviceRuntime:
    def __init__(self, models: Path, server: str | None = None, token: str | None = None, timeout_s: float = 2.0):
        self.models = Path(models)
        path = self.models / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TfbitmetaError(f"cannot read {path}: {e}") from None
        self.server = server.rstrip("/") if server else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self.cache = self.models / ".device-cache"

    # -- choosing and loading a front end -------------------------------------------------------------
    def fronts(self, client: int | None = None) -> list[dict]:
        """Front-end entries; in a federated manifest (entries carry ``client``) those of ``client``."""
        fronts = [f for f in self.manifest["files"] if f["kind"] == "front_end"]
        clients = sorted({f["client"] for f in fronts if "client" in f})
        if client is None and len(clients) > 1:
            raise TfbitmetaError(f"{self.models} holds the front ends of clients {clients}: pass --client K")
        if client is not None:
            if client not in clients:
                raise TfbitmetaError(f"no front end of client {client} in {self.models}"
                                     + (f" (clients {clients})" if clients else " (not a federated export)"))
            fronts = [f for f in fronts if f.get("client") == client]
        return fronts

    def choose(self, bits: Config | None = None, memory_budget: int | None = None, exit_: int | None = None,
               client: int | None = None) -> tuple[dict, Path]:
        fronts = [f for f in self.fronts(client) if exit_ is None or f["exit"] == exit_]
        if bits is not None:
            hit = [f for f in fronts if (f["bits"]["w"], f["bits"]["a"]) == tuple(bits)]
            if hit:
                return hit[0], self.models / hit[0]["path"]
            if client is not None:
                have = ", ".join(sorted({f["bits"]["name"] for f in fronts}))
                raise TfbitmetaError(f"client {client} has no front end for {config_name(bits)} in {self.models} "
                                     f"(have {have}; export more with `tfbitmeta convert RUN --bits all`)")
            return self.fetch(bits, exit_ if exit_ is not None else self.manifest["model"]["exits"][-1])
        if memory_budget is not None:
            fitting = [f for f in fronts if f["bytes"] <= memory_budget]
            if not fitting:
                smallest = min(f["bytes"] for f in fronts)
                raise TfbitmetaError(f"no front end fits in {memory_budget} bytes (smallest: {smallest} bytes)")
            best = max(fitting, key=lambda f: (f["bytes"], f["bits"]["w"], f["bits"]["a"]))
            return best, self.models / best["path"]
        best = max(fronts, key=lambda f: (f["bits"]["w"], f["bits"]["a"]))
        return best, self.models / best["path"]

    def fetch(self, bits: Config, exit_: int) -> tuple[dict, Path]:
        """A front end the local manifest lacks: from the device cache, or converted on demand by the server."""
        name = f"w{bit_name(bits[0])}a{bit_name(bits[1])}"
        meta, path = self.cache / f"{name}_exit{exit_}.json", self.cache / f"{name}_exit{exit_}.tflite"
        if meta.is_file() and path.is_file():
            return json.loads(meta.read_text()), path
        have = ", ".join(sorted({config_name((f["bits"]["w"], f["bits"]["a"])) for f in self.fronts()}))
        if not self.server:
            raise TfbitmetaError(f"no front end for {config_name(bits)} in {self.models} (have {have}); "
                                 "pass --server to fetch one converted on demand")
        import httpx

        url = f"{self.server}/v1/frontends/{self.manifest['model']['family']}/{name}/exit{exit_}"
        try:
            entry = httpx.get(url + ".json", headers=self.headers, timeout=600).raise_for_status().json()
            resp = httpx.get(url + ".tflite", headers=self.headers, timeout=600).raise_for_status()
        except httpx.HTTPStatusError as e:
            raise TfbitmetaError(f"server cannot provide {config_name(bits)}: {_server_message(e.response)}") from None
        except httpx.HTTPError as e:
            raise TfbitmetaError(f"no front end for {config_name(bits)} locally (have {have}) and the server is "
                                 f"unreachable: {e}") from None
        except ValueError as e:
            raise TfbitmetaError(f"unusable answer from {url}.json: {e}") from None
        digest = hashlib.sha256(resp.content).hexdigest()
        if not isinstance(entry, dict) or digest != entry.get("sha256") or digest != resp.headers.get("x-sha256"):
            raise TfbitmetaError(f"front end fetched from {url}.tflite fails its sha256 check")
        self.cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(resp.content)
        meta.write_text(json.dumps(entry))
        return entry, path

    @staticmethod
    def load(entry: dict, path: Path):
        """Interpreter signature runner, after checking the file's sha256 against the manifest entry."""
        import tensorflow as tf

        try:
            buf = Path(path).read_bytes()
        except OSError as e:
            raise TfbitmetaError(f"cannot read front end {path}: {e.strerror}") from None
        if hashlib.sha256(buf).hexdigest() != entry["sha256"]:
            raise TfbitmetaError(f"{path} fails its sha256 check against the manifest: refusing to load it")
        return tf.lite.Interpreter(model_content=buf, num_threads=1).get_signature_runner(entry["signature"])

    # -- classifying ---------------------------------------------------------------------------------------
    def classify(self, pixels: np.ndarray, bits: Config | None = None, memory_budget: int | None = None,
                 exit_: int | None = None, threshold: float | None = None, client: int | None = None) -> Answer:
        t0 = time.perf_counter()
        entry, path = self.choose(bits, memory_budget, exit_, client)
        runner = self.load(entry, path)
        t1 = time.perf_counter()
        out = runner(image=pixels[None].astype(np.float32))
        t2 = time.perf_counter()
        probs, features = out["exit_probs"][0], out["features"]
        th = float(entry["exit_threshold"] if threshold is None else threshold)
        labels = self.manifest["labels"]
        local = int(np.argmax(probs))
        answer = Answer(label=labels[local], confidence=float(probs[local]), decision="early_exit",
                        local_label=labels[local], local_confidence=float(probs[local]), server_label=None,
                        server_confidence=None, front_end=Path(path).name, bits=entry["bits"]["name"], threshold=th,
                        exit_probs=[float(p) for p in probs], server_probs=None,
                        latency_ms={"load": 1e3 * (t1 - t0), "front_end": 1e3 * (t2 - t1)})
        if probs[local] < th:
            self._fall_back(answer, entry, features)
        answer.latency_ms["total"] = 1e3 * (time.perf_counter() - t0)
        answer.latency_ms = {k: round(v, 3) for k, v in answer.latency_ms.items()}
        return answer

    def request_bytes(self, entry: dict, features: np.ndarray) -> bytes:
        return encode_request(features, feature_spec(entry))

    def _fall_back(self, answer: Answer, entry: dict, features: np.ndarray) -> None:
        answer.decision = "offline"
        if not self.server:
            answer.offline_reason = "no server configured"
            return
        import httpx

        t0 = time.perf_counter()
        try:
            resp = httpx.post(f"{self.server}/v1/models/{backend_name(entry)}:predict",
                              content=self.request_bytes(entry, features), timeout=self.timeout_s,
                              headers={**self.headers, "Content-Type": "application/json"})
            if resp.status_code != 200:
                answer.offline_reason = f"server answered {resp.status_code}: {_server_message(resp)}"
                return
            probs = np.asarray(resp.json()["outputs"], dtype=np.float64)[0]
            if probs.shape != (len(self.manifest["labels"]),) or not np.all(np.isfinite(probs)):
                raise ValueError(f"probabilities of shape {probs.shape}")
        except httpx.TimeoutException:
            answer.offline_reason = f"server did not answer within {self.timeout_s} s"
            return
        except httpx.HTTPError as e:
            answer.offline_reason = f"server unreachable: {type(e).__name__}: {e}"
            return
        except (ValueError, KeyError, IndexError, TypeError) as e:
            answer.offline_reason = f"unusable server response: {e}"
            return
        finally:
            answer.latency_ms["server"] = 1e3 * (time.perf_counter() - t0)
        k = int(np.argmax(probs))
        labels = self.manifest["labels"]
        answer.decision, answer.label, answer.confidence = "server", labels[k], float(probs[k])
        answer.server_label, answer.server_confidence, answer.server_probs = labels[k], float(probs[k]), probs.tolist()


def _server_message(resp) -> str:
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
