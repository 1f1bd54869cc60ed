"""--compare-mse: the quadratic cost on sigmoid outputs against cross-entropy.

    M = 1/2 sum_k (s(z_k) - y_k)^2,   dM/dz_k = (s_k - y_k) s'(z_k),   s' = s (1 - s)

The factor s' vanishes as s saturates; cross-entropy's a - y does not. The saturation table
pushes one wrong logit up (multiclass: to max(other logits) + d, so softmax saturates too;
binary: away from the label, z = -+d).
"""

from __future__ import annotations

import math

import numpy as np

from ce_cli.explain.common import (
    SAFETY,
    SIGMA3_MAX,
    compare,
    perturbed_copies,
    sigmoid,
    softmax_parts,
    stable_minus,
    vector_index,
)
from ce_cli.explain.results import Explanation, MseComparison, SaturationRow
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX
from ce_cli.verify.results import CheckResult, Entry

SATURATION_OFFSETS = (0.0, 2.0, 5.0, 10.0, 20.0)


def compare_mse(expl: Explanation) -> MseComparison:
    """The quadratic cost M = 1/2 sum (s(z) - y)^2 on sigmoid outputs against cross-entropy.

    Its output error dM/dz = (s - y) s'(z) carries s' = s (1 - s), which vanishes as s saturates;
    CE's a - y does not. The saturation table pushes one wrong logit up (multiclass: to
    max(other logits) + d, so softmax saturates too; binary: away from the label, z = -+d)."""
    with np.errstate(all="ignore"):
        return _compare_mse(expl)


def _sigmoid_minus(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """s(z) - y, as (1 - y) - s(-z) where z > 0."""
    return np.where(z > 0, (1.0 - y) - sigmoid(-z), sigmoid(z) - y)


def _compare_mse(expl: Explanation) -> MseComparison:
    z, y = expl.z, expl.y
    s, sm = sigmoid(z), sigmoid(-z)
    sprime = s * sm
    mse = _sigmoid_minus(z, y) * sprime
    P = expl.probed
    mfd, mallowed = _mse_fd(z, y, P)
    fd_check = compare(
        "mse_vs_fd", mse[P], mfd, mallowed,
        "(s - y) s' vs central differences of M = 1/2 sum (s(z_k) - y_k)^2, summed term by term: "
        "within 2 (rounding 4 eps (3|s - y| + 2 (s - y)^2)/2h + truncation h^2/6 (0.2 + 0.125 |y|))",
        expected_label="(s-y)s'", got_label="finite diff", index=vector_index(P))
    if expl.kind == "binary":
        wrong, rows = _binary_saturation(y)
    else:
        wrong, rows = _softmax_saturation(expl)
    checks = (fd_check, _saturation_check(wrong, rows[-1]))
    return MseComparison(wrong, s, sprime, mse, mfd, expl.a_minus_y, tuple(rows), checks)


def _saturation_row(d: float, v: np.ndarray, y: np.ndarray, ce: float, ce_target: float) -> SaturationRow:
    """The row at the wrong logit v (shape (1,)) with label y: s, s', (s - y) s' and CE's errors."""
    sv, qv = sigmoid(v), sigmoid(-v)
    err = _sigmoid_minus(v, y)
    return SaturationRow(d, float(v[0]), float(sv[0]), float(sv[0] * qv[0]),
                         float(err[0] * sv[0] * qv[0]), ce, ce_target)


def _binary_saturation(y: np.ndarray) -> tuple[int, list[SaturationRow]]:
    """The logit pushed away from the label: z = -d for y >= 1/2, +d otherwise; CE's error s - y."""
    sign = -1.0 if y[0] >= 0.5 else 1.0
    rows = []
    for d in SATURATION_OFFSETS:
        v = np.array([sign * d])
        rows.append(_saturation_row(d, v, y, float(_sigmoid_minus(v, y)[0]), math.nan))
    return 0, rows


def _wrong_class(z: np.ndarray, y: np.ndarray, t: int) -> int:
    """The class to saturate: the largest logit among the finite classes (all, if every other is
    masked: the table is hypothetical) whose target is below the target class's."""
    others = np.flatnonzero((np.arange(z.size) != t) & np.isfinite(z))
    if others.size == 0:
        others = np.flatnonzero(np.arange(z.size) != t)
    cand = others[y[others] < y[t]] if (y[others] < y[t]).any() else others
    return int(cand[np.argmax(z[cand])])


def _softmax_saturation(expl: Explanation) -> tuple[int, list[SaturationRow]]:
    """The wrong class's logit pushed to max(other logits) + d; CE's a - y there and at the target."""
    z, y, t = expl.z, expl.y, expl.target
    wrong = _wrong_class(z, y, t)
    rest = np.delete(z, wrong)
    top = float(rest[np.isfinite(rest)].max())
    rows = []
    for d in SATURATION_OFFSETS:
        zz = z.copy()
        zz[wrong] = top + d
        a, _, oma = (v[0] for v in softmax_parts(zz))
        ce = stable_minus(a, oma, y)
        rows.append(_saturation_row(d, np.array([zz[wrong]]), y[wrong:wrong + 1], float(ce[wrong]),
                                    float(ce[t])))
    return wrong, rows


def _saturation_check(wrong: int, last: SaturationRow) -> CheckResult:
    """At the most saturated row: |(s - y) s'| < |a - y|."""
    ok = abs(last.mse) < abs(last.ce)
    return CheckResult(
        name="mse_vanishes_at_saturation", ok=ok, expected_label="|a - y|", got_label="|(s-y)s'|",
        max_abs_err=abs(last.mse), max_rel_err=abs(last.mse) / abs(last.ce) if last.ce else math.inf,
        mismatches=0 if ok else 1, total=1,
        worst=(Entry((wrong,), last.ce, last.mse, abs(last.mse), abs(last.ce)),),
        rule=f"at the saturated wrong logit z = {last.z:g}: |(s - y) s'| < |a - y| (the MSE error "
             "carries s' -> 0, CE's does not)")


def _mse_fd(z: np.ndarray, y: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences of M = 1/2 sum_k (s(z_k) - y_k)^2 at the probed entries, the difference
    summed term by term (terms that do not move cancel exactly).

    Bound: term i errs by at most eps (3|s - y| + 2 (s - y)^2) per evaluation (s to 3 eps), twice,
    over d; truncation (d/2)^2/6 max|M'''|, with M''' = 3 s' s'' + (s - y) s''' and |s'| <= 1/4,
    |s''| <= sqrt(3)/18, |s'''| <= 1/8: at most 0.2 + 0.125 |y_i|. Doubled."""
    fd = np.empty(P.size)
    allowed = np.empty(P.size)
    for block, r, zp, zm, d in perturbed_copies(z, P):
        cols = P[block]
        ep = _sigmoid_minus(zp, y)
        em = _sigmoid_minus(zm, y)
        fd[block] = (0.5 * ep * ep - 0.5 * em * em).sum(axis=1) / d
        e = np.maximum(np.abs(ep[r, cols]), np.abs(em[r, cols]))
        rounding = 2.0 * EPS * (3.0 * e + 2.0 * e * e) / d
        truncation = (d / 2.0) ** 2 / 6.0 * (3.0 * 0.25 * THIRD_MOMENT_MAX + SIGMA3_MAX * (1.0 + np.abs(y[cols])))
        allowed[block] = SAFETY * (rounding + truncation)
    return fd, allowed
