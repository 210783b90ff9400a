"""Device runtime: choose a front end, verify it, run it, exit early when confident, else ask the server.

The server being down, slow or answering nonsense never raises: the local (early-exit head) answer is returned,
marked ``offline``.  ``timeout_s`` is a deadline for the whole fallback call (connect, send, every byte of the
answer); answers above ``MAX_RESPONSE_BYTES``, JSON nested too deep, and probabilities outside [0, 1] or not summing
to 1 are refused.  Front ends fetched from the server for bitwidths the local manifest lacks are validated (sha256,
then loaded: signature, tensors, bits and exit against the manifest entry) before they are written to
``<models>/.device-cache/``, and verified again on every load; an entry that fails is removed, never used.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import orjson

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.export.digest import sha256_bytes
from tfbitmeta.quant.bitwidth import Config, bit_name, config_name
from tfbitmeta.serve.payload import FeatureSpec, encode_request

MAX_RESPONSE_BYTES = 1 << 20       # a predict answer is a few hundred bytes per class row
MAX_FRONTEND_BYTES = 256 << 20
PROB_TOLERANCE = 1e-3
SUM_TOLERANCE = 0.05               # int8 softmax outputs have 1/256 steps: 10 classes sum to 1 +- ~0.02


class ResponseTooLarge(ValueError):
    pass


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
    route: str = "max_softmax"         # the score that decided: "max_softmax" or the client's "mahalanobis" router
    route_score: float | None = None   # its value; below ``threshold`` -> ask the server

    @property
    def fell_back(self) -> bool:
        return self.decision != "early_exit"


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
            raise TfbitmetaError(f"{self.models} holds the front ends of clients {clients}: say which client's "
                                 "front end to run", param="client")
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
                                     f"(have {have}; export every bitwidth with `tfbitmeta convert`)", param="bits")
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
            try:
                entry = json.loads(meta.read_text())
                self.validate_front_end(entry, path.read_bytes(), bits, exit_)
                return entry, path
            except (TfbitmetaError, OSError, ValueError) as e:
                meta.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                if not self.server:
                    raise TfbitmetaError(f"cached front end {path} was removed: {e}") from None
        have = ", ".join(sorted({config_name((f["bits"]["w"], f["bits"]["a"])) for f in self.fronts()}))
        if not self.server:
            raise TfbitmetaError(f"no front end for {config_name(bits)} in {self.models} (have {have}); "
                                 "and no server to fetch one converted on demand", param="server")
        import httpx

        url = f"{self.server}/v1/frontends/{self.manifest['model']['family']}/{name}/exit{exit_}"
        try:
            with httpx.Client(headers=self.headers, timeout=600) as client:
                entry = orjson.loads(_read_capped(client, url + ".json", 1 << 20)[1])
                headers, content = _read_capped(client, url + ".tflite", MAX_FRONTEND_BYTES)
        except ServerRefused as e:
            raise TfbitmetaError(f"server cannot provide {config_name(bits)}: {e}") from None
        except httpx.HTTPError as e:
            raise TfbitmetaError(f"no front end for {config_name(bits)} locally (have {have}) and the server is "
                                 f"unreachable: {e}") from None
        except ValueError as e:
            raise TfbitmetaError(f"unusable answer from {url}: {e}") from None
        if not isinstance(entry, dict) or sha256_bytes(content) != headers.get("x-sha256"):
            raise TfbitmetaError(f"front end fetched from {url}.tflite fails its sha256 check")
        self.validate_front_end(entry, content, bits, exit_)
        self.cache.mkdir(parents=True, exist_ok=True)
        for target, data in ((path, content), (meta, json.dumps(entry).encode())):  # the model first, its entry last
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return entry, path

    def validate_front_end(self, entry, content: bytes, bits: Config, exit_: int) -> None:
        """A front end is usable only if it matches its entry's sha256, is that bitwidth and exit, and loads with
        the entry's signature: image in (the manifest's input shape), exit_probs (one per label) and the
        entry's features out."""
        what = f"front end {config_name(bits)} exit {exit_}"
        try:
            ok = (entry["kind"] == "front_end" and (entry["bits"]["w"], entry["bits"]["a"]) == tuple(bits)
                  and entry["exit"] == exit_ and sha256_bytes(content) == entry["sha256"])
            feats = next(t for t in entry["outputs"] if t["name"] == "features")
            FeatureSpec.of_front_end(entry)
        except (KeyError, TypeError, StopIteration) as e:
            raise TfbitmetaError(f"{what}: malformed manifest entry ({type(e).__name__}: {e})") from None
        if not ok:
            raise TfbitmetaError(f"{what}: the manifest entry does not match (bits, exit or sha256)")
        import tensorflow as tf

        try:
            it = tf.lite.Interpreter(model_content=content, num_threads=1)
            runner = it.get_signature_runner(entry["signature"])
            ins, outs = runner.get_input_details(), runner.get_output_details()
        except Exception as e:  # noqa: BLE001 - whatever the interpreter says, the file is not a usable model
            raise TfbitmetaError(f"{what} is not a valid TFLite model: {str(e).splitlines()[0][:200]}") from None
        want_in = list(self.manifest["input"]["shape"][1:])
        if set(ins) != {"image"} or list(ins["image"]["shape"][1:]) != want_in:
            raise TfbitmetaError(f"{what}: expected one input 'image' of shape [N, {want_in}], got {sorted(ins)}")
        if set(outs) != {"exit_probs", "features"}:
            raise TfbitmetaError(f"{what}: expected outputs exit_probs and features, got {sorted(outs)}")
        if int(outs["exit_probs"]["shape"][-1]) != len(self.manifest["labels"]) or \
                list(outs["features"]["shape"][1:]) != list(feats["shape"][1:]):
            raise TfbitmetaError(f"{what}: output shapes do not match the manifest")

    @staticmethod
    def load(entry: dict, path: Path):
        """Interpreter signature runner, after checking the file's sha256 against the manifest entry."""
        import tensorflow as tf

        try:
            buf = Path(path).read_bytes()
        except OSError as e:
            raise TfbitmetaError(f"cannot read front end {path}: {e.strerror}") from None
        if sha256_bytes(buf) != entry["sha256"]:
            raise TfbitmetaError(f"{path} fails its sha256 check against the manifest: refusing to load it")
        try:
            return tf.lite.Interpreter(model_content=buf, num_threads=1).get_signature_runner(entry["signature"])
        except Exception as e:  # noqa: BLE001
            raise TfbitmetaError(f"{path} is not a loadable front end: {str(e).splitlines()[0][:200]}") from None

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
        if threshold is None and entry.get("router"):  # the client's calibrated router
            router = self.router(entry)
            kind, th = router.kind, float(router.threshold)
            score = float(router.scores({"exit_probs": probs[None], "features": features})[0])
        else:  # the manifest's exit threshold, or an explicit one: max-softmax
            kind = "max_softmax"
            th = float(entry["exit_threshold"] if threshold is None else threshold)
            score = float(np.max(probs))
        labels = self.manifest["labels"]
        local = int(np.argmax(probs))
        answer = Answer(label=labels[local], confidence=float(probs[local]), decision="early_exit",
                        local_label=labels[local], local_confidence=float(probs[local]), server_label=None,
                        server_confidence=None, front_end=Path(path).name, bits=entry["bits"]["name"], threshold=th,
                        exit_probs=[float(p) for p in probs], server_probs=None,
                        latency_ms={"load": 1e3 * (t1 - t0), "front_end": 1e3 * (t2 - t1)}, route=kind,
                        route_score=score)
        if score < th:
            self._fall_back(answer, entry, features)
        answer.latency_ms["total"] = 1e3 * (time.perf_counter() - t0)
        answer.latency_ms = {k: round(v, 3) for k, v in answer.latency_ms.items()}
        return answer

    def router(self, entry: dict):
        """The client's calibrated router of a federated front end (docs/harmony.md, "Deployed routing"); a
        Mahalanobis file is read once and checked against the manifest's sha256."""
        from tfbitmeta.federated.routing import ClientRouter

        cache = self.__dict__.setdefault("_routers", {})
        if entry["path"] not in cache:
            cache[entry["path"]] = ClientRouter.from_manifest(entry["router"], self.models)
        return cache[entry["path"]]

    def request_bytes(self, entry: dict, features: np.ndarray, packed: bool = True) -> bytes:
        return encode_request(features, FeatureSpec.of_front_end(entry), packed)

    def _fall_back(self, answer: Answer, entry: dict, features: np.ndarray) -> None:
        answer.decision = "offline"
        if not self.server:
            answer.offline_reason = "no server configured"
            return
        import httpx

        t0 = time.perf_counter()
        try:
            status, body = asyncio.run(self._post(f"{self.server}/v1/models/{backend_name(entry)}:predict",
                                                  self.request_bytes(entry, features)))
            if status != 200:
                answer.offline_reason = f"server answered {status}: {_error_message(body)}"
                return
            probs = check_probabilities(orjson.loads(body), len(self.manifest["labels"]))
        except (asyncio.TimeoutError, httpx.TimeoutException):
            answer.offline_reason = f"server did not answer within {self.timeout_s} s"
            return
        except httpx.HTTPError as e:
            answer.offline_reason = f"server unreachable: {type(e).__name__}: {e}"
            return
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
            answer.offline_reason = f"unusable server response: {str(e)[:200]}"
            return
        finally:
            answer.latency_ms["server"] = 1e3 * (time.perf_counter() - t0)
        k = int(np.argmax(probs))
        labels = self.manifest["labels"]
        answer.decision, answer.label, answer.confidence = "server", labels[k], float(probs[k])
        answer.server_label, answer.server_confidence, answer.server_probs = labels[k], float(probs[k]), probs.tolist()

    async def _post(self, url: str, body: bytes) -> tuple[int, bytes]:
        """POST with one deadline for everything (a trickling server cannot stretch it) and a size cap."""
        import httpx

        async def call():
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                async with client.stream("POST", url, content=body,
                                         headers={**self.headers, "Content-Type": "application/json"}) as resp:
                    return resp.status_code, await _read_body(resp, MAX_RESPONSE_BYTES)

        return await asyncio.wait_for(call(), self.timeout_s)


