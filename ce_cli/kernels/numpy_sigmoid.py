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

from ce_cli.kernels.base import ChunkEval, take_rows
from ce_cli.kernels.numpy_softmax import SOFTCAP_DERIV_ERR, transform


def sigmoid_rows(model: Any, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                 floor_coef: float | None = None) -> ChunkEval:
    """Per-element losses, gradient and (given `floor_coef` = k*eps) error floor of rows `rows`
    of `model` (a SigmoidBCE) with logits `z_rows`."""
    x = np.array(z_rows, dtype=np.float64)
    top = x.max(axis=1)
    if not np.all(np.isfinite(top) | np.isneginf(top)):
        model.report_bad_logit(x, rows)
    lab = _hard_labels(model, x, top, rows)
    if lab is not None:
        return _hard_rows(model, x, lab, grad, floor_coef)
    y, w, pw = model.coefficients(rows)
    dz: Any = None
    if model.transformed:
        with np.errstate(over="ignore", invalid="ignore"):
            x, dz = transform(x, model.sem.logit_scale, model.sem.softcap)
    pos = y if pw is None else pw * y
    omy = 1.0 - y
    with np.errstate(invalid="ignore", over="ignore"):
        e_abs = np.abs(x)
        np.negative(e_abs, out=e_abs)
        np.exp(e_abs, out=e_abs)  # exp(-|x|)
        items = _items(x, y, omy, w, pos, e_abs, _all_finite(x, None if dz is not None else top))
    coef = 1.0 + (pw - 1.0) * y if pw is not None else None  # None: all ones
    g = floor = None
    if grad or floor_coef is not None:
        g, floor = _gradient(model, x, dz, omy, w, pos, pw is not None, e_abs, grad, floor_coef)
    magnitude, total = _magnitude(y, w, coef)
    if dz is None:
        return ChunkEval(loss=items.sum(axis=1), grad=g, floor=floor, lse=np.zeros(x.shape[0]),
                         total_weight=total, items=items, item_weight=magnitude)
    # through T: |dl/dz| <= |w| (|1 - y| + |pw y|) times the rounded z's error eps*|z|
    g1 = (np.abs(1.0 - y) + np.abs(pos)) * (1.0 if w is None else np.abs(w))
    item_weight = magnitude + g1 * _finite_abs(x)
    terms = np.stack([total, g1.sum(axis=1)], axis=1)
    return ChunkEval(loss=items.sum(axis=1), grad=g, floor=floor, lse=np.zeros(x.shape[0]),
                     total_weight=item_weight.sum(axis=1), items=items, item_weight=item_weight,
                     row_terms=terms)


# |x| below this keeps exp(-|x|) > 0, so s(x) and s(-x) are never 0 and the hard path's signed
# products have the general path's signs (0 - s(-x) is +0 there, s(-x) * -1 would be -0)
HARD_X_MAX = 700.0


