"""The textbook implementations `ce-check stress` sweeps, computed in the dtype under test; row
sums and the reduction accumulate in float32 for 16-bit dtypes, as GPU kernels do, and the
reduced loss is returned in that accumulator:

- `naive_softmax_ce`:   p = exp(z) / sum exp(z), loss = -log p_y       (exp overflows past ln(max))
- `shifted_softmax_ce`: p = exp(z - m) / sum exp(z - m), loss = -log p_y (p_y underflows to 0)
- `log_softmax_ce`:     log p = (z - m) - log sum exp(z - m)             (stable)
- `naive_sigmoid_bce`:  s = 1 / (1 + exp(-x)), loss = -(y log s + (1 - y) log(1 - s))
- `stable_sigmoid_bce`: loss = y softplus(-x) + (1 - y) softplus(x), softplus via log1p(exp(-|x|))

Each takes `(logits, labels, reduction="mean")` and returns `(loss, grad)`, the signature
`--impl` expects, so `--impl ce_cli.stress:naive_softmax_ce` runs one of them as a user's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ce_cli.enums import Kind, Reduction
from ce_cli.stress.scenarios import IGNORE_INDEX

LossGrad = tuple[np.ndarray, np.ndarray]


def _acc(dtype: np.dtype) -> np.dtype:
    """Accumulator: float32 for 16-bit dtypes (as GPU kernels do), else the dtype itself."""
    return np.dtype(np.float32) if dtype.itemsize <= 2 else dtype


def _const(value: float, dtype: np.dtype) -> np.ndarray:
    return np.asarray(value, dtype=dtype)


def _reduce(items: np.ndarray, grad: np.ndarray, valid: np.ndarray, reduction: str) -> LossGrad:
    """Reduce per-sample losses (dtype) and scale the gradient of the per-sample losses.

    The reduced loss stays in the accumulator (float32 for 16-bit dtypes): a float16 sum of
    131,072 losses can pass 65504. The gradient is returned in the dtype."""
    dt = items.dtype
    acc = _acc(dt)
    zero = _const(0, dt)
    items = np.where(valid, items, zero)
    grad = np.where(valid.reshape(valid.shape + (1,) * (grad.ndim - valid.ndim)), grad, zero)
    if reduction == Reduction.none.value:
        return items, grad
    total = items.astype(acc).sum()
    if reduction == Reduction.sum.value:
        return total, grad
    count = int(np.count_nonzero(valid))
    if count == 0:
        return _const(np.nan, acc), np.zeros_like(grad)
    # the 1/count scaling in the accumulator: a float16 count past 65504 would be inf
    return total / acc.type(count), (grad.astype(acc) / count).astype(dt)


def _labels(labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Class indices with ignored rows pointed at class 0, and the mask of rows that count."""
    y = np.asarray(labels).astype(np.int64)
    valid = y != IGNORE_INDEX
    return np.where(valid, y, 0), valid


