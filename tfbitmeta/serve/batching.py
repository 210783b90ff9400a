"""Dynamic batching: concurrent requests for one model are joined into one backend call.

A batch starts when the first request arrives and closes when it holds ``max_batch`` rows, when ``max_delay`` has
passed, or when no request arrived for ``idle`` seconds (so closed-loop clients are not held for the whole
delay). A batch of at most ``max_batch`` rows is one backend call (~0.1 ms), made on the event loop; only a single
request larger than a batch (several calls) runs in the backend's thread, so the loop keeps answering the others.
More than ``max_queue`` waiting rows -> 503, so an overload sheds requests instead of growing memory.
Measurements behind these choices: docs/serving.md, "Load: which step bought what"; benchmarks/README.md.
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
    """Event-driven: no task per batch or per arrival, one timer per idle period (an ``asyncio.wait_for`` per
    arrival, the earlier design, created a task for every request)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_delay_s: float, max_queue: int,
                 idle_s: float | None = None):
        self.run, self.max_batch, self.max_delay, self.max_queue = run, max_batch, max_delay_s, max_queue
        self.idle = max_delay_s if idle_s is None else idle_s
        self._queue: collections.deque = collections.deque()
        self._rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False            # a backend call is running
        self._opened = self._last = self._armed = 0.0  # when the open batch started / its last arrival / the timer was set
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="backend")
        self.calls = 0  # backend calls made (for tests and the load report)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        return await self.enqueue(x)

    def enqueue(self, x: np.ndarray) -> asyncio.Future:
        if self._rows + len(x) > self.max_queue:
            raise Overloaded(self._rows, self.max_queue)
        loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((x, fut))
        self._rows += len(x)
        now = self._last = loop.time()
        if self._busy:
            return fut  # the batch closes when the running call returns (see _done)
        if self._rows >= self.max_batch:
            self._dispatch()
        elif self._timer is None:
            self._opened = now
            self._arm(now)
        return fut

    def _arm(self, now: float) -> None:
        self._armed = now
        self._timer = self._loop.call_at(min(self._last + self.idle, self._opened + self.max_delay), self._check)

    def _check(self) -> None:
        """Timer: close the batch unless requests arrived since the timer was set and ``max_delay`` is not over.
        The timer is trusted when it fires: uvloop's timers have a 1 ms resolution and fire sub-ms delays at the
        next loop iteration, so re-checking the clock would spin; re-arming needs an arrival in between."""
        self._timer = None
        if self._busy or not self._queue:
            return
        now = self._loop.time()
        if self._last > self._armed and now < self._opened + self.max_delay:
            self._arm(now)
        else:
            self._dispatch()

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, rows = [], 0
        while self._queue and (not items or rows + len(self._queue[0][0]) <= self.max_batch):
            x, fut = self._queue.popleft()
            items.append((x, fut))
            rows += len(x)
        self._rows -= rows
        live = [(x, f) for x, f in items if not f.done()]  # timed-out requests are not computed
        if not live:
            return self._next()
        self._busy = True
        x = live[0][0] if len(live) == 1 else np.concatenate([x for x, _ in live])
        if len(x) <= self.max_batch:
            # one backend call (~0.1 ms) on the loop, full batches included. Handing it to a thread cost more than
            # the call: the wake-up, and the GIL bouncing between the loop and the thread at every socket write
            # (a 64-row request: ~490 -> ~310 us of server CPU, docs/serving.md)
            call = self._loop.create_future()
            try:
                call.set_result(self.run(x))
            except Exception as e:  # noqa: BLE001 - reported to every waiting request
                call.set_exception(e)
            return self._done(call, live)
        # a single request larger than a batch is several calls: they run in the backend's thread (the interpreter
        # releases the GIL) so the loop answers the others meanwhile
        call = self._loop.run_in_executor(self._executor, self.run, x)
        call.add_done_callback(lambda c: self._done(c, live))

    def _done(self, call: asyncio.Future, live: list) -> None:
        self._busy = False
        if call.cancelled() or call.exception() is not None:
            error = call.exception() if not call.cancelled() else ApiError(503, "unavailable", "server shutting down")
            for _, f in live:
                if not f.done():
                    f.set_exception(error)
        else:
            self.calls += 1
            out, i = call.result(), 0
            for x, f in live:
                if not f.done():
                    f.set_result(out[i:i + len(x)])
                i += len(x)
        self._next()

    def _next(self) -> None:
        """After a call: what arrived meanwhile forms the next batch, which waits up to ``idle`` for company."""
        if not self._queue:
            return
        if self._rows >= self.max_batch:
            return self._dispatch()
        now = self._opened = self._last = self._loop.time()
        self._arm(now)

    async def close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
