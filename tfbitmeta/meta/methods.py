"""Training methods as task samplers over bitwidth configurations.

All three share the training-loop core (:mod:`tfbitmeta.meta.loop`); a method only says which bitwidth
configurations each optimizer step trains on and whether non-FP tasks distill from the FP task.

* ``mebqat``     -- T tasks per step: the guaranteed ones first ((FP,FP), then (1,1) when 1-bit is a
  candidate), the rest drawn uniformly from the candidate configurations (docs/method.md, "Tasks").
* ``anyprec``    -- every configuration of its set each step (the bitwidth-adaptive QAT baseline).
* ``dedicated``  -- one fixed configuration (ordinary QAT, the per-bitwidth baseline).
"""
from __future__ import annotations

import numpy as np

from tfbitmeta.errors import BadArgument
from tfbitmeta.quant.bitwidth import FP, BitSpace, Config


class Method:
    name = "base"
    distill = False

    def __init__(self, space: BitSpace, seed: int = 0):
        self.space = space
        self.seed = seed

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def tasks(self, step: int) -> np.ndarray:
        """(T, 2) float32 bit configurations for optimizer step ``step`` (deterministic in seed and step)."""
        raise NotImplementedError

    @property
    def covered(self) -> list[Config]:
        """The configurations this method trains the model to support."""
        return self.space.configs

    @property
    def eval_configs(self) -> list[Config]:
        return self.space.diagonal


class MEBQAT(Method):
    name = "mebqat"
    distill = True

    def __init__(self, space: BitSpace, seed: int = 0, num_tasks: int = 4, guaranteed=None):
        super().__init__(space, seed)
        if guaranteed is None:
            guaranteed = [(FP, FP)] + ([(1, 1)] if (1, 1) in space.configs else [])
        self.guaranteed = [tuple(g) for g in guaranteed][:num_tasks]
        if FP not in space.bits:
            raise BadArgument("mebqat needs full precision among the candidates (it is the distillation teacher)",
                              param="bits")
        self._num_tasks = num_tasks

    @property
    def num_tasks(self):
        return self._num_tasks

    def tasks(self, step):
        rng = np.random.default_rng([self.seed, step, 1])
        configs = self.space.configs
        drawn = [configs[i] for i in rng.integers(0, len(configs), self._num_tasks - len(self.guaranteed))]
        return np.asarray(self.guaranteed + drawn, np.float32)


class AnyPrecision(Method):
    name = "anyprec"
    distill = True

    def __init__(self, space: BitSpace, seed: int = 0):
        super().__init__(space, seed)
        if FP not in space.bits:
            raise BadArgument("anyprec needs full precision among the candidates (it is the distillation teacher)",
                              param="bits")
        self._tasks = np.asarray([(FP, FP)] + [c for c in space.configs if c != (FP, FP)], np.float32)

    @property
    def num_tasks(self):
        return len(self._tasks)

    def tasks(self, step):
        return self._tasks


class Dedicated(Method):
    name = "dedicated"

    def __init__(self, space: BitSpace, seed: int = 0):
        super().__init__(space, seed)
        if len(space.configs) != 1:
            raise BadArgument("dedicated QAT trains one bitwidth: give a single candidate (e.g. 4)", param="bits")

    @property
    def num_tasks(self):
        return 1

    def tasks(self, step):
        return np.asarray(self.space.configs, np.float32)


METHODS = {m.name: m for m in (MEBQAT, AnyPrecision, Dedicated)}


def make_method(name: str, space: BitSpace, seed: int = 0, num_tasks: int = 4) -> Method:
    if name not in METHODS:
        raise BadArgument(f"unknown method {name!r}; choose from {', '.join(METHODS)}", param="method")
    if name == "mebqat":
        return MEBQAT(space, seed, num_tasks=num_tasks)
    return METHODS[name](space, seed)
