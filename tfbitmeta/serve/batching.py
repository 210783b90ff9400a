"""Dynamic batching: concurrent requests for one model are joined into one backend call.

A batch starts when the first request arrives and closes when it holds ``max_batch`` rows, when ``max_delay`` has
passed, or when no request arrived for ``idle`` seconds (so closed-loop clients are not held for the whole
delay); while the backend runs (in its own thread, so the event loop keeps accepting requests) the next batch
fills up.  More than ``max_queue`` waiting rows -> 503, so an overload sheds requests instead of growing memory.
"""
from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import numpy as np

from tfbitmeta.serve.errors import ApiError

if TYPE_CHECKING:  # annotations only (no import cycle at run time)
    from tfbitmeta.serve.config import ServeConfig
    from tfbitmeta.serve.models import ModelStore


class Overloaded(ApiError):
    def __init__(self, waiting: int, limit: int):
        super().__init__(503, "overloaded", f"server busy: {waiting} rows already waiting (limit {limit}), retry later",
                         {"Retry-After": "1"})


class DynamicBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_delay_s: float, max_queue: int,
                 idle_s: float | None = None):
        self.run, self.max_batch, self.max_delay, self.max_queue = run, max_batch, max_delay_s, max_queue
        self.idle = max_delay_s if idle_s is None else idle_s
        self._queue: collections.deque = collections.deque()
        self._rows = 0
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="backend")
        self.calls = 0  # backend calls made (for tests and the load report)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        return await self.enqueue(x)

    def enqueue(self, x: np.ndarray) -> asyncio.Future:
        if self._rows + len(x) > self.max_queue:
            raise Overloaded(self._rows, self.max_queue)
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._event = asyncio.Event()
            self._task = loop.create_task(self._serve())
        fut = loop.create_future()
        self._queue.append((x, fut))
        self._rows += len(x)
        self._event.set()
        return fut

    async def _serve(self):
        loop = asyncio.get_running_loop()
        while True:
            await self._event.wait()
            deadline = loop.time() + self.max_delay
            while self._rows < self.max_batch and (left := deadline - loop.time()) > 0:
                self._event.clear()
                try:
                    await asyncio.wait_for(self._event.wait(), min(left, self.idle))
                except asyncio.TimeoutError:
                    break
            items, rows = [], 0
            while self._queue and (not items or rows + len(self._queue[0][0]) <= self.max_batch):
                x, fut = self._queue.popleft()
                items.append((x, fut))
                rows += len(x)
            self._rows -= rows
            if not self._queue:
                self._event.clear()
            live = [(x, f) for x, f in items if not f.done()]  # timed-out requests are not computed
            if not live:
                continue
            try:
                out = await loop.run_in_executor(self._executor, self.run, np.concatenate([x for x, _ in live]))
                self.calls += 1
            except Exception as e:  # noqa: BLE001 - reported to every waiting request
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            i = 0
            for x, f in live:
                if not f.done():
                    f.set_result(out[i:i + len(x)])
                i += len(x)

    async def close(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)


class Models:
    """The backends and their batchers, shared by the REST routes and the gRPC service."""

    def __init__(self, cfg: ServeConfig, store: ModelStore):
        self.cfg, self.store, self.batchers = cfg, store, {}

    def backend(self, name: str):
        b = self.store.get(name)
        if b is None:
            raise ApiError(404, "unknown_model", f"unknown model {name[:80]!r}: available {sorted(self.store.backends)}")
        return b

    def batcher(self, name: str) -> DynamicBatcher:
        backend = self.backend(name)
        if name not in self.batchers:
            self.batchers[name] = DynamicBatcher(backend.predict, self.cfg.max_batch, self.cfg.max_delay_ms / 1e3,
                                                 self.cfg.max_queue, self.cfg.batch_idle_ms / 1e3)
        return self.batchers[name]

    async def predict(self, name: str, x):
        """Queue ``x`` and wait for its rows; 504 after ``request_timeout_s`` (a timer on the future, no task)."""
        loop = asyncio.get_running_loop()
        fut = self.batcher(name).enqueue(x)
        timer = loop.call_later(self.cfg.request_timeout_s, _expire, fut, self.cfg.request_timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()

    async def close(self):
        for b in self.batchers.values():
            await b.close()


def _expire(fut: asyncio.Future, seconds: float) -> None:
    if not fut.done():
        fut.set_exception(ApiError(504, "timeout", f"no answer within {seconds} s"))