def _minus_onehot(p: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """p - onehot(y): the gradient of -log p_y with respect to the logits."""
    g = p.copy()
    r = np.arange(p.shape[0])
    g[r, ys] = g[r, ys] - _const(1, p.dtype)
    return g


def _row_max(z: np.ndarray) -> np.ndarray:
    """m = max_j z_j per row; 0 where m is not finite (an all -inf row: -inf - (-inf) is NaN)."""
    m = z.max(axis=-1, keepdims=True)
    return np.where(np.isfinite(m), m, _const(0, z.dtype))


def naive_softmax_ce(logits: ArrayLike, labels: ArrayLike, reduction: str = "mean") -> LossGrad:
    """Textbook softmax then log: p = exp(z) / sum exp(z); exp overflows past ln(max)."""
    return _softmax_then_log(logits, labels, reduction, shift=False)


def shifted_softmax_ce(logits: ArrayLike, labels: ArrayLike, reduction: str = "mean") -> LossGrad:
    """Max-shifted softmax then log: no overflow, but log(p_y) = -inf once p_y underflows."""
    return _softmax_then_log(logits, labels, reduction, shift=True)


def _softmax_then_log(logits: ArrayLike, labels: ArrayLike, reduction: str, shift: bool) -> LossGrad:
    z = np.asarray(logits)
    ys, valid = _labels(labels)
    with np.errstate(all="ignore"):
        e = np.exp(z - _row_max(z) if shift else z)
        p = e / e.sum(axis=-1, keepdims=True, dtype=_acc(z.dtype)).astype(z.dtype)
        loss = -np.log(p[np.arange(z.shape[0]), ys])
        return _reduce(loss, _minus_onehot(p, ys), valid, reduction)


def log_softmax_ce(logits: ArrayLike, labels: ArrayLike, reduction: str = "mean") -> LossGrad:
    """Log-softmax via log-sum-exp: log p = (z - m) - log sum exp(z - m); gradient exp(log p) - y."""
    z = np.asarray(logits)
    ys, valid = _labels(labels)
    with np.errstate(all="ignore"):
        zs = z - _row_max(z)
        s = np.exp(zs).sum(axis=-1, keepdims=True, dtype=_acc(z.dtype))
        logp = zs - np.log(s).astype(z.dtype)
        loss = -logp[np.arange(z.shape[0]), ys]
        return _reduce(loss, _minus_onehot(np.exp(logp), ys), valid, reduction)


def naive_sigmoid_bce(logits: ArrayLike, labels: ArrayLike, reduction: str = "mean") -> LossGrad:
    """Textbook BCE: s = 1/(1 + exp(-x)), -(y log s + (1 - y) log(1 - s)); 1 - s cancels."""
    x = np.asarray(logits)
    y = np.asarray(labels).astype(x.dtype)
    one = _const(1, x.dtype)
    with np.errstate(all="ignore"):
        s = one / (one + np.exp(-x))
        items = -(y * np.log(s) + (one - y) * np.log(one - s))
        return _reduce(items, s - y, np.ones(x.shape, dtype=bool), reduction)


def _softplus(x: np.ndarray) -> np.ndarray:
    """softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|), exp never overflows."""
    return np.maximum(x, _const(0, x.dtype)) + np.log1p(np.exp(-np.abs(x)))


def stable_sigmoid_bce(logits: ArrayLike, labels: ArrayLike, reduction: str = "mean") -> LossGrad:
    """Stable BCE: y softplus(-x) + (1 - y) softplus(x), both terms >= 0 (nothing cancels);
    s(x) from exp(-|x|) on the side where it cannot overflow."""
    x = np.asarray(logits)
    y = np.asarray(labels).astype(x.dtype)
    one, zero = _const(1, x.dtype), _const(0, x.dtype)
    with np.errstate(all="ignore"):
        items = (np.where(y != zero, y * _softplus(-x), zero)
                 + np.where(y != one, (one - y) * _softplus(x), zero))
        e = np.exp(-np.abs(x))
        s = np.where(x >= zero, one / (one + e), e / (one + e))
        return _reduce(items, s - y, np.ones(x.shape, dtype=bool), reduction)


@dataclass(frozen=True)
class Builtin:
    """A built-in implementation: its grid name, the function, one line on its form."""

    name: str
    fn: Callable[..., LossGrad]
    description: str

    @property
    def spec(self) -> str:
        """The `--impl` spec that runs it: ce_cli.stress:<function>."""
        return f"ce_cli.stress:{self.fn.__name__}"


BUILTINS: dict[str, tuple[Builtin, ...]] = {
    Kind.multiclass.value: (
        Builtin("naive", naive_softmax_ce, "softmax -> log, no max shift"),
        Builtin("max-shift", shifted_softmax_ce, "max-shifted softmax -> log"),
        Builtin("log-softmax", log_softmax_ce, "log-softmax via log-sum-exp"),
    ),
    Kind.binary.value: (
        Builtin("naive", naive_sigmoid_bce, "log s(x), log(1 - s(x))"),
        Builtin("stable", stable_sigmoid_bce, "softplus form, log1p(exp(-|x|))"),
    ),
}
