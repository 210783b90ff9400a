"""The round as a TFF ``IterativeProcess`` (``initialize`` / ``next``) built from named blocks, and the same blocks
in a plain TF loop (the reference for the TFF-overhead benchmark and the equality test).

Blocks (docs/federated.md):

* **distributor** -- ``federated_broadcast`` of the shared part of the server state (bank, head, server backend)
  and of the round's learning-rate multiplier (``lr_scale``, :mod:`tfbitmeta.federated.schedule`);
* **client work** -- ``federated_map`` of :meth:`ClientWork.round` (each client's local steps with the split
  exchange; its personal state travels as a ``@CLIENTS`` value, TFF 0.87 has no per-client state);
* **aggregator** -- ``federated_sum`` of the clients' contributions (HeteroFL: each bank entry averaged over the
  clients that hold it, weighted by data size; heads and the backend copies averaged by data size);
* **server work** -- :func:`server_apply` turns the sums into the next server state.

``next(state, client_states, client_data) -> (state, client_states, metrics)``.  With several TFF workers
(``--workers``) the client block and the aggregator are invoked one after the other (TFF's mergeable context
splits only computations with at most one aggregation); the result is the same.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorflow as tf

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.federated.algorithms import Algorithm
from tfbitmeta.federated.client import ClientWork
from tfbitmeta.federated.workers import LocalWorker


def server_apply(alg: Algorithm, state, sums):
    """The next server state from the summed contributions (a parameter nobody held keeps its value)."""
    n = tf.maximum(sums["weight"], 1e-12)
    bank = state["bank"]
    if alg.share_bank:
        bank = OrderedDict((k, v + tf.math.divide_no_nan(sums["bank"][k], sums["bank_weight"][k]))
                           for k, v in bank.items())
    head = state["head"]
    if alg.share_head:
        head = OrderedDict((k, v + sums["head"][k] / n) for k, v in head.items())
    server = OrderedDict((k, v + sums["server"][k] / n) for k, v in state["server"].items()) if alg.split \
        else OrderedDict(state["server"])
    return OrderedDict(bank=bank, head=head, server=server, round=state["round"] + 1)


def shared_part(state, lr_scale):
    """What the distributor broadcasts: the shared weights and ``lr_scale(state["round"])``."""
    return OrderedDict(bank=state["bank"], head=state["head"], server=state["server"],
                       lr_scale=lr_scale(state["round"]))


def _np(tree):
    return tf.nest.map_structure(lambda t: np.asarray(t), tree)


def _sum(trees):
    return tf.nest.map_structure(lambda *xs: np.sum(np.stack([np.asarray(x) for x in xs]), axis=0), *trees)


class LocalProcess:
    """The blocks in a plain Python loop over clients (each client's round is one ``tf.function`` call)."""

    engine = "tf"

    def __init__(self, client: ClientWork, initial_state: OrderedDict, lr_scale):
        self.alg, self._init, self.lr_scale = client.alg, initial_state, lr_scale
        self._round = tf.function(client.round)
        self._apply = tf.function(lambda s, sums: server_apply(client.alg, s, sums))

    def initialize(self):
        return _np(self._init)

    def next(self, state, client_states, client_data):
        shared = shared_part(state, self.lr_scale)
        outs = [self._round(shared, cs, d) for cs, d in zip(client_states, client_data)]
        sums = _sum([o[1] for o in outs])
        return _np(self._apply(state, sums)), [_np(o[0]) for o in outs], _sum([o[2] for o in outs])

    def close(self):
        pass


def _spec(example):
    return tf.nest.map_structure(lambda a: tf.TensorSpec(np.shape(a), tf.as_dtype(np.asarray(a).dtype)), example)


class TffProcess(LocalProcess):
    """The same blocks as TFF computations; ``self.process`` is the ``tff.templates.IterativeProcess``."""

    engine = "tff"

    def __init__(self, client: ClientWork, initial_state, example_client_state, example_data, lr_scale,
                 workers=None):
        super().__init__(client, initial_state, lr_scale)
        import tensorflow_federated as tff  # lazy: ~20 s, only the federated commands pay it

        self.tff, self.workers = tff, list(workers or [])
        # no --workers: our own local worker, not TFF's local context (its shutdown can hang forever; workers.py)
        self.local = None if self.workers else LocalWorker(LocalWorker.binary_path())
        try:
            _set_remote_context(tff, self.workers or [self.local.address], wait_seconds=30.0 if self.workers else 300.0)
        except BaseException:
            self.close()
            raise
        C, S, Fed = tff.CLIENTS, tff.SERVER, tff.FederatedType
        T = tff.types.tensorflow_to_type
        tfc, fc = tff.tensorflow.computation, tff.federated_computation
        state_t, cstate_t = T(_spec(initial_state)), T(_spec(example_client_state))
        data_t = T(_spec(OrderedDict(example_data, slot=np.int32(0))))
        shared_t = T(_spec(shared_part(initial_state, lr_scale)))
        alg = client.alg
        init_values = _np(initial_state)

        @tfc
        def init_tf():
            return tf.nest.map_structure(tf.constant, init_values)

        @tfc(state_t)
        def select_shared(state):
            return shared_part(state, lr_scale)

        @tfc(shared_t, cstate_t, data_t)
        def client_work(shared, cstate, data):
            d = OrderedDict((k, v) for k, v in data.items() if k != "slot")
            new, contribution, metrics = self._round(shared, cstate, d)  # the tf.function: AutoGraph loops
            return data["slot"], new, contribution, metrics

        out_t = client_work.type_signature.result
        contrib_t, metrics_t = out_t[2], out_t[3]

        @tfc(state_t, contrib_t)
        def server_work(state, sums):
            return server_apply(alg, state, sums)

        @fc
        def initialize():
            return tff.federated_eval(init_tf, S)

        @fc(Fed(state_t, S))
        def distributor(state):
            return tff.federated_broadcast(tff.federated_map(select_shared, state))

        @fc(Fed(state_t, S), Fed(cstate_t, C), Fed(data_t, C))
        def client_block(state, cstates, data):
            return tff.federated_map(client_work, (distributor(state), cstates, data))

        @fc(Fed(state_t, S), Fed(contrib_t, C), Fed(metrics_t, C))
        def aggregator(state, contributions, metrics):
            return tff.federated_map(server_work, (state, tff.federated_sum(contributions))), tff.federated_sum(metrics)

        @fc(Fed(state_t, S), Fed(cstate_t, C), Fed(data_t, C))
        def next_fn(state, cstates, data):
            out = client_block(state, cstates, data)
            new_state, metrics = aggregator(state, out[2], out[3])
            return new_state, out[1], metrics

        self.blocks = OrderedDict(distributor=distributor, client_work=client_work, client_block=client_block,
                                  aggregator=aggregator, server_work=server_work)
        self.process = tff.templates.IterativeProcess(initialize, next_fn)

    def initialize(self):
        return self.process.initialize()

    def next(self, state, client_states, client_data):
        data = [OrderedDict(d, slot=np.int32(i)) for i, d in enumerate(client_data)]
        if len(self.workers) > 1:
            out = self.blocks["client_block"](state, client_states, data)
            out = sorted(out, key=lambda r: int(r[0]))  # the mergeable context returns sub-rounds in finishing order
            new_state, metrics = self.blocks["aggregator"](state, [r[2] for r in out], [r[3] for r in out])
            return _np(new_state), [_np(r[1]) for r in out], _np(metrics)
        new_state, cstates, metrics = self.process.next(state, client_states, data)
        return _np(new_state), [_np(c) for c in cstates], _np(metrics)

    def close(self):
        """Stop the local worker (bounded: SIGINT, wait, SIGKILL) and restore TFF's default context, which starts
        nothing until it is used; anything else is reaped at exit (``workers.install_reaper``)."""
        if getattr(self, "local", None) is not None:
            self.local.close()
            self.local = None
        self.tff.backends.native.set_sync_local_cpp_execution_context()


def _set_remote_context(tff, workers: list[str], wait_seconds: float = 30.0):
    """Execute on already running ``worker_binary --port P`` processes (TFF's C++ remote executor), built as
    ``local_cpp_executor_factory`` builds its own.  One worker: a sync context; several: TFF's mergeable-comp
    context, which splits the clients of each computation across the workers and merges the results."""
    import time

    import grpc

    def factory(target):
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise TfbitmetaError(f"bad worker address {target!r}: use host:port", param="workers")
        stub = tff.framework.RemoteExecutorGrpcStub(grpc.insecure_channel(target))
        deadline = time.monotonic() + wait_seconds
        while not stub.is_ready:
            if time.monotonic() > deadline:
                raise TfbitmetaError(f"no TFF worker answers at {target}: start one with "
                                     f"'worker_binary --port={port}' (README, 'Federated simulation')")
            time.sleep(0.2)

        def stack(cardinalities):
            cardinalities.setdefault(tff.CLIENTS, 0)
            ex = tff.framework.RemoteExecutor(stub)
            ex.set_cardinalities(cardinalities)
            return ex
        return tff.framework.ResourceManagingExecutorFactory(stack)

    kw = dict(compiler_fn=tff.backends.native.desugar_and_transform_to_native,
              transform_args=tff.tensorflow.transform_args, transform_result=tff.tensorflow.transform_result)
    if len(workers) == 1:
        tff.framework.set_default_context(tff.framework.SyncExecutionContext(executor_fn=factory(workers[0]), **kw))
    else:
        tff.backends.native.set_mergeable_comp_execution_context(
            [tff.framework.AsyncExecutionContext(executor_fn=factory(w), **kw) for w in workers])
