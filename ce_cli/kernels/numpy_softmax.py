"""The numpy softmax cross-entropy kernel: the reference every other kernel is tested against.

Row n has target weights q (index targets: alpha = (1 - eps) w_y at the label, beta = eps/C
times w_c everywhere; probability targets: a dense q) and

    loss_n = Q * lse(z) - q . z,   dloss_n/dz_c = Q * a_c - q_c,   Q = sum_c q_c,

scaled by the reduction's 1/D. Precision: lse = m + log1p(s1), s1 = sum of exp(z - m) over all
entries but the arg-max, so a confident row's loss ~1e-30 keeps full relative precision; at the
arg-max a - 1 = -s1 / (1 + s1) is formed without cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ce_cli.kernels.base import ChunkEval


@dataclass
class _Rows:
    """One chunk's shifted logits and normaliser: zs = z - m, e = exp(zs) (1 at the arg-max)."""

    zs: np.ndarray
    e: np.ndarray
    am: np.ndarray
    m: np.ndarray
    s1: np.ndarray
    l1: np.ndarray  # log1p(s1) = lse - m

    @property
    def s(self) -> np.ndarray:
        return 1.0 + self.s1

    @property
    def lse(self) -> np.ndarray:
        return self.m + self.l1


def softmax_rows(model: Any, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                 floor_coef: float | None = None) -> ChunkEval:
    """Loss, gradient and (given `floor_coef` = k*eps) the error floor of rows `rows` of `model`
    (a SoftmaxCE) with logits `z_rows`."""
    with np.errstate(invalid="ignore"):  # 0 * -inf at masked logits, replaced where it occurs
        rs = _normalise(model, z_rows, rows)
        needs_mask = floor_coef is not None or model.smoothing or model.probs is not None
        # -inf logits (masks) make 0 * -inf terms below; look for them only when those exist
        has_neginf = needs_mask and bool(np.isneginf(rs.zs.min(axis=1)).any())
        q, beta, ys = model.targets(rows)
        Q, qz = _target_terms(model, rs, q, beta, ys, has_neginf)
        loss = np.where(model.valid[rows], Q * rs.l1 - qz, 0.0)
        floor = (None if floor_coef is None
                 else _floor(model, rs, q, beta, ys, Q, floor_coef, has_neginf))
        g = _gradient(model, rs, q, beta, ys, Q, rows) if grad else None
    return ChunkEval(loss=loss, grad=g, floor=floor, lse=rs.lse, total_weight=Q, row_max=rs.m,
                     log1p_s1=rs.l1)


def _normalise(model: Any, z_rows: np.ndarray, rows: np.ndarray) -> _Rows:
    zs = np.array(z_rows, dtype=np.float64)  # becomes z - m in place
    r = np.arange(zs.shape[0])
    am = zs.argmax(axis=1)
    m = zs[r, am]
    if not np.all(np.isfinite(m)):
        m = model.check_row_max(zs, m, rows, model.valid[rows])
    zs -= m[:, None]
    e = np.exp(zs)
    e[r, am] = 0.0
    s1 = e.sum(axis=1)
    e[r, am] = 1.0
    return _Rows(zs, e, am, m, s1, np.log1p(s1))


def _target_terms(model: Any, rs: _Rows, q, beta, ys, has_neginf: bool):
    """Q = sum_c q_c and q . (z - m) of every row."""
    zs, w = rs.zs, model.weight
    if beta is None:  # probability targets: q is a dense (R, C) array
        qz = np.where(q != 0, q * zs, 0.0).sum(axis=1) if has_neginf else np.einsum("ij,ij->i", q, zs)
        return q.sum(axis=1), qz
    alpha = q
    W = float(w.sum()) if w is not None else float(zs.shape[1])
    qz = np.where(alpha != 0, alpha * zs[np.arange(zs.shape[0]), ys], 0.0)
    if model.smoothing:
        if w is None:
            sz = zs.sum(axis=1)
        elif has_neginf:
            sz = np.where(w != 0, zs * w, 0.0).sum(axis=1)
        else:
            sz = zs @ w
        qz = qz + np.where(beta != 0, beta * sz, 0.0)
    return alpha + beta * W, qz


def _floor(model: Any, rs: _Rows, q, beta, ys, Q, floor_coef: float, has_neginf: bool) -> np.ndarray:
    """k*eps*(Q*a*(1 + |log a| + |lse|) + |q|)*scale, with |log a| = l1 - zs."""
    scale = model.grad_scale
    floor = np.subtract((1.0 + rs.l1 + np.abs(rs.lse))[:, None], rs.zs)
    if has_neginf:
        np.minimum(floor, 1e300, out=floor)
    floor *= rs.e
    floor *= (floor_coef * scale * np.abs(Q) / rs.s)[:, None]
    if beta is None:
        floor += floor_coef * scale * np.abs(q)
        return floor
    w = model.weight
    if model.smoothing:
        floor += (floor_coef * scale * np.abs(beta))[:, None] * np.abs(w if w is not None else 1.0)
    floor[np.arange(floor.shape[0]), ys] += floor_coef * scale * np.abs(q)
    return floor


def _gradient(model: Any, rs: _Rows, q, beta, ys, Q, rows) -> np.ndarray:
    """(Q * a - q) * scale; at a confident row's arg-max Q*(a - 1) + (Q - q) without cancellation."""
    scale, w = model.grad_scale, model.weight
    r, am = np.arange(rs.e.shape[0]), rs.am
    g = rs.e  # reused in place: e is not needed after this
    g *= (Q * scale / rs.s)[:, None]
    if beta is None:
        g -= q * scale
        rest = Q - q[r, am]
    else:
        if model.smoothing:
            g -= (beta * scale)[:, None] * (w if w is not None else 1.0)
        g[r, ys] -= q * scale
        w_am = w[am] if w is not None else 1.0
        W = float(w.sum()) if w is not None else float(g.shape[1])
        rest = np.where(am != ys, q, 0.0) + beta * (W - w_am)
    # a confident row (a_max >= 1/2): a_max - 1 = -s1/s exactly
    sure = rs.s1 <= 1.0
    g[r[sure], am[sure]] = scale * (rest[sure] - Q[sure] * rs.s1[sure] / rs.s[sure])
    if model.nan_gradient:
        g[model.valid[rows]] = np.nan
    return g
