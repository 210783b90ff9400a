"""Mean accuracy over episodes with a 95 % confidence interval (Student t, two-sided).

``half_width = t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (ddof=1).  For the usual
600 episodes t = 1.964, i.e. the few-shot literature's ``1.96 * std / sqrt(n)`` to three digits.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half width of the ``level`` confidence interval of the mean); half width is nan for n < 2."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    s = float(x.std(ddof=1))
    return mean, t_quantile(0.5 + level / 2.0, x.size - 1) * s / math.sqrt(x.size)
