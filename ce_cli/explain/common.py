"""Shared pieces of the derivations: constants, the stable forms of a and a - y, the Jacobian's
rows, the checks' comparison and finite-difference helpers.

Stable forms: ln a = (z - m) - log1p(s1), 1 - a = -expm1(ln a) (an a that rounds to 1 keeps its
complement), s(x) = exp(-softplus(-x)), and a - y = (1 - y) - (1 - a) where a > 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ce_cli.kernels.numerics import EPS, softplus
from ce_cli.models.sigmoid import SigmoidBCE
from ce_cli.models.softmax import SoftmaxCE
from ce_cli.verify.compare import Comparison
from ce_cli.verify.finite_diff import central_differences, step_for
from ce_cli.verify.results import CheckResult, Entry
from ce_cli.verify.tolerance import Tolerance

KAPPA = EPS ** (1.0 / 3.0)          # the finite-difference step factor, eps^(1/3) ~ 6.06e-6
TINY = 2.0 ** -1074                 # smallest positive float64
LOG_TINY = math.log(TINY)           # ~ -744.44: exp of anything below rounds to 0 (or 2^-1074)
CHAIN_RTOL = 1e-12                  # chain rule vs a - y: relative to max(1, |a - y|)
SAFETY = 2.0                        # every finite-difference bound is doubled, as in `grad`
SIGMA3_MAX = 0.125                  # max |s'''| of the logistic (at s = 1/2)

_F64 = Tolerance(precision="f64", eps=EPS, tiny=TINY, rtol=0.0, atol=0.0, floor_factor=0.0)

Index = Callable[[int, int], tuple]


# ---------------------------------------------------------------------------------------------
# stable pieces


def softmax_parts(z: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise (a, ln a, 1 - a) of (R, C) logits (finite or -inf), as ce_cli.models.softmax does it:
    the max shifted out, lse - m = log1p(s1) with s1 the sum over all entries but the arg-max,
    ln a = (z - m) - log1p(s1), and 1 - a = -expm1(ln a), so an a that rounds to 1 keeps its
    complement to full relative precision."""
    zs = np.array(np.atleast_2d(z), dtype=np.float64)
    r = np.arange(zs.shape[0])
    am = zs.argmax(axis=1)
    zs -= zs[r, am][:, None]
    e = np.exp(zs)
    e[r, am] = 0.0
    log_a = zs - np.log1p(e.sum(axis=1))[:, None]
    return np.exp(log_a), log_a, -np.expm1(log_a)


def sigmoid(x: ArrayLike) -> np.ndarray:
    """s(x) = exp(-softplus(-x)): relative precision down to the subnormals (1/(1 + exp(-x)),
    ce_cli.kernels.numerics.sigmoid, is 0 once exp(-x) overflows, at x < -709.8)."""
    return np.exp(-softplus(-np.asarray(x, dtype=np.float64)))


