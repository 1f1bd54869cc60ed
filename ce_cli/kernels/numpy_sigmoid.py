"""The numpy sigmoid BCE kernel, per element with weight w and pos_weight pw:

    l = w * [pw * y * softplus(-x) + (1 - y) * softplus(x)]
    dl/dx = w * [(1 - y) * s(x) - pw * y * s(-x)]

(-log s(x) = softplus(-x)); both terms are non-negative, so nothing cancels at any |x|.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ce_cli.kernels.base import ChunkEval


def sigmoid_rows(model: Any, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                 floor_coef: float | None = None) -> ChunkEval:
    """Per-element losses, gradient and (given `floor_coef` = k*eps) error floor of rows `rows`
    of `model` (a SigmoidBCE) with logits `z_rows`."""
    x = np.array(z_rows, dtype=np.float64)
    top = x.max(axis=1)
    if not np.all(np.isfinite(top) | np.isneginf(top)):
        model.report_bad_logit(x, rows)
    y, w, pw = model.coefficients(rows)
    pos = y if pw is None else pw * y
    with np.errstate(invalid="ignore", over="ignore"):
        e_abs = np.exp(-np.abs(x))
        items = _items(x, y, w, pos, e_abs)
    scale = model.grad_scale
    coef = 1.0 + (pw - 1.0) * y if pw is not None else np.ones_like(y)
    g = floor = None
    if grad or floor_coef is not None:
        # s(x) and s(-x) = 1 - s(x) from e = exp(-|x|): relative error ~2 eps at any x
        # (exp(-softplus(-x)) would inherit the rounding of |x| + log1p(e): eps*|x|)
        small = e_abs / (1.0 + e_abs)
        large = 1.0 / (1.0 + e_abs)
        s_pos = np.where(x >= 0, large, small)   # s(x)
        s_neg = np.where(x >= 0, small, large)   # s(-x), without cancellation
    if grad:
        g = (1.0 - y) * s_pos - pos * s_neg
        g *= scale if w is None else w * scale
    if floor_coef is not None:
        # a correct implementation's (1 + (pw-1)y) s(x) - pw y rounds at eps*(coef*s + pw*y)
        floor = floor_coef * scale * (np.abs(coef) * s_pos + np.abs(pos))
        if w is not None:
            floor *= np.abs(w)
    magnitude = np.abs(coef) * (1.0 if w is None else np.abs(w))
    return ChunkEval(loss=items.sum(axis=1), grad=g, floor=floor, lse=np.zeros(x.shape[0]),
                     total_weight=magnitude.sum(axis=1), items=items, item_weight=magnitude)


def _items(x: np.ndarray, y: np.ndarray, w: np.ndarray | None, pos: np.ndarray,
           e_abs: np.ndarray) -> np.ndarray:
    tail = np.log1p(e_abs)
    sp_neg = np.maximum(-x, 0.0) + tail    # softplus(-x) = -log s(x)
    sp_pos = np.maximum(x, 0.0) + tail     # softplus(x) = -log(1 - s(x))
    items = np.where(pos != 0, pos * sp_neg, 0.0) + np.where(y != 1, (1.0 - y) * sp_pos, 0.0)
    return np.where(w != 0, items * w, 0.0) if w is not None else items
