"""--steps: the finite-difference error against the step h, for one entry.

    |fd(h) - dC/dz_i|  ~  h^2 |C'''|/6 (truncation, large h)  +  eps |C|/h (rounding, small h)

minimised near h = eps^(1/3). The kernel's rigorous bound must hold at every h.
"""

from __future__ import annotations

import math

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.explain.common import KAPPA, SAFETY, fd_compare, loss_fd
from ce_cli.explain.results import Explanation, StepCurve

STEP_GRID = tuple(10.0 ** (-k / 2.0) for k in range(2, 25))   # 1e-1 ... 1e-12, half decades


def step_curve(expl: Explanation, entry: int | None = None) -> StepCurve:
    """|finite difference - dC/dz_i| for h = 1e-1 ... 1e-12 (half decades) and the chosen h.

    Large h: truncation ~ h^2 |C'''|/6 dominates; small h: rounding ~ eps |C|/h. The kernel's
    bound (rounding + truncation, rigorous) must hold at every h: that is the check."""
    C = expl.n_classes
    i = expl.target if entry is None else int(entry)
    if not 0 <= i < C:
        raise CeCheckError(f"--entry {i}: out of range [0, {C})")
    if not np.isfinite(expl.z[i]):
        raise CeCheckError(f"--entry {i}: the logit is -inf (masked); pick another class")
    with np.errstate(all="ignore"):
        return _step_curve(expl, i)


def _step_curve(expl: Explanation, i: int) -> StepCurve:
    z = expl.z
    scale = max(1.0, abs(float(z[i])))     # steps are relative: h max(1, |z_i|), as `grad` takes them
    grid = [h for h in STEP_GRID if not math.isclose(h, KAPPA, rel_tol=1e-9)]
    h = np.array(sorted(grid + [KAPPA], reverse=True))
    cols = np.full(h.size, i)
    fd, bound = loss_fd(expl.problem, z, cols, h * scale)
    exact = float(expl.gradient[i])
    error = np.abs(fd - exact)
    fine = np.logspace(-1, -12, 221)
    _, fine_bound = loss_fd(expl.problem, z, np.full(fine.size, i), fine * scale)
    chosen = int(np.flatnonzero(h == KAPPA)[0])
    best = _nanargmin(error, chosen)
    check, skipped = fd_compare(
        "step_curve_within_bound", np.full(h.size, exact), fd, SAFETY * bound,
        f"|fd(h) - dC/dz_{i}| <= twice the kernel's bound (rounding 8 eps (|C| + ...)/h + truncation "
        f"h^2/6 max|C'''|) at each of the {h.size} steps",
        expected_label="dC/dz", index=lambda r, c: (float(h[r]),),
        note=(f"measured minimum at h = {h[best]:.2g}; " if np.isfinite(error).any() else "")
        + f"eps^(1/3) = {KAPPA:.3g}")
    return StepCurve(i, float(z[i]), exact, h, scale, fd, error, bound, chosen, best,
                     float(fine[_nanargmin(fine_bound, 0)]), (check,), skipped)


def _nanargmin(values: np.ndarray, default: int) -> int:
    """Index of the smallest non-NaN value; `default` when every value is NaN (a logit so large
    that z + h overflows at every step)."""
    finite = ~np.isnan(values)
    return int(np.nanargmin(values)) if finite.any() else default