def stable_minus(a: np.ndarray, one_minus_a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """a - y, as (1 - y) - (1 - a) where a > 1/2 (no cancellation at a ~ y ~ 1)."""
    return np.where(a > 0.5, (1.0 - y) - one_minus_a, a - y)


def jacobian_rows(a: np.ndarray, one_minus_a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """J[rows, :] with J[j, i] = a_i (1{i=j} - a_j): -a_i a_j off the diagonal, a_j (1 - a_j) on it."""
    block = -np.outer(a[rows], a)
    block[np.arange(rows.size), rows] = a[rows] * one_minus_a[rows]
    return block


def cube_term(y: Any, a: Any, d: Any) -> Any:
    """(d/2)^2/6 * 2|y|/(a - d/2)^3, the truncation of a central difference of -y ln a, formed as
    |y|/3 * r^2/(1 - r)^3 / a with r = (d/2)/a, so nothing underflows for tiny a."""
    r = (d / 2.0) / a
    return np.abs(y) / 3.0 * r * r / (1.0 - r) ** 3 / a


# ---------------------------------------------------------------------------------------------
# checks


def compare(name: str, expected: ArrayLike, got: ArrayLike, allowed: ArrayLike, rule: str, *,
            expected_label: str, got_label: str, index: Index, note: str = "",
            worst: int = 5) -> CheckResult:
    """Entry-wise |got - expected| <= allowed, through ce_cli.verify.compare (worst entries, NaN handling).

    `index(r, c)` names entry (r, c) of the 2-D arrays (1-D arrays are one column)."""
    exp = np.asarray(expected, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    allow = np.asarray(allowed, dtype=np.float64)
    if exp.ndim < 2:
        exp, g, allow = (np.reshape(v, (-1, 1)) for v in (exp, g, np.broadcast_to(allow, exp.shape)))
    cmp = Comparison(name, _F64, index, expected_label=expected_label, got_label=got_label,
                     n_worst=worst, note=note)
    cmp.update(0, exp, g, np.broadcast_to(allow, exp.shape))
    return replace(cmp.result(), rule=rule)


def open_interval_check(name: str, what: str, a: np.ndarray, log_a: np.ndarray,
                        one_minus_a: np.ndarray, skip: np.ndarray) -> CheckResult:
    """0 < a_i < 1 for every entry not in `skip` (masked classes, exactly 0 by definition).

    float64 may round a true a_i to exactly 0 (only where ln a_i < ln 2^-1074) or to exactly 1
    (only where 1 - a_i < eps/2, with 1 - a_i computed stably): those are accepted and counted."""
    inside = (a > 0.0) & (a < 1.0)
    rounded0 = (a == 0.0) & (log_a <= LOG_TINY)
    rounded1 = (a == 1.0) & (one_minus_a <= EPS / 2.0)
    bad = ~(inside | rounded0 | rounded1 | skip)
    nearest = np.clip(np.nan_to_num(a, nan=0.5), TINY, 1.0 - EPS / 2.0)
    err = np.where(bad, np.abs(np.nan_to_num(a, nan=np.inf) - nearest), 0.0)
    worst = tuple(Entry((int(i),), float(nearest[i]), float(a[i]), float(err[i]), 0.0)
                  for i in np.flatnonzero(bad)[:5])
    return CheckResult(
        name=name, ok=not bad.any(), expected_label="(0, 1)", got_label=what,
        max_abs_err=float(err.max()) if err.size else 0.0, max_rel_err=0.0,
        mismatches=int(bad.sum()), total=int((~skip).sum()), worst=worst,
        rule=(f"0 < {what}_i < 1; float64 may round {what}_i to exactly 0 only where ln {what}_i <= "
              f"ln 2^-1074 = {LOG_TINY:.2f}, to exactly 1 only where 1 - {what}_i <= eps/2"),
        note=_rounding_note(rounded0, rounded1, one_minus_a, skip))


def _rounding_note(rounded0: np.ndarray, rounded1: np.ndarray, one_minus_a: np.ndarray,
                   skip: np.ndarray) -> str:
    notes = []
    if rounded0.any():
        notes.append(f"{int(rounded0.sum())} entries round to exactly 0 in float64 (ln a <= {LOG_TINY:.1f})")
    if rounded1.any():
        notes.append(f"{int(rounded1.sum())} round to exactly 1 (1 - a = "
                     f"{float(one_minus_a[rounded1].max()):.3g} < eps/2)")
    if skip.any():
        notes.append(f"{int(skip.sum())} masked (-inf) classes are 0 by definition")
    return "; ".join(notes)


def vector_index(cols: np.ndarray) -> Index:
    return lambda r, _c: (int(cols[r]),)


def matrix_index(rows: np.ndarray, cols: np.ndarray) -> Index:
    return lambda r, c: (int(rows[r]), int(cols[c]))


def scalar_index(_r: int, _c: int) -> tuple:
    return ()


# ---------------------------------------------------------------------------------------------
# the float64 kernel and finite differences


def kernel_loss_grad(problem: SoftmaxCE | SigmoidBCE) -> tuple[float, np.ndarray]:
    """C and dC/dz of the problem's one row, from the float64 kernel of ce_cli.models."""
    ev = problem.evaluate_rows(problem.z, np.arange(1))
    assert ev.grad is not None  # evaluated with grad=True
    return float(ev.loss[0]), ev.grad[0].copy()


def loss_fd(problem: SoftmaxCE | SigmoidBCE, z: np.ndarray, entry_cols: np.ndarray,
            steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences of the kernel's row loss at (entry_cols[k], steps[k]) for each k,
    with the kernel's rigorous bound (rounding 8 eps (|C| + ...)/h plus truncation
    h^2/6 max|C'''| on the step): `grad`'s own finite differences, on one sample."""
    rows = np.zeros(entry_cols.size, dtype=np.int64)
    ev = problem.evaluate_rows(z[None, :], rows[:1], grad=False).take_rows(rows)
    fd, bound, _ = central_differences(problem, np.tile(z, (entry_cols.size, 1)), rows, entry_cols,
                                       z[entry_cols], ev, h=steps)
    return fd, bound


def fd_compare(name: str, expected: np.ndarray, fd: np.ndarray, allowed: np.ndarray, rule: str, *,
               index: Index, expected_label: str, note: str = "") -> tuple[CheckResult, int]:
    """`compare` of a derivative against the loss's finite differences, skipping (as `grad`
    does) the probes `central_differences` could not take: fd is NaN where z +- h leaves
    float64, where the kernel's bound overflows (its truncation term grows as h^2, past float64
    once h > ~1.3e154: steps are relative, so at huge logits), or where C(z +- h) is not finite.
    A skipped probe compares as equal with no allowance; returns the check and how many."""
    exp = np.asarray(expected, dtype=np.float64)
    got = np.asarray(fd, dtype=np.float64)
    skip = np.isnan(got) & ~np.isnan(exp)
    skipped = int(np.count_nonzero(skip))
    if skipped:
        note = "; ".join(filter(None, [note, fd_skip_note(skipped, got.size)]))
    check = compare(name, exp, np.where(skip, exp, got), np.where(skip, 0.0, allowed), rule,
                    expected_label=expected_label, got_label="finite diff", index=index, note=note)
    return check, skipped


def fd_skip_note(skipped: int, total: int) -> str:
    """Why finite differences skipped `skipped` of `total` probes."""
    return (f"finite differences skipped {skipped} of {total} probes: there the step h max(1, |z|) "
            "or its error bound (~h^2) leaves float64's range, or C(z +- h) is not finite")


def perturbed_copies(z: np.ndarray, cols: np.ndarray
                     ) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Copies of the sample z with entry cols[k] moved by -+h, h = eps^(1/3) max(1, |z|) (grad's
    step), in batches of at most 2^20 values: yields (slice into cols, row index, z + h e, z - h e,
    realised 2h)."""
    per = max(1, (1 << 20) // z.size)
    for s in range(0, cols.size, per):
        c = cols[s:s + per]
        r = np.arange(c.size)
        zc = z[c]
        h = step_for(zc)
        zp = np.tile(z, (c.size, 1))
        zm = zp.copy()
        zp[r, c] = zc + h
        zm[r, c] = zc - h
        yield slice(s, s + c.size), r, zp, zm, zp[r, c] - zm[r, c]
