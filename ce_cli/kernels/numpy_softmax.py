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


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(eq=False)
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
                 floor_coef: float | None = None, perturb: Any = None,
                 lse_weight: float = 1.0) -> ChunkEval:
    """Loss, gradient and (given `floor_coef` = k*eps) the error floor of rows `rows` of `model`
    (a SoftmaxCE) with logits `z_rows`, its |lse| term weighted by `lse_weight` (`perturb`:
    see `float64_rows`)."""
    with np.errstate(invalid="ignore"):  # 0 * -inf at masked logits, replaced where it occurs
        rs = _normalise(model, float64_rows(z_rows, perturb), rows)
        needs_mask = floor_coef is not None or model.smoothing or model.probs is not None
        # -inf logits (masks) make 0 * -inf terms below; look for them only when those exist
        has_neginf = needs_mask and _has_neginf(rs.zs)
        q, beta, ys = model.targets(rows)
        Q, qz = _target_terms(model, rs, q, beta, ys, has_neginf)
        loss = np.where(model.valid[rows], Q * rs.l1 - qz, 0.0)
        floor = (None if floor_coef is None
                 else _floor(model, rs, q, beta, ys, Q, (floor_coef, lse_weight), has_neginf))
        g = _gradient(model, rs, q, beta, ys, Q, rows) if grad else None
    return ChunkEval(loss=loss, grad=g, floor=floor, lse=rs.lse, total_weight=Q, row_max=rs.m,
                     log1p_s1=rs.l1)


def _has_neginf(zs: np.ndarray) -> bool:
    """Whether z - m holds a -inf: one min over the chunk (a row NaN or +inf raised in
    `_normalise`), not per row (a quarter faster)."""
    return bool(zs.size) and bool(np.isneginf(zs.min()))


def float64_rows(z_rows: np.ndarray, perturb: Any = None) -> np.ndarray:
    """A float64 copy of the rows; `perturb` = (cols, values) sets row i's entry cols[i] to
    values[i] (finite differences: the rows themselves are not written to)."""
    z = np.array(z_rows, dtype=np.float64)
    if perturb is not None:
        z[np.arange(z.shape[0]), perturb[0]] = perturb[1]
    return z


def _normalise(model: Any, zs: np.ndarray, rows: np.ndarray) -> _Rows:
    """`zs`: a float64 copy of the rows, made z - m in place."""
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
    """Q = sum_c q_c and q . (z - m) of every row, the dot products summed pairwise (einsum's
    and BLAS's running sums erred by 6e-13 relative at C = 32,000, 3,000 ulps: the finite
    differences' bound is a pairwise sum's)."""
    zs, w = rs.zs, model.weight
    if beta is None:  # probability targets: q is a dense (R, C) array
        qz = np.where(q != 0, q * zs, 0.0) if has_neginf else q * zs
        return q.sum(axis=1), qz.sum(axis=1)
    alpha = q
    W = float(w.sum()) if w is not None else float(zs.shape[1])
    qz = np.where(alpha != 0, alpha * zs[np.arange(zs.shape[0]), ys], 0.0)
    if model.smoothing:
        if w is None:
            sz = zs.sum(axis=1)
        elif has_neginf:
            sz = np.where(w != 0, zs * w, 0.0).sum(axis=1)
        else:
            sz = (zs * w).sum(axis=1)
        qz = qz + np.where(beta != 0, beta * sz, 0.0)
    return alpha + beta * W, qz


def _floor(model: Any, rs: _Rows, q, beta, ys, Q, coef: tuple[float, float],
           has_neginf: bool) -> np.ndarray:
    """k*eps*(Q*a*(1 + |log a| + lam*|lse|) + |q|)*scale, with |log a| = l1 - zs and
    coef = (k*eps, lam)."""
    scale, (floor_coef, lam) = model.grad_scale, coef
    # into z - m's buffer (read last in _target_terms): one fresh buffer fewer
    floor = np.subtract((1.0 + rs.l1 + lam * np.abs(rs.lse))[:, None], rs.zs, out=rs.zs)
    if has_neginf:
        np.minimum(floor, 1e300, out=floor)
    floor *= rs.e
    floor *= (floor_coef * scale * np.abs(Q) / rs.s)[:, None]
    if beta is None:
        qabs = np.abs(q)
        qabs *= floor_coef * scale  # in place: one fresh buffer fewer
        floor += qabs
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


# --- training-code semantics: soft-capping, logit scale, z-loss, sample weights, vocab shards ---

