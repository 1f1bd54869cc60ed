"""Training-code semantics of a softmax cross-entropy problem (what `SoftmaxCE.sem` holds), and
the finite-difference error bounds of the extended row loss.

On raw logits x the loss sees z = T(x) = cap * tanh(S x / cap) (`softcap`; z = S x without it,
`logit_scale` S), and row n contributes

    s_n * (Q lse' - q . z + zeta * v_n * lse'^2)

with s_n the sample weight, zeta the z-loss coefficient, v_n = 1 for a non-ignored row and
lse' = log(sum_shard exp z + R_n), R_n the mass of the vocabulary outside a shard (0 without
`vocab_offset`; from the global lse given). The reduced loss divides the sum by D (the
`denominator` given, else the weighted count of 'mean').
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.base import ChunkEval
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX, logistic_third_max
from ce_cli.kernels.numpy_softmax import SECH2_SLOPE_MAX, transform

SMOOTHING_FORMS = ("torch", "others")
EMPTY_MEANS = ("nan", "zero")  # 'mean' over a zero total weight: PyTorch's 0/0, or 0
ZLOSS_THIRD = 6.0 * 4.0 / 27.0  # 6 max a^2 (1 - a): z-loss's own third-derivative term


@dataclass(frozen=True)
class Semantics:
    """The options beyond PyTorch's `F.cross_entropy` (defaults: none of them). Given to
    `build_softmax_ce` as the user wrote them (sample_weight any array of the batch's shape),
    held validated by `SoftmaxCE.sem` (sample_weight (N,) float64, the shard's masks derived)."""

    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    smoothing_form: str = "torch"
    denominator: float | None = None
    sample_weight: np.ndarray | None = None  # validated: (N,) float64 (binary: (N, K) broadcast)
    vocab_offset: int | None = None
    inside_mask: np.ndarray | None = None    # (N,) the row's label lies in this shard
    rho: np.ndarray | None = None            # (N,) log R_n: the rest of the vocabulary's mass
    rho_base: np.ndarray | None = None       # (N,) ... less this (a shard's row max; None: 0)
    vocab_size: int | None = None            # a shard's whole vocabulary V (label smoothing)
    rest_weight: float = 0.0                 # derived: the weights of the classes outside it
    label_weight: np.ndarray | None = None   # derived: (N,) a shard's rows' w_y (class weights)
    empty_mean: str = "nan"                  # 'mean' with every target ignored: "nan" or "zero"

    @property
    def smoothing_classes(self) -> int | None:
        """The V label smoothing spreads over (None: the array's own classes)."""
        return self.vocab_size if self.vocab_offset is not None else None

    @property
    def extended(self) -> bool:
        """True when the row loss itself changes (the numpy kernel's extended path)."""
        return bool(self.z_loss or self.softcap is not None or self.logit_scale != 1.0
                    or self.sample_weight is not None or self.vocab_offset is not None)

    @property
    def plain(self) -> bool:
        """True with every option at its default: PyTorch's loss exactly."""
        return (not self.extended and self.smoothing_form == "torch"
                and self.denominator is None and self.empty_mean == "nan")

    def row_weight(self, rows: np.ndarray) -> np.ndarray:
        if self.sample_weight is None:
            return np.ones(len(rows))
        return self.sample_weight[rows]

    def rest_log(self, rows: np.ndarray, m: np.ndarray) -> np.ndarray:
        """log R_n - m of rows `rows` whose row max is m; rho_base == m (unperturbed rows)
        keeps log R_n - m exact to the rounding of rho."""
        assert self.rho is not None
        if self.rho_base is None:
            return self.rho[rows] - m
        return self.rho[rows] + (self.rho_base[rows] - m)

    def inside(self, rows: np.ndarray) -> np.ndarray:
        if self.inside_mask is None:
            return np.ones(len(rows), dtype=bool)
        return self.inside_mask[rows]

    def to_echo(self) -> dict:
        """The report's `options` entries of the non-default settings."""
        out: dict = {}
        for name in ("z_loss", "softcap", "logit_scale", "smoothing_form", "denominator",
                     "vocab_offset", "empty_mean"):
            value = getattr(self, name)
            if value != getattr(Semantics, name):
                out[name] = value
        if self.sample_weight is not None:
            out["sample_weighted"] = True
        return out


@dataclass(frozen=True, eq=False)
class SplitLse:
    """A per-row log-sum-exp kept apart as m + log1p(s1): m the row's largest logit, s1 the
    sum of exp(z - m) over every entry but one arg-max (pass 1 of vocabulary shards). A shard
    forms the rest of the vocabulary's mass relative to its own row max from it, free of
    lse's rounding (eps |lse|, which a confident row's lse - m ~ s1 cannot afford)."""

    m: np.ndarray
    s1: np.ndarray

    @property
    def lse(self) -> np.ndarray:
        return self.m + np.log1p(self.s1)


def row_stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float64 `z`: m, the max, and s1, the sum of exp(z - m) over every entry but
    one arg-max (m = -inf and s1 = 0 for an all -inf row)."""
    top = z.max(axis=1)
    safe = np.where(np.isneginf(top), 0.0, top)
    with np.errstate(invalid="ignore"):
        e = np.exp(z - safe[:, None])
    e[np.arange(len(z)), z.argmax(axis=1)] = 0.0
    return top, e.sum(axis=1)


ROW_CHUNK = 1 << 20  # float64 entries per chunk of `transformed_row_stats`


def transformed_row_stats(z: Any, scale: float = 1.0,
                          cap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`row_stats` of z = T(x) for the (N, C) logits `z` (`logit_scale` and `softcap`: cap
    tanh(scale x / cap)), row chunk by row chunk in float64."""
    m, s1 = np.empty(z.shape[0]), np.empty(z.shape[0])
    step = max(1, ROW_CHUNK // max(1, z.shape[1]))
    for a in range(0, z.shape[0], step):
        x, _ = transform(np.asarray(z[a:a + step], dtype=np.float64), scale, cap)
        m[a:a + step], s1[a:a + step] = row_stats(x)
    return m, s1


def mean_of_nothing(empty_mean: str) -> float:
    """'mean' over a zero total weight (every target ignored, or their weights summing to 0):
    0/0, NaN as PyTorch and MindSpore return it, or 0 with `empty_mean` "zero" (Liger, Keras,
    PaddlePaddle: measured, docs/frameworks.md)."""
    return 0.0 if empty_mean == "zero" else math.nan


def validate_scalars(z_loss: float, softcap: float | None, logit_scale: float,
                     smoothing_form: str, denominator: float | None,
                     reduction: str | None = None) -> None:
    """The one-line errors of the scalar options (`reduction` given: a denominator needs a
    reduced loss)."""
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise CeCheckError(f"`z_loss`: must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise CeCheckError(f"`softcap`: must be a finite number > 0, got {softcap}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise CeCheckError(f"`logit_scale`: must be a finite number > 0, got {logit_scale}")
    if smoothing_form not in SMOOTHING_FORMS:
        raise CeCheckError(f"`smoothing_form`: unknown value '{smoothing_form}' (use torch or others)")
    if denominator is not None and not (math.isfinite(denominator) and denominator > 0):
        raise CeCheckError(f"`denominator`: must be a finite number > 0, got {denominator}")
    if denominator is not None and reduction == "none":
        raise CeCheckError("`denominator`: applies to reduction mean or sum, not none")


def check_sample_weights(sw: np.ndarray, source: str, index_of: Callable[[int], tuple],
                         warnings: list[str]) -> None:
    """Sample weights (flat float64) must be finite (one line naming the first bad index);
    negative ones are allowed with a warning."""
    if not np.all(np.isfinite(sw)):
        i = int(np.flatnonzero(~np.isfinite(sw))[0])
        raise CeCheckError(f"{source}: non-finite weight {sw[i]} at index {index_of(i)}")
    if (sw < 0).any():
        warnings.append(f"{source}: negative sample weights")


def _terms(ev: ChunkEval):
    assert ev.row_terms is not None
    s, Q, qabs, qsum, zabs = (np.abs(c) for c in ev.row_terms.T)
    return s, Q, qabs, qsum, zabs


def chain_bounds(sem: Semantics) -> tuple[float, float, float]:
    """Bounds of |T'|, |T''|, |T'''| over the real line: S, (4/(3 sqrt 3)) S^2/cap, 2 S^3/cap^2
    (T'' = -2 S^2/cap t (1 - t^2), T''' = -2 S^3/cap^2 (1 - t^2)(1 - 3 t^2), t = tanh)."""
    S = abs(sem.logit_scale)
    if sem.softcap is None:
        return S, 0.0, 0.0
    cap = sem.softcap
    return S, SECH2_SLOPE_MAX * S * S / cap, 2.0 * S**3 / cap**2


def fd_error_bound(sem: Semantics, n_classes: int, z_entry: np.ndarray, h: np.ndarray,
                   ev: ChunkEval) -> np.ndarray:
    """Bound on |central difference - derivative| of row loss f = s g(T(x)) along one raw logit.

    Truncation h^2/6 * s * max|f'''| over [x - h, x + h], by the chain rule
    f''' = g''' T'^3 + 3 g'' T' T'' + g' T''' with (a = softmax entry, L = lse', z moving by at
    most S h): |g'| <= QE + |q_c|, |g''| <= QE/4 + 2 zeta, |g'''| <= QE max|a(1-a)(1-2a)| +
    6 zeta max a^2(1-a), QE = |Q| + 2 zeta (|L| + S h) (g = Q L - q_c z_c + zeta L^2). Rounding:
    8 eps of every term the loss sums (those of the plain bound, the z-loss's, the shard's
    normaliser and the rounded transformed logits, |z| <= zabs) over h."""
    s, Q, qabs, _qsum, zabs = _terms(ev)
    zeta = abs(sem.z_loss)
    T1, T2, T3 = chain_bounds(sem)
    hz = T1 * h
    L = np.abs(ev.lse)
    QE = Q + 2.0 * zeta * (L + hz)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z_c, _ = transform(z_entry, sem.logit_scale, sem.softcap)
        logp = (z_c - np.asarray(ev.row_max)) - np.asarray(ev.log1p_s1)
        logit = logp - np.log(-np.expm1(logp))
        third = logistic_third_max(logit, hz)
    G1, G2, G3 = QE + qabs, QE / 4.0 + 2.0 * zeta, QE * third + ZLOSS_THIRD * zeta
    f3 = G3 * T1**3 + 3.0 * G2 * T1 * T2 + G1 * T3
    truncation = h * h / 6.0 * s * f3
    logC = 2.0 + 2.0 * np.log2(max(n_classes, 1))
    terms = (np.abs(ev.loss) + s * (QE * (logC + np.abs(np.asarray(ev.log1p_s1)) + L) + zeta * L * L
                                    + (QE + qabs) * 2.0 * zabs))
    return 8.0 * EPS * terms / h + truncation


def directional_error_bound(sem: Semantics, n_classes: int, ep: ChunkEval, em: ChunkEval,
                            delta: np.ndarray) -> np.ndarray:
    """Bound on |f(x + u) - f(x - u) - <grad f, delta>| per row (delta = 2u): the Taylor
    remainder sup|D^3 f[u, u, u]| / 3 with D^3 f[u,u,u] = D^3 g[v,v,v] + 3 D^2 g[v, w] + Dg[y],
    v = T' u, w = T'' u^2, y = T''' u^3 (elementwise): |D^3 g[v,v,v]| <= QE TM r^3 +
    6 zeta |v| r^2/4 (r = range(v) <= S max|delta|), |D^2 g[v, w]| <= (2 QE + 2 zeta)|v||w|,
    |Dg[y]| <= (QE + sum|q|)|y|; plus the rounding of both evaluations."""
    s, Q, qabs, qsum, zabs = _terms(ep)
    zeta = abs(sem.z_loss)
    T1, T2, T3 = chain_bounds(sem)
    du = np.abs(delta).max(axis=1) / 2.0 if delta.size else np.zeros(len(s))
    V, r = T1 * du, 2.0 * T1 * du
    W, Y = T2 * du**2, T3 * du**3
    L = np.maximum(np.abs(ep.lse), np.abs(em.lse)) + 2.0 * V
    QE = Q + 2.0 * zeta * L
    third = QE * THIRD_MOMENT_MAX * r**3 + 6.0 * zeta * V * r * r / 4.0
    truncation = s * (third + 3.0 * (2.0 * QE + 2.0 * zeta) * V * W + (QE + qsum) * Y) / 3.0
    logC = 2.0 + 2.0 * np.log2(max(n_classes, 1))
    l1 = np.maximum(np.abs(np.asarray(ep.log1p_s1)), np.abs(np.asarray(em.log1p_s1)))
    loss = np.maximum(np.abs(ep.loss), np.abs(em.loss))
    terms = loss + s * (QE * (logC + l1 + L) + zeta * L * L + (QE + qsum) * 2.0 * zabs)
    return 16.0 * EPS * terms + truncation


def loss_floor(ev: ChunkEval, coef: float) -> np.ndarray:
    """Error of a correct extended row loss: the plain floor with Q -> s (Q + 2 zeta lse), plus
    the rounded transformed logits' share, (|Qe| + sum|q|) * max|z|."""
    s, _Q, _qabs, qsum, zabs = _terms(ev)
    Qe = np.abs(ev.total_weight)
    return coef * (np.abs(ev.loss) + Qe * (1.0 + np.abs(ev.lse)) + (Qe + s * qsum) * zabs)
