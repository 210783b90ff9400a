"""Where the round's computations run: ``TffExecutor`` (TensorFlow Federated, the default) or ``LocalExecutor``
(the same TF functions in a plain Python loop over clients; the reference for the TFF-overhead benchmark).

Both expose the same steps; per-client values are Python lists in client order (TFF's stateful-clients
pattern: client state lives outside TFF and travels as ``@CLIENTS`` values, stack-facts.md §1.5).  Server
computations receive only features and logit gradients; ``server_inputs`` records what they were given so a
test can check that no label reaches them.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorflow as tf

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.federated import strategy
from tfbitmeta.federated.client import ClientWork
from tfbitmeta.federated.server import ServerWork


def _np(tree):
    return tf.nest.map_structure(lambda t: np.asarray(t), tree)


def _spec(example, batch_dim: bool = False):
    def one(a):
        a = np.asarray(a)
        shape = ([None] + list(a.shape[1:])) if batch_dim else list(a.shape)
        return tf.TensorSpec(shape, tf.as_dtype(a.dtype))
    return tf.nest.map_structure(one, example)


class LocalExecutor:
    """Plain TF: each step is a ``tf.function`` called once per client (or once for the server)."""

    name = "tf"

    def __init__(self, client: ClientWork, server: ServerWork):
        self.client, self.server = client, server
        self.server_inputs: list = []
        self._features = tf.function(lambda s, b, c: client.features(s["bank"], s["head"], b, c))
        self._logit_grads = tf.function(client.logit_gradients)
        self._client_update = tf.function(client.update)
        self._server_logits = tf.function(server.logits)
        self._server_update = tf.function(server.update)
        self._aggregate = tf.function(strategy.heterofl_average)

    def start_round(self, global_bank, states):
        return [OrderedDict(s, bank=global_bank, mask=OrderedDict((k, np.zeros_like(v)) for k, v in global_bank.items()))
                for s in states]

    def features(self, states, batches, ctls):
        return [_np(self._features(s, b, c)) for s, b, c in zip(states, batches, ctls)]

    def server_logits(self, weights, feats):
        self.server_inputs.append(("server_logits", feats))
        return _np(self._server_logits(weights, feats))

    def logit_gradients(self, logits, batches):
        out = [self._logit_grads(lg, b["y_q"]) for lg, b in zip(logits, batches)]
        return [_np(g) for g, _ in out], [float(l) for _, l in out]

    def server_update(self, weights, feats, dlogits):
        self.server_inputs.append(("server_update", feats, dlogits))
        return _np(self._server_update(weights, feats, dlogits))

    def client_update(self, states, batches, ctls, dfeats):
        return [_np(self._client_update(s, b, c, d)) for s, b, c, d in zip(states, batches, ctls, dfeats)]

    def aggregate(self, global_bank, states, num_examples):
        return _np(self._aggregate(global_bank, [s["bank"] for s in states], [s["mask"] for s in states],
                                   [np.int32(n) for n in num_examples]))

    def close(self):
        pass


class TffExecutor(LocalExecutor):
    """The same steps as TFF computations: ``tff.tensorflow.computation`` bodies, ``tff.federated_computation``
    placements (``federated_map`` at CLIENTS or SERVER, ``federated_broadcast``, ``federated_sum``).

    ``workers``: optional ``host:port`` list of running ``worker_binary`` processes to execute on instead of a
    local one (see README, "Federated simulation")."""

    name = "tff"

    def __init__(self, client: ClientWork, server: ServerWork, example_state, example_batch, example_ctl,
                 example_server, example_feats, workers: list[str] | None = None):
        super().__init__(client, server)
        import tensorflow_federated as tff  # lazy: ~20 s, only the federated commands pay it

        self.tff = tff
        if workers:
            _set_remote_context(tff, workers)
        C, S = tff.CLIENTS, tff.SERVER
        T = tff.types.tensorflow_to_type
        state_t, batch_t, ctl_t = T(_spec(example_state)), T(_spec(example_batch)), T(_spec(example_ctl))
        server_t = T(_spec(example_server))
        feats_t = T(_spec(example_feats, batch_dim=True))              # (K, 2, Q, h, w, c), K = participants
        one_feats_t = T(_spec(example_feats[0]))                        # one client's (2, Q, h, w, c)
        logits_ex = np.zeros(example_feats.shape[:3] + (example_server["fc2/bias"].shape[0],), np.float32)
        logits_t, one_logits_t = T(_spec(logits_ex, batch_dim=True)), T(_spec(logits_ex[0]))
        bank_t = state_t.bank
        n_t = T(tf.TensorSpec([], tf.int32))
        tfc, fc, fmap = tff.tensorflow.computation, tff.federated_computation, tff.federated_map
        Fed = tff.FederatedType

        c_features = tfc(lambda s, b, c: client.features(s["bank"], s["head"], b, c), state_t, batch_t, ctl_t)
        c_grads = tfc(lambda lg, b: client.logit_gradients(lg, b["y_q"]), one_logits_t, batch_t)
        c_update = tfc(client.update, state_t, batch_t, ctl_t, one_feats_t)
        s_logits = tfc(server.logits, server_t, feats_t)
        s_update = tfc(server.update, server_t, feats_t, logits_t)
        c_start = tfc(lambda g, s: OrderedDict(s, bank=g, mask=OrderedDict((k, tf.zeros_like(v)) for k, v in g.items())),
                      bank_t, state_t)
        c_contrib = tfc(strategy.contribution, bank_t, bank_t, bank_t, n_t)
        s_combine = tfc(strategy.combine, bank_t, bank_t, bank_t)

        @fc(Fed(bank_t, S), Fed(state_t, C))
        def start_round(g, states):
            return fmap(c_start, (tff.federated_broadcast(g), states))

        @fc(Fed(state_t, C), Fed(batch_t, C), Fed(ctl_t, C))
        def features(states, batches, ctls):
            return fmap(c_features, (states, batches, ctls))

        @fc(Fed(server_t, S), Fed(feats_t, S))
        def server_logits(w, feats):
            return fmap(s_logits, (w, feats))

        @fc(Fed(one_logits_t, C), Fed(batch_t, C))
        def logit_gradients(logits, batches):
            return fmap(c_grads, (logits, batches))

        @fc(Fed(server_t, S), Fed(feats_t, S), Fed(logits_t, S))
        def server_update(w, feats, dlogits):
            return fmap(s_update, (w, feats, dlogits))

        @fc(Fed(state_t, C), Fed(batch_t, C), Fed(ctl_t, C), Fed(one_feats_t, C))
        def client_update(states, batches, ctls, dfeats):
            return fmap(c_update, (states, batches, ctls, dfeats))

        @fc(Fed(bank_t, S), Fed(bank_t, C), Fed(bank_t, C), Fed(n_t, C))
        def aggregate(g, banks, masks, ns):
            weighted, weights = fmap(c_contrib, (tff.federated_broadcast(g), banks, masks, ns))
            return fmap(s_combine, (g, tff.federated_sum(weighted), tff.federated_sum(weights)))

        self.comps = dict(start_round=start_round, features=features, server_logits=server_logits,
                          logit_gradients=logit_gradients, server_update=server_update, client_update=client_update,
                          aggregate=aggregate)

    def start_round(self, global_bank, states):
        return list(self.comps["start_round"](global_bank, states))

    def features(self, states, batches, ctls):
        return list(self.comps["features"](states, batches, ctls))

    def server_logits(self, weights, feats):
        self.server_inputs.append(("server_logits", feats))
        return self.comps["server_logits"](weights, feats)

    def logit_gradients(self, logits, batches):
        out = self.comps["logit_gradients"](list(logits), batches)
        return [g for g, _ in out], [float(l) for _, l in out]

    def server_update(self, weights, feats, dlogits):
        self.server_inputs.append(("server_update", feats, dlogits))
        return self.comps["server_update"](weights, feats, dlogits)

    def client_update(self, states, batches, ctls, dfeats):
        return list(self.comps["client_update"](states, batches, ctls, list(dfeats)))

    def aggregate(self, global_bank, states, num_examples):
        return self.comps["aggregate"](global_bank, [s["bank"] for s in states], [s["mask"] for s in states],
                                       [np.int32(n) for n in num_examples])

    def close(self):
        from tfbitmeta.federated.workers import reap_workers

        reap_workers()


def _set_remote_context(tff, workers: list[str]):
    """Execute on already running ``worker_binary --port P`` processes (TFF's C++ remote executors), clients
    split across them, as ``local_cpp_executor_factory`` does for its own worker (stack-facts.md §1.8)."""
    import grpc

    stubs = []
    for w in workers:
        host, _, port = w.rpartition(":")
        if not host or not port.isdigit():
            raise TfbitmetaError(f"bad --workers entry {w!r}: use host:port")
        stubs.append(tff.framework.RemoteExecutorGrpcStub(grpc.insecure_channel(w)))
    contexts = []
    for stub in stubs:
        def stack(cardinalities, stub=stub):
            ex = tff.framework.RemoteExecutor(stub)
            ex.set_cardinalities(cardinalities)
            return ex
        factory = tff.framework.ResourceManagingExecutorFactory(stack)
        contexts.append(tff.framework.AsyncExecutionContext(
            executor_fn=factory, compiler_fn=tff.backends.native.desugar_and_transform_to_native,
            transform_args=tff.tensorflow.transform_args, transform_result=tff.tensorflow.transform_result))
    if len(contexts) == 1:
        tff.framework.set_default_context(tff.framework.SyncExecutionContext(
            executor_fn=contexts[0]._executor_factory, compiler_fn=tff.backends.native.desugar_and_transform_to_native,
            transform_args=tff.tensorflow.transform_args, transform_result=tff.tensorflow.transform_result))
    else:
        tff.backends.native.set_mergeable_comp_execution_context(contexts)