SECH2_SLOPE_MAX = 4.0 / (3.0 * np.sqrt(3.0))  # max |2 t (1 - t^2)| over t = tanh(u)
# T' = S (1 - t^2) = S (1 + t)(1 - t) from the framework's own tanh t: an error dt in t errs T'
# by ~2 S dt. A correctly rounded tanh has dt <= eps/4 near +-1, XLA's float32 tanh up to 2.4 eps
# (measured over [0, 10]: its T' errs by 4.75 eps at |u| ~ 4), so the floor's S |dl/dz| term is
# k eps S |dl/dz| times this factor (8 eps at the default k = 4)
SOFTCAP_DERIV_ERR = 2.0


def transform(x: np.ndarray, scale: float, cap: float | None) -> tuple[np.ndarray, Any]:
    """z = cap * tanh(scale * x / cap) (z = scale * x without a cap) and dz/dx = scale * sech^2,
    elementwise; sech^2 = 1/cosh^2 keeps full relative precision where tanh is near +-1."""
    z = x * scale if scale != 1.0 else x
    if cap is None:
        return z, scale
    with np.errstate(over="ignore", invalid="ignore"):
        u = z / cap
        return cap * np.tanh(u), scale / np.cosh(u) ** 2


def semantic_rows(model: Any, x_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                  floor_coef: float | None = None, perturb: Any = None,
                  lse_weight: float = 1.0) -> ChunkEval:
    """`softmax_rows` with the terms of `model.sem` (models/softmax.py `Semantics`): on the
    transformed logits z = T(x), row n contributes

        s_n * (Q lse' - q . z + zeta * v_n * lse'^2),    lse' = log(sum_shard exp z + R_n)

    (R_n the rest of the vocabulary's mass, 0 without a shard; v_n = 1 for a non-ignored row),
    and the gradient w.r.t. the RAW logits is s_n * ((Q + 2 zeta v lse') a - q) * T'(x) * scale,
    a = exp(z - lse'). At a confident row's arg-max a - 1 = expm1(-(lse' - m)), without
    cancellation."""
    sem = model.sem
    x = float64_rows(x_rows, perturb)
    with np.errstate(invalid="ignore"):
        mx = x.max(axis=1) if x.size else np.zeros(x.shape[0])
        if not np.all(np.isfinite(mx)):
            model.check_row_max(x, mx, rows, model.valid[rows])  # raises on NaN / +inf
        z, dz = transform(x, sem.logit_scale, sem.softcap)
        rs = _normalise(model, np.array(z, dtype=np.float64), rows)  # z is read below
        has_neginf = bool(np.isneginf(rs.zs.min(axis=1)).any()) if rs.zs.size else False
        t = _SemanticTerms.of(model, rs, rows, has_neginf)
        loss = np.where(t.valid, t.s * t.loss_z, 0.0)
        g_z = _semantic_grad_z(model, rs, t) if grad or floor_coef is not None else None
        g = None
        if grad and g_z is not None:
            g = g_z * (t.s * model.grad_scale)[:, None] * dz
            if model.nan_gradient:
                g[t.valid] = np.nan
        floor = (None if floor_coef is None or g_z is None
                 else _semantic_floor(model, rs, t, z, dz, g_z, (floor_coef, lse_weight)))
    zabs = np.where(np.isfinite(z), np.abs(z), 0.0).max(axis=1) if z.size else np.zeros(len(rows))
    terms = np.stack([t.s, t.Q, t.qabs, t.qsum, zabs], axis=1)
    return ChunkEval(loss=loss, grad=g, floor=floor, lse=rs.m + t.l1, total_weight=t.s * t.Qe,
                     row_max=rs.m, log1p_s1=t.l1, row_terms=terms)


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(eq=False)
class _SemanticTerms:
    """Per-row values of the extended row loss (see `semantic_rows`)."""

    valid: np.ndarray
    s: np.ndarray      # sample weight
    alpha: Any     # index targets (else None): the label's weight (its share of Q) ...
    alpha_in: Any  # ... and the part of it inside this shard's columns
    beta: Any
    ys: Any
    q: Any         # probability targets (else None): dense q
    Q: np.ndarray      # sum of the target weights (the whole vocabulary's)
    Qe: np.ndarray     # Q + 2 zeta v lse': what multiplies a in the gradient
    l1: np.ndarray     # lse' - m
    loss_z: np.ndarray  # the row loss before the sample weight
    qabs: np.ndarray   # max_c |q_c| (a bound)
    qsum: np.ndarray   # sum_c |q_c| (a bound)

    @classmethod
    def of(cls, model: Any, rs: _Rows, rows: np.ndarray, has_neginf: bool) -> _SemanticTerms:
        sem = model.sem
        valid = model.valid[rows]
        s = sem.row_weight(rows)
        q, beta, ys = model.targets(rows)
        alpha = alpha_in = None
        if beta is None:
            Q, qz = _target_terms(model, rs, q, None, None, has_neginf)
            qabs, qsum = np.abs(q).max(axis=1), np.abs(q).sum(axis=1)
            rest = np.zeros_like(Q)
            dense = q
        else:
            alpha = q
            alpha_in = np.where(sem.inside(rows), alpha, 0.0)
            Qin, qz = _target_terms(model, rs, alpha_in, beta, ys, has_neginf)
            rest = _outside(sem, alpha, alpha_in, beta)  # only the normaliser sees it
            Q = Qin + rest
            w = np.abs(model.weight) if model.weight is not None else np.ones(1)
            qabs = np.abs(alpha_in) + np.abs(beta) * w.max()
            qsum = np.abs(alpha_in) + np.abs(beta) * (w.sum() if model.weight is not None
                                                     else rs.zs.shape[1])
            dense = None
        l1 = rs.l1 if sem.rho is None else np.logaddexp(rs.l1, sem.rest_log(rows, rs.m))
        lse = rs.m + l1
        v = valid.astype(np.float64)
        loss_z = Q * l1 - qz + rest * rs.m
        Qe = Q
        if sem.z_loss:
            loss_z = loss_z + sem.z_loss * v * lse * lse
            Qe = Q + 2.0 * sem.z_loss * v * lse
        return cls(valid, s, alpha, alpha_in, beta, ys, dense, Q, Qe, l1, loss_z, qabs, qsum)


