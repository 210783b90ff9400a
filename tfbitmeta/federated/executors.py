"""Where the round's computations run: ``TffExecutor`` (TensorFlow Federated, the default) or ``LocalExecutor``
(the same TF functions in a plain Python loop over clients; the reference for the TFF-overhead benchmark).

Both expose the same steps; per-client values are Python lists in client order (TFF's stateful-clients
pattern: client state lives outside TFF and travels as ``@CLIENTS`` values, docs/stack.md, "TensorFlow Federated 0.87").  Server
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

    def __init__(self, client: ClientWork, server: ServerWork, mix: tuple[float, float] = (0.0, 1.0)):
        self.client, self.server = client, server
        self.mix = mix  # (lambda of the extractor bank, lambda of the exit head) in ``distribute``
        self.server_inputs: list = []
        self._features = tf.function(lambda s, b, c: client.features(s["bank"], s["head"], b, c))
        self._logit_grads = tf.function(client.logit_gradients)
        self._client_update = tf.function(client.update)
        self._server_logits = tf.function(server.logits)
        self._server_update = tf.function(server.update)
        self._aggregate = strategy.heterofl_average  # eager: participant count and tree vary
        self._distribute = tf.function(lambda g, gh, s: _receive(g, gh, s, *mix))

    def distribute(self, global_bank, global_head, states):
        """Every client receives the aggregated model (broadcast) and takes it as its new starting point."""
        return [_np(self._distribute(global_bank, global_head, s)) for s in states]

    def features(self, states, batches, ctls):
        return [_np(self._features(s, b, c)) for s, b, c in zip(states, batches, ctls)]

    def server_logits(self, weights, feats):
        self.server_inputs.append(("server_logits", feats))
        return _np(self._server_logits(weights, feats))

    def logit_gradients(self, logits, batches):
        out = [self._logit_grads(lg, b["y_q"]) for lg, b in zip(logits, batches)]
        return [_np(g) for g, _ in out], [float(l) for _, l in out]

    def server_label_gradients(self, logits, labels):
        """SplitGP only: the clients sent their labels, the server computes dCE/dlogits itself."""
        self.server_inputs.append(("server_label_gradients", logits, labels))
        out = [self._logit_grads(lg, y) for lg, y in zip(logits, labels)]
        return [_np(g) for g, _ in out], [float(l) for _, l in out]

    def server_update(self, weights, feats, dlogits):
        self.server_inputs.append(("server_update", feats, dlogits))
        return _np(self._server_update(weights, feats, dlogits))

    def client_update(self, states, batches, ctls, dfeats):
        return [_np(self._client_update(s, b, c, d)) for s, b, c, d in zip(states, batches, ctls, dfeats)]

    def aggregate(self, global_tree, trees, masks, num_examples):
        """HeteroFL average of ``trees`` (each client's bank or head) where ``masks`` say who holds what."""
        return _np(self._aggregate(global_tree, trees, masks, [np.int32(n) for n in num_examples]))

    def close(self):
        pass


def _receive(global_bank, global_head, state, lam_bank, lam_head):
    return OrderedDict(state, bank=strategy.personalize(state["bank"], global_bank, lam_bank),
                       head=strategy.personalize(state["head"], global_head, lam_head),
                       mask=OrderedDict((k, tf.zeros_like(v)) for k, v in global_bank.items()))


class TffExecutor(LocalExecutor):
    """The same steps as TFF computations: ``tff.tensorflow.computation`` bodies, ``tff.federated_computation``
    placements (``federated_map`` at CLIENTS or SERVER, ``federated_broadcast``, ``federated_sum``).

    ``workers``: optional ``host:port`` list of running ``worker_binary`` processes to execute on instead of a
    local one (see README, "Federated simulation")."""

    name = "tff"

    def __init__(self, client: ClientWork, server: ServerWork, example_state, example_batch, example_ctl,
                 example_server, example_feats, mix: tuple[float, float] = (0.0, 1.0), workers: list[str] | None = None):
        super().__init__(client, server, mix)
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
        bank_t, head_t = state_t.bank, state_t.head
        labels_t = T(tf.TensorSpec([None] + list(np.shape(example_batch["y_q"])), tf.int32))
        n_t = T(tf.TensorSpec([], tf.int32))
        tfc, fc, fmap = tff.tensorflow.computation, tff.federated_computation, tff.federated_map
        Fed = tff.FederatedType

        # Every client computation takes and returns the client's slot (its position in the call): TFF's
        # mergeable-comp context (several workers) concatenates @CLIENTS results in the order its sub-rounds
        # finish, not in client order (measured), so results are put back in order by slot.
        c_features = tfc(lambda i, s, b, c: (i, client.features(s["bank"], s["head"], b, c)), n_t, state_t, batch_t, ctl_t)
        c_grads = tfc(lambda i, lg, b: (i, client.logit_gradients(lg, b["y_q"])), n_t, one_logits_t, batch_t)
        c_update = tfc(lambda i, s, b, c, d: (i, client.update(s, b, c, d)), n_t, state_t, batch_t, ctl_t, one_feats_t)
        s_logits = tfc(server.logits, server_t, feats_t)
        s_update = tfc(server.update, server_t, feats_t, logits_t)
        c_receive = tfc(lambda i, g, gh, s: (i, _receive(g, gh, s, *mix)), n_t, bank_t, head_t, state_t)
        s_label_grads = tfc(lambda lg, y: tf.map_fn(lambda a: client.logit_gradients(a[0], a[1]), (lg, y),
                                                    fn_output_signature=(tf.float32, tf.float32)), logits_t, labels_t)

        @fc(Fed(n_t, C), Fed(bank_t, S), Fed(head_t, S), Fed(state_t, C))
        def distribute(slots, g, gh, states):
            return fmap(c_receive, (slots, tff.federated_broadcast(g), tff.federated_broadcast(gh), states))

        @fc(Fed(logits_t, S), Fed(labels_t, S))
        def server_label_gradients(logits, labels):
            return fmap(s_label_grads, (logits, labels))

        def aggregator(tree_t):
            c_contrib = tfc(strategy.contribution, tree_t, tree_t, tree_t, n_t)
            s_combine = tfc(strategy.combine, tree_t, tree_t, tree_t)

            @fc(Fed(tree_t, S), Fed(tree_t, C), Fed(tree_t, C), Fed(n_t, C))
            def aggregate(g, trees, masks, ns):
                weighted, weights = fmap(c_contrib, (tff.federated_broadcast(g), trees, masks, ns))
                return fmap(s_combine, (g, tff.federated_sum(weighted), tff.federated_sum(weights)))
            return aggregate

        @fc(Fed(n_t, C), Fed(state_t, C), Fed(batch_t, C), Fed(ctl_t, C))
        def features(slots, states, batches, ctls):
            return fmap(c_features, (slots, states, batches, ctls))

        @fc(Fed(server_t, S), Fed(feats_t, S))
        def server_logits(w, feats):
            return fmap(s_logits, (w, feats))

        @fc(Fed(n_t, C), Fed(one_logits_t, C), Fed(batch_t, C))
        def logit_gradients(slots, logits, batches):
            return fmap(c_grads, (slots, logits, batches))

        @fc(Fed(server_t, S), Fed(feats_t, S), Fed(logits_t, S))
        def server_update(w, feats, dlogits):
            return fmap(s_update, (w, feats, dlogits))

        @fc(Fed(n_t, C), Fed(state_t, C), Fed(batch_t, C), Fed(ctl_t, C), Fed(one_feats_t, C))
        def client_update(slots, states, batches, ctls, dfeats):
            return fmap(c_update, (slots, states, batches, ctls, dfeats))

        self.comps = dict(distribute=distribute, features=features, server_logits=server_logits,
                          logit_gradients=logit_gradients, server_label_gradients=server_label_gradients,
                          server_update=server_update, client_update=client_update,
                          aggregate_bank=aggregator(bank_t), aggregate_head=aggregator(head_t))

    def _clients(self, name, *args):
        """Call a computation over clients and return its per-client results in client order."""
        n = len(args[-1])
        out = self.comps[name](list(np.arange(n, dtype=np.int32)), *args)
        ordered = sorted(out, key=lambda r: int(r[0]))
        assert [int(r[0]) for r in ordered] == list(range(n)), "a client's result is missing"
        return [r[1] for r in ordered]

    def distribute(self, global_bank, global_head, states):
        return self._clients("distribute", global_bank, global_head, states)

    def features(self, states, batches, ctls):
        return self._clients("features", states, batches, ctls)

    def server_logits(self, weights, feats):
        self.server_inputs.append(("server_logits", feats))
        return self.comps["server_logits"](weights, feats)

    def logit_gradients(self, logits, batches):
        out = self._clients("logit_gradients", list(logits), batches)
        return [g for g, _ in out], [float(l) for _, l in out]

    def server_label_gradients(self, logits, labels):
        self.server_inputs.append(("server_label_gradients", logits, labels))
        grads, losses = self.comps["server_label_gradients"](np.stack(logits), np.stack(labels))
        return list(grads), [float(l) for l in losses]

    def server_update(self, weights, feats, dlogits):
        self.server_inputs.append(("server_update", feats, dlogits))
        return self.comps["server_update"](weights, feats, dlogits)

    def client_update(self, states, batches, ctls, dfeats):
        return self._clients("client_update", states, batches, ctls, list(dfeats))

    def aggregate(self, global_tree, trees, masks, num_examples):
        which = "aggregate_bank" if set(global_tree) == set(self.client.template) else "aggregate_head"
        return self.comps[which](global_tree, list(trees), list(masks), [np.int32(n) for n in num_examples])

    def close(self):
        """Install a fresh default context: the old one's ServiceManager stops the worker_binary it started (SIGINT
        in its destructor) and a later computation starts a new one.  Workers the user started are not touched;
        what TFF fails to stop is reaped at exit (``workers.install_reaper``)."""
        import gc

        self.tff.backends.native.set_sync_local_cpp_execution_context()
        gc.collect()


def _set_remote_context(tff, workers: list[str], wait_seconds: float = 30.0):
    """Execute on already running ``worker_binary --port P`` processes (TFF's C++ remote executor), built as
    ``local_cpp_executor_factory`` builds its own (docs/stack.md, "The worker_binary").  One worker: a sync context; several: TFF's
    mergeable-comp context, which splits the clients of each computation across the workers and merges results."""
    import time

    import grpc

    def factory(target):
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise TfbitmetaError(f"bad --workers entry {target!r}: use host:port")
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
