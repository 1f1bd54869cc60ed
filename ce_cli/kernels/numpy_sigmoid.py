"""The numpy sigmoid BCE kernel, per element with weight w and pos_weight pw:

    l = w * [pw * y * softplus(-x) + (1 - y) * softplus(x)]
    dl/dx = w * [(1 - y) * s(x) - pw * y * s(-x)]

(-log s(x) = softplus(-x)); both terms are non-negative, so nothing cancels at any |x|.
With a softcap or logit scale (`model.transformed`) the same on z = T(x) (numpy_softmax.transform),
and the gradient w.r.t. the raw logits is dl/dz * T'(x).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ce_cli.kernels.base import ChunkEval
from ce_cli.kernels.numpy_softmax import transform


def sigmoid_rows(model: Any, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                 floor_coef: float | None = None) -> ChunkEval:
    """Per-element losses, gradient and (given `floor_coef` = k*eps) error floor of rows `rows`
    of `model` (a SigmoidBCE) with logits `z_rows`."""
    x = np.array(z_rows, dtype=np.float64)
    top = x.max(axis=1)
    if not np.all(np.isfinite(top) | np.isneginf(top)):
        model.report_bad_logit(x, rows)
    y, w, pw = model.coefficients(rows)
    dz: Any = None
    if model.transformed:
        with np.errstate(over="ignore", invalid="ignore"):
            x, dz = transform(x, model.sem.logit_scale, model.sem.softcap)
    pos = y if pw is None else pw * y
    with np.errstate(invalid="ignore", over="ignore"):
        e_abs = np.exp(-np.abs(x))
        items = _items(x, y, w, pos, e_abs)
    coef = 1.0 + (pw - 1.0) * y if pw is not None else np.ones_like(y)
    g = floor = None
    if grad or floor_coef is not None:
        g, floor = _gradient(model, x, dz, y, w, pos, coef, e_abs, grad, floor_coef)
    magnitude = np.abs(coef) * (1.0 if w is None else np.abs(w))
    if dz is None:
        return ChunkEval(loss=items.sum(axis=1), grad=g, floor=floor, lse=np.zeros(x.shape[0]),
                         total_weight=magnitude.sum(axis=1), items=items, item_weight=magnitude)
    # through T: |dl/dz| <= |w| (|1 - y| + |pw y|) times the rounded z's error eps*|z|
    g1 = (np.abs(1.0 - y) + np.abs(pos)) * (1.0 if w is None else np.abs(w))
    item_weight = magnitude + g1 * _finite_abs(x)
    terms = np.stack([magnitude.sum(axis=1), g1.sum(axis=1)], axis=1)
    return ChunkEval(loss=items.sum(axis=1), grad=g, floor=floor, lse=np.zeros(x.shape[0]),
                     total_weight=item_weight.sum(axis=1), items=items, item_weight=item_weight,
                     row_terms=terms)


def _gradient(model: Any, x: np.ndarray, dz: Any, y, w, pos, coef, e_abs: np.ndarray, grad: bool,
              floor_coef: float | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The gradient of the reduced loss w.r.t. the raw logits and (given `floor_coef`) the
    error floor, at logits (or transformed logits) x."""
    scale = model.grad_scale
    # s(x) and s(-x) = 1 - s(x) from e = exp(-|x|): relative error ~2 eps at any x
    # (exp(-softplus(-x)) would inherit the rounding of |x| + log1p(e): eps*|x|)
    small = e_abs / (1.0 + e_abs)
    large = 1.0 / (1.0 + e_abs)
    s_pos = np.where(x >= 0, large, small)   # s(x)
    s_neg = np.where(x >= 0, small, large)   # s(-x), without cancellation
    g_z = (1.0 - y) * s_pos - pos * s_neg
    g = floor = None
    if grad:
        g = g_z * scale if w is None else g_z * (w * scale)
        if dz is not None:
            g *= dz
    if floor_coef is not None:
        # a correct implementation's (1 + (pw-1)y) s(x) - pw y rounds at eps*(coef*s + pw*y)
        floor = floor_coef * scale * (np.abs(coef) * s_pos + np.abs(pos))
        if dz is not None:
            floor = _transformed_floor(model, x, dz, coef, pos, s_pos, s_neg, g_z, floor_coef * scale)
        if w is not None:
            floor *= np.abs(w)
    return g, floor


def _finite_abs(z: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(z), np.abs(z), 0.0)


def _transformed_floor(model: Any, z: np.ndarray, dz: Any, coef, pos, s_pos, s_neg, g_z,
                       k_scale: float) -> np.ndarray:
    """k*eps*scale * (|T'| (|c| s(z) (1 + s(-z) |z|) + |pw y|) + S |dl/dz|): the plain floor on z,
    the rounded z (its error eps*|z| moves s(z) by s(1 - s) eps |z|), and with a softcap T'
    itself (S sech^2 formed in the working precision errs by ~eps * S absolutely)."""
    soft = np.abs(coef) * s_pos * (1.0 + s_neg * _finite_abs(z)) + np.abs(pos)
    floor = soft * np.abs(dz)
    if model.sem.softcap is not None:
        floor += abs(model.sem.logit_scale) * np.abs(g_z)
    return floor * k_scale


def _items(x: np.ndarray, y: np.ndarray, w: np.ndarray | None, pos: np.ndarray,
           e_abs: np.ndarray) -> np.ndarray:
    tail = np.log1p(e_abs)
    sp_neg = np.maximum(-x, 0.0) + tail    # softplus(-x) = -log s(x)
    sp_pos = np.maximum(x, 0.0) + tail     # softplus(x) = -log(1 - s(x))
    items = np.where(pos != 0, pos * sp_neg, 0.0) + np.where(y != 1, (1.0 - y) * sp_pos, 0.0)
    return np.where(w != 0, items * w, 0.0) if w is not None else items