def _outside(sem: Any, alpha: np.ndarray, alpha_in: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The target weight of a shard's row outside its columns: a label in another shard, and
    the smoothing beta spreads over the other shards' classes (their weights sum_c w_c)."""
    rest = alpha - alpha_in
    return rest + beta * sem.rest_weight if sem.rest_weight else rest


def _semantic_grad_z(model: Any, rs: _Rows, t: _SemanticTerms) -> np.ndarray:
    """Qe a - q w.r.t. the transformed logits (before T'(x), the sample weight and 1/D)."""
    r, am = np.arange(rs.e.shape[0]), rs.am
    g = rs.e * (t.Qe * np.exp(-t.l1))[:, None]
    if t.q is not None:
        g -= t.q
        rest = t.Qe - t.q[r, am]
    else:
        w = model.weight
        if np.any(t.beta):
            g -= t.beta[:, None] * (w if w is not None else 1.0)
        g[r, t.ys] -= t.alpha_in
        W = float(w.sum()) if w is not None else float(g.shape[1])
        w_am = w[am] if w is not None else 1.0
        q_am_off = np.where(am != t.ys, t.alpha_in, 0.0) + t.beta * (W - w_am)  # Q_in - q_am
        rest = q_am_off + _outside(model.sem, t.alpha, t.alpha_in, t.beta) + (t.Qe - t.Q)
    # a confident row (a_max >= 1/2): Qe * (a - 1) + rest without cancellation; elsewhere
    # a - 1 would cancel instead, and Qe * a - q_am (above) is the accurate form
    sure = t.l1 <= np.log(2.0)
    if g.size and sure.any():
        g[r[sure], am[sure]] = t.Qe[sure] * np.expm1(-t.l1[sure]) + rest[sure]
    return g


def _semantic_floor(model: Any, rs: _Rows, t: _SemanticTerms, z: np.ndarray, dz: Any,
                    g_z: np.ndarray, coefs: tuple[float, float]) -> np.ndarray:
    """k*eps*|s/D| * (|T'| (|Qe| a (1 + |log a| + lam*|lse| + |z|) + |q|) + 2 S |Qe a - q|): the
    normaliser, the z-loss's lse, the rounded transformed logits (|z|: with a soft-cap or a
    logit scale only; a z-loss or sample weights leave z = x), and T' itself (1 - tanh^2
    formed from the framework's tanh: SOFTCAP_DERIV_ERR)."""
    sem, (coef, lam) = model.sem, coefs
    lse = rs.m + t.l1
    a = rs.e * np.exp(-t.l1)[:, None]
    transformed = sem.softcap is not None or sem.logit_scale != 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        soft = 1.0 + (t.l1[:, None] - rs.zs) + lam * np.abs(lse)[:, None]
        soft = a * (soft + np.abs(z) if transformed else soft)
        soft[a == 0] = 0.0
    soft *= np.abs(t.Qe)[:, None]
    if t.q is not None:
        soft += np.abs(t.q)
    else:
        w = np.abs(model.weight) if model.weight is not None else 1.0
        soft += np.abs(t.beta)[:, None] * w
        soft[np.arange(soft.shape[0]), t.ys] += np.abs(t.alpha_in)
    floor = soft * np.abs(dz)
    if sem.softcap is not None:
        floor += abs(sem.logit_scale) * SOFTCAP_DERIV_ERR * np.abs(g_z)
    floor *= (coef * np.abs(t.s * model.grad_scale))[:, None]
    return floor