def _hard_labels(model: Any, x: np.ndarray, top: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """The rows' labels when the hard path serves them (else None): labels exactly 0 or 1, no
    weight, pos_weight, smoothing or transform, every |x| < HARD_X_MAX."""
    if (model.transformed or model.smoothing or model.pos_weight is not None
            or model.weight is not None or model.sem.sample_weight is not None or x.size == 0):
        return None
    lab = take_rows(model.targets, rows)
    # soft labels fail on the first row already, before the passes over the chunk
    if not (_zero_one(lab[:1]) and top.max() < HARD_X_MAX and x.min() > -HARD_X_MAX):
        return None
    return lab if _zero_one(lab) else None


def _zero_one(y: np.ndarray) -> bool:
    """Every y is 0 or 1: y * y == y only there (also in integer types; NaN never equals
    itself)."""
    return np.array_equal(np.multiply(y, y), y)


def _hard_rows(model: Any, x: np.ndarray, lab: np.ndarray, grad: bool,
               floor_coef: float | None) -> ChunkEval:
    """`sigmoid_rows` on hard labels (`_hard_labels`) in fewer passes, bit for bit the general
    formulas: with sg = 1 - 2y and t = sg x, the one non-zero term of an item is softplus(-t) =
    max(t, 0) + log1p(e), the gradient sg s(t) (s(t) = max(e, sign t) / (1 + e), sign t = sg
    sign x) and the floor's s(x) + y + |1 - y| = s(x) + 1. Buffers are reused (a fresh one costs more
    than a pass over a warm one); sign is never taken in place (numpy's in-place sign is ~10x
    slower)."""
    y = np.asarray(lab, dtype=np.float64)  # read only: float64 labels are not copied
    sg = np.multiply(y, -2.0)
    sg += 1.0
    items = np.multiply(x, sg)  # t
    e = np.abs(x)
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.maximum(items, _zeros_like_row(items), out=items)
    d1 = np.log1p(e)
    items += d1
    g = floor = None
    if grad or floor_coef is not None:
        np.add(e, 1.0, out=d1)
        sx = np.sign(x)
        if floor_coef is not None:
            floor = np.maximum(e, sx, out=x)
            floor /= d1  # s(x)
            floor += 1.0  # (s(x) + y) + |1 - y| rounds to s(x) + 1 at y = 0 and y = 1
            floor *= floor_coef * model.grad_scale
        if grad:
            g = np.multiply(sx, sg, out=sx)  # sign(t)
            np.maximum(e, g, out=g)
            g /= d1  # s(t)
            g *= sg
            g *= model.grad_scale
    magnitude, total = _magnitude(y, None, None)
    return ChunkEval(loss=items.sum(axis=1), grad=g, floor=floor, lse=np.zeros(x.shape[0]),
                     total_weight=total, items=items, item_weight=magnitude)


def _gradient(model: Any, x: np.ndarray, dz: Any, omy, w, pos, has_pw: bool, e_abs: np.ndarray,
              grad: bool, floor_coef: float | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The gradient of the reduced loss w.r.t. the raw logits and (given `floor_coef`) the
    error floor, at logits (or transformed logits) x (omy = 1 - y; pos = pw y, `has_pw`: a
    pos_weight given)."""
    scale = model.grad_scale
    s_pos, s_neg = _sigmoids(x, e_abs)
    g_z = omy * s_pos
    g_z -= np.multiply(pos, s_neg, out=s_neg if dz is None else None)
    g = floor = None
    if floor_coef is not None and dz is None:
        # a correct implementation's (1 + (pw-1)y) s(x) - pw y rounds at eps*((1 + |pw y|) s
        # + |pw y| + |1 - y|): PyTorch forms ((pw y + 1) - y) s(x), whose 1 + pw y rounds at
        # eps*(1 + |pw y|), above |1 + (pw-1)y| where pw < 1 (without pos_weight: s + y,
        # y >= 0); MLX forms s(x) as 1 - s(-x), exact to eps/2 absolute, so the (1 - y) part
        # gets an absolute term as the pw y part has (docs/tolerance.md)
        floor = np.multiply(1.0 + np.abs(pos), s_pos, out=s_pos) if has_pw else s_pos
        floor += np.abs(pos) if has_pw else pos
        floor += np.abs(omy, out=omy)  # omy (a fresh 1 - y) is not read after this
        floor *= floor_coef * scale
    elif floor_coef is not None:
        floor = _transformed_floor(model, x, dz, has_pw, (pos, omy), (s_pos, s_neg), g_z,
                                   floor_coef * scale)
    if floor is not None and w is not None:
        floor *= np.abs(w)
    if grad:
        g = g_z if dz is None else g_z.copy()  # g_z is no longer needed without T
        g *= scale if w is None else w * scale
        if dz is not None:
            g *= dz
    return g, floor


def _sigmoids(x: np.ndarray, e_abs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s(x) and s(-x) = 1 - s(x) from e = exp(-|x|): relative error ~2 eps at any x
    (exp(-softplus(-x)) would inherit the rounding of |x| + log1p(e): eps*|x|); 1/(1 + e) for
    x >= 0 and e/(1 + e) below, without cancellation. The numerators are picked without a
    select: max(e, sign(x)) is 1 for x >= 0 (e = 1 at x = 0) and e below; max(e, -sign(x))
    the other way round."""
    d1 = 1.0 + e_abs
    sgn = np.sign(x)
    s_pos = np.maximum(e_abs, sgn)
    s_pos /= d1
    np.negative(sgn, out=sgn)
    s_neg = np.maximum(e_abs, sgn, out=sgn)
    s_neg /= d1
    return s_pos, s_neg


def _zeros_like_row(a: np.ndarray) -> np.ndarray:
    """A row of zeros for max(a, 0): numpy's maximum against a broadcast row is ~1.7x as fast
    as against the scalar 0.0 (same results, signed zeros and NaN included)."""
    return np.zeros((1, a.shape[-1]))


def _finite_abs(z: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(z), np.abs(z), 0.0)


def _transformed_floor(model: Any, z: np.ndarray, dz: Any, has_pw: bool, coefs: tuple,
                       sig: tuple, g_z, k_scale: float) -> np.ndarray:
    """k*eps*scale * (|T'| (c' s(z) (1 + s(-z) |z|) + |pw y| + |1 - y|) + 2 S |dl/dz|), c' =
    1 + |pw y| (with pos_weight; else 1), coefs = (pw y, 1 - y), sig = (s(z), s(-z)): the
    plain floor on z, the rounded z (its error eps*|z| moves s(z) by s(1 - s) eps |z|), and
    with a softcap T' itself (S (1 - tanh^2) from the framework's tanh: SOFTCAP_DERIV_ERR)."""
    (pos, omy), (s_pos, s_neg) = coefs, sig
    c_s = (1.0 + np.abs(pos)) * s_pos if has_pw else s_pos
    soft = c_s * (1.0 + s_neg * _finite_abs(z)) + np.abs(pos)
    soft += np.abs(omy)
    floor = soft * np.abs(dz)
    if model.sem.softcap is not None:
        floor += abs(model.sem.logit_scale) * SOFTCAP_DERIV_ERR * np.abs(g_z)
    return floor * k_scale


def _magnitude(y: np.ndarray, w: np.ndarray | None,
               coef: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """|coef w| per element and its row sums (all ones, summing exactly to K, without
    pos_weight and weight)."""
    if coef is None and w is None:
        R, K = y.shape
        return np.broadcast_to(np.float64(1.0), y.shape), np.full(R, float(K))
    if coef is None:
        assert w is not None
        magnitude = np.abs(w)
    else:
        magnitude = np.abs(coef)
        if w is not None:
            magnitude *= np.abs(w)
    return magnitude, magnitude.sum(axis=1)


def _all_finite(x: np.ndarray, top: np.ndarray | None) -> bool:
    """No infinite logit in `x` (`top`: its row maxima, when at hand)."""
    if x.size == 0:
        return True
    high = top.max() if top is not None else x.max()
    return bool(np.isfinite(high) and np.isfinite(x.min()))


def _items(x: np.ndarray, y: np.ndarray, omy: np.ndarray, w: np.ndarray | None,
           pos: np.ndarray, e_abs: np.ndarray, finite: bool) -> np.ndarray:
    """pw y softplus(-x) + (1 - y) softplus(x) (times w); a term whose coefficient is 0 is 0
    also at an infinite logit. With every logit finite the products are those 0s already, and
    softplus(-x) = max(x, 0) - x + log1p(e) exactly (max(-x, 0) without another pass)."""
    tail = np.log1p(e_abs)
    if not finite:
        return _items_guarded(x, y, omy, w, pos, tail)
    sp_pos = np.maximum(x, _zeros_like_row(x))  # softplus(x) = -log(1 - s(x)) ...
    sp_neg = np.subtract(sp_pos, x)  # softplus(-x) = -log s(x) ...
    sp_pos += tail
    sp_neg += tail
    sp_neg *= pos
    sp_pos *= omy
    sp_neg += sp_pos
    return np.where(w != 0, sp_neg * w, 0.0) if w is not None else sp_neg


def _items_guarded(x: np.ndarray, y: np.ndarray, omy: np.ndarray, w: np.ndarray | None,
                   pos: np.ndarray, tail: np.ndarray) -> np.ndarray:
    sp_neg = np.maximum(-x, 0.0)
    sp_neg += tail
    sp_pos = np.maximum(x, 0.0)
    sp_pos += tail
    sp_neg *= pos
    sp_pos *= omy
    items = np.where(pos != 0, sp_neg, 0.0)
    items += np.where(y != 1, sp_pos, 0.0)
    return np.where(w != 0, items * w, 0.0) if w is not None else items