def check_probabilities(answer, classes: int) -> np.ndarray:
    """``{"outputs": [[p, ...]]}`` -> the row; ValueError unless it has one probability per class, each in [0, 1],
    summing to 1."""
    if not isinstance(answer, dict) or not isinstance(answer.get("outputs"), list) or len(answer["outputs"]) != 1:
        raise ValueError("expected {\"outputs\": [[one probability per class]]}")
    row = answer["outputs"][0]
    if not isinstance(row, list) or len(row) != classes or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
        raise ValueError(f"expected {classes} probabilities")
    probs = np.asarray(row, dtype=np.float64)
    if not np.all(np.isfinite(probs)) or probs.min() < -PROB_TOLERANCE or probs.max() > 1 + PROB_TOLERANCE:
        raise ValueError("probabilities outside [0, 1]")
    if abs(probs.sum() - 1) > SUM_TOLERANCE:
        raise ValueError(f"probabilities sum to {probs.sum():.4g}, not 1")
    return np.clip(probs, 0, 1)


async def _read_body(resp, cap: int) -> bytes:
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise ResponseTooLarge(f"answer of {length} bytes exceeds the {cap}-byte limit")
    chunks, n = [], 0
    async for chunk in resp.aiter_bytes():
        n += len(chunk)
        if n > cap:
            raise ResponseTooLarge(f"answer exceeds the {cap}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


class ServerRefused(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"server answered {status}: {_error_message(body)}")


def _read_capped(client, url: str, cap: int) -> tuple[dict, bytes]:
    with client.stream("GET", url) as resp:
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise ResponseTooLarge(f"{url}: {length} bytes exceed the {cap}-byte limit")
        chunks, n = [], 0
        for chunk in resp.iter_bytes():
            n += len(chunk)
            if n > cap:
                raise ResponseTooLarge(f"{url}: more than {cap} bytes")
            chunks.append(chunk)
        if resp.status_code != 200:
            raise ServerRefused(resp.status_code, b"".join(chunks))
        return dict(resp.headers), b"".join(chunks)


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")



