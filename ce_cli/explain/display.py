"""What the renderers show (selection, not formatting): which classes, which Jacobian entries."""

from __future__ import annotations

import math

import numpy as np

from ce_cli.explain.results import Explanation

SHOW_FULL = 12      # vectors and matrices in full up to this many classes


def discrepancy(expl: Explanation) -> np.ndarray:
    """Per class: max(|J^T dC/da - (a - y)|, |fd - (a - y)|), fd where probed."""
    with np.errstate(invalid="ignore"):
        chain = np.abs(expl.chain_rule - expl.a_minus_y)
        fd = np.abs(expl.fd - expl.a_minus_y)
    return np.fmax(chain, fd)


def display_classes(expl: Explanation, limit: int = SHOW_FULL) -> np.ndarray:
    """Every class up to `limit`; beyond, the target, the arg-max, the largest a and the largest
    discrepancies (sorted)."""
    C = expl.n_classes
    if C <= limit:
        return np.arange(C)
    top = np.argsort(-expl.a, kind="stable")[:5]
    disc = discrepancy(expl)
    worst = np.argsort(-np.nan_to_num(disc, nan=-1.0), kind="stable")[:3]
    pick = np.concatenate([[expl.target, int(np.argmax(expl.a))], top, worst])
    return np.unique(pick.astype(np.int64))


def jacobian_entry(expl: Explanation, j: int, i: int) -> float:
    """J[j, i] = da_j/dz_i by the formula a_i (1{i=j} - a_j)."""
    if i == j:
        return float(expl.a[i] * expl.one_minus_a[i])
    return float(-expl.a[i] * expl.a[j])


def jacobian_fd_entry(expl: Explanation, j: int, i: int) -> float:
    """The central difference of da_j/dz_i, or NaN when column i was not probed."""
    pos = int(np.searchsorted(expl.probed, i))
    if pos < expl.probed.size and expl.probed[pos] == i:
        return float(expl.jacobian_fd[j, pos])
    return math.nan


def largest_jacobian_entries(expl: Explanation, k: int = 8) -> list[tuple[int, int, float]]:
    """The k entries of J largest in magnitude, as (j, i, J[j, i]). Without the full matrix: the
    diagonal a_i (1 - a_i) and the off-diagonal -a_i a_j of the largest a (which the probes hold)."""
    if expl.jacobian is not None:
        flat = np.abs(expl.jacobian).ravel()
        idx = np.argsort(-flat, kind="stable")[:k]
        C = expl.n_classes
        return [(int(f // C), int(f % C), float(expl.jacobian.flat[f])) for f in idx]
    top = np.argsort(-expl.a, kind="stable")[: k + 1]
    cand = {(int(i), int(i)) for i in np.argsort(-(expl.a * expl.one_minus_a), kind="stable")[:k]}
    cand |= {(int(j), int(i)) for j in top for i in top}
    vals = sorted(((abs(jacobian_entry(expl, j, i)), j, i) for j, i in cand), reverse=True)[:k]
    return [(j, i, jacobian_entry(expl, j, i)) for _, j, i in vals]
