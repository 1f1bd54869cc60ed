"""Small float64 building blocks shared by the loss models."""

from __future__ import annotations

import math

import numpy as np

EPS = float(np.finfo(np.float64).eps)
# max |p(1-p)(1-2p)| = max |third central moment| of a distribution on an interval of length 1
THIRD_MOMENT_MAX = float(np.sqrt(3.0) / 18.0)
_CRITICAL = ((3.0 - np.sqrt(3.0)) / 6.0, (3.0 + np.sqrt(3.0)) / 6.0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def softplus(x: np.ndarray) -> np.ndarray:
    """softplus(x) = ln(1 + e^x) = max(x, 0) + log1p(exp(-|x|)), exp never overflows.

    -softplus(-x) = ln s(x) and exp(-softplus(-x)) = s(x) keep relative precision down to the
    subnormals, where 1/(1 + exp(-x)) is 0 once exp(-x) overflows (x < -709.8)."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def logistic_third_max(logit: np.ndarray, h: np.ndarray) -> np.ndarray:
    """max |p(1-p)(1-2p)| for p = sigmoid(t), t in [logit - h, logit + h].

    This is the third derivative of softplus (and of lse along one coordinate, with the
    coordinate's logit log a - log(1 - a)), bounded exactly on the step's interval.
    """
    with np.errstate(invalid="ignore"):
        lo = sigmoid(logit - h)
        hi = sigmoid(logit + h)
    lo = np.where(np.isnan(lo), 1.0, lo)
    hi = np.where(np.isnan(hi), 1.0, hi)

    def third(p):
        return np.abs(p * (1.0 - p) * (1.0 - 2.0 * p))

    g3 = np.maximum(third(lo), third(hi))
    for crit in _CRITICAL:
        g3 = np.where((lo <= crit) & (crit <= hi), THIRD_MOMENT_MAX, g3)
    return g3


def loss_sum(row_loss: np.ndarray) -> float:
    """Sum of row losses: exactly rounded (fsum) up to 2**20 rows, pairwise beyond."""
    if row_loss.size > 1 << 20:
        return float(np.sum(row_loss))
    try:
        return math.fsum(row_loss.tolist())
    except OverflowError:  # partial sums beyond the float64 range: the total is infinite
        with np.errstate(over="ignore"):
            return float(np.sum(row_loss))
