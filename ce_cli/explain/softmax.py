"""The multiclass derivation (softmax cross-entropy), logits z in R^C, target y:

    a = softmax(z)                               sums to 1, every a_i in (0, 1)
    J[j, i] = da_j/dz_i = a_i * (1{i=j} - a_j)   symmetric, rows sum to 0
    C = -sum_j y_j ln a_j,  dC/da_j = -y_j / a_j   (0 where y_j = 0: the term is absent)
    dC/dz_i = sum_j J[j, i] dC/da_j = -y_i + a_i * sum_j y_j = a_i - y_i   when sum y = 1

Each step carries a check that computes something and can fail: the properties of a and J are
measured, J and dC/da are compared with central differences of softmax and of C(a), the
chain-rule product with a - y, and a - y with finite differences of the float64 kernel's loss
(ce_cli.models.softmax). Tolerances are error bounds, stated in each check's rule.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from numpy.typing import ArrayLike

from ce_cli.errors import CeCheckError
from ce_cli.explain.common import (
    CHAIN_RTOL,
    KAPPA,
    LOG_TINY,
    SAFETY,
    SIGMA3_MAX,
    TINY,
    compare,
    cube_term,
    fd_compare,
    fd_skip_note,
    jacobian_rows,
    kernel_loss_grad,
    loss_fd,
    matrix_index,
    open_interval_check,
    perturbed_copies,
    scalar_index,
    softmax_parts,
    stable_minus,
    vector_index,
)
from ce_cli.explain.results import Explanation
from ce_cli.io.limits import explain_classes_refusal
from ce_cli.kernels.numerics import EPS
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.finite_diff import step_for
from ce_cli.verify.results import CheckResult

FULL_C = 1024                       # up to this many classes: the full Jacobian, every entry probed
PROBE_TOP = 16                      # beyond FULL_C: probe the target, the arg-max, the largest a ...
PROBE_RANDOM = 16                   # ... and this many random classes
PRODUCT_LIMIT = 1 << 28             # C * nnz(y) terms of the chain-rule product, at most


def explain_softmax(z: ArrayLike, *, label: int | None = None, target: ArrayLike | None = None,
                    seed: int = 0) -> Explanation:
    """The derivation for one sample: logits z (C,), and a class `label` or `target` probabilities."""
    refusal = explain_classes_refusal(int(np.size(z)))
    if refusal:  # before anything of O(C) is allocated
        raise CeCheckError(refusal)
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    C = z.size
    if C < 2:
        raise CeCheckError(f"logits: {C} class; softmax over one class is constantly 1 (zero gradient): "
                           "use --kind binary for a single logit")
    bad = np.isnan(z) | np.isposinf(z)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CeCheckError(f"logits: {'NaN' if np.isnan(z[i]) else '+inf'} logit at class {i} "
                           "(only -inf is allowed, as a mask)")
    masked = np.isneginf(z)
    if masked.all():
        raise CeCheckError("logits: every logit is -inf (softmax undefined)")
    y, t = _target_vector(C, label, target)
    hit = masked & (y != 0)
    if hit.any():
        i = int(np.flatnonzero(hit)[0])
        raise CeCheckError(f"class {i} is masked (logit -inf, a = 0) but its target is {y[i]:g}: "
                           "the loss is infinite")
    with np.errstate(all="ignore"):
        return _explain_softmax(z, y, None if label is None else int(label), t, masked, seed)


def _target_vector(C: int, label: int | None, target: ArrayLike | None) -> tuple[np.ndarray, int]:
    """y as a vector of C entries (one-hot for a label), and the target class."""
    if (label is None) == (target is None):
        raise CeCheckError("give the target as a class label or as probabilities (one of them)")
    if label is not None:
        label = int(label)
        if not 0 <= label < C:
            raise CeCheckError(f"--label {label}: out of range [0, {C})")
        y = np.zeros(C)
        y[label] = 1.0
        return y, label
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if y.size != C:
        raise CeCheckError(f"--target: {y.size} values for {C} logits")
    if not np.isfinite(y).all():
        i = int(np.flatnonzero(~np.isfinite(y))[0])
        raise CeCheckError(f"--target: non-finite probability {y[i]} at class {i}")
    return y, int(np.argmax(y))


def _probe_columns(z: np.ndarray, a: np.ndarray, y: np.ndarray, target: int, seed: int) -> np.ndarray:
    """Every finite class up to FULL_C; beyond, the target, the arg-max, the largest a and y, and
    PROBE_RANDOM random classes."""
    finite = np.isfinite(z)
    C = z.size
    if C <= FULL_C:
        return np.flatnonzero(finite)
    rng = np.random.default_rng(seed)
    top = np.argsort(-a, kind="stable")[:PROBE_TOP]
    ytop = np.argsort(-np.abs(y), kind="stable")[:PROBE_TOP]
    ytop = ytop[y[ytop] != 0]
    rand = rng.choice(np.flatnonzero(finite), size=min(PROBE_RANDOM, int(finite.sum())), replace=False)
    cand = np.unique(np.concatenate([[target, int(np.argmax(a))], top, ytop, rand]).astype(np.int64))
    return cand[finite[cand]]


def _explain_softmax(z: np.ndarray, y: np.ndarray, label: int | None, t: int, masked: np.ndarray,
                     seed: int) -> Explanation:
    C = z.size
    a, log_a, oma = (v[0] for v in softmax_parts(z))
    labels = np.array([label]) if label is not None else y[None, :]
    problem, _ = build_softmax_ce(z[None, :], labels, reduction="sum")
    loss, gradient = kernel_loss_grad(problem)

    probed = _probe_columns(z, a, y, t, seed)
    full = C <= FULL_C
    jac = jacobian_rows(a, oma, np.arange(C)) if full else None
    # J is symmetric, so column i is computed by the same formula as row i
    jac_cols = jac[:, probed] if jac is not None else jacobian_rows(a, oma, probed).T
    jfd, jbound = _softmax_jacobian_fd(z, probed)

    dC_da = np.where(y != 0, -y / a, 0.0)
    chain, absdot, nnz = _chain_rule(a, oma, dC_da, jac)

    fd = np.full(C, np.nan)
    fd_bound = np.full(C, np.nan)
    fd[probed], fd_bound[probed] = loss_fd(problem, z, probed, step_for(z[probed]))
    dfd = np.full(C, np.nan)
    dfd_allowed = np.full(C, np.nan)
    dfd[probed], dfd_allowed[probed] = _dC_da_fd(a, log_a, y, dC_da, probed)

    expl = Explanation("multiclass", z, a, oma, log_a, y, label, t, loss, gradient, jac, probed, jac_cols,
                       jfd, jbound, dC_da, dfd, chain, stable_minus(a, oma, y), fd, fd_bound, (), (),
                       problem)
    checks, notes = _softmax_checks(expl, masked, dfd_allowed, absdot, nnz)
    return replace(expl, checks=tuple(checks), notes=tuple(notes))


def _chain_rule(a: np.ndarray, oma: np.ndarray, dC_da: np.ndarray,
                jac: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """The literal product J^T dC/da, sum_j |J[j, i] dC/da_j| (for its rounding bound), and nnz(dC/da).

    Without the full J, only the rows j with dC/da_j != 0 are formed, in blocks (the others add
    exact zeros)."""
    C = a.size
    nz = np.flatnonzero(dC_da)
    if jac is not None:
        return jac.T @ dC_da, np.abs(jac).T @ np.abs(dC_da), nz.size
    if nz.size * C > PRODUCT_LIMIT:
        raise CeCheckError(f"target: {nz.size} nonzero entries over {C} classes: the literal chain-rule "
                           f"product needs C*nnz(y) = {nz.size * C:.3g} terms (limit 2^28); use a "
                           "sparser target or fewer classes")
    chain = np.zeros(C)
    absdot = np.zeros(C)
    per = max(1, (1 << 22) // C)
    for s in range(0, nz.size, per):
        rows = nz[s:s + per]
        block = jacobian_rows(a, oma, rows)      # J[rows, :]
        chain += dC_da[rows] @ block
        absdot += np.abs(dC_da[rows]) @ np.abs(block)
    return chain, absdot, nz.size


def _softmax_jacobian_fd(z: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns `cols` of the Jacobian by central differences of softmax: column i is
    (a(z + h e_i) - a(z - h e_i)) / d with d = (z_i + h) - (z_i - h).

    Bound: each float64 a_j errs by at most eps (a_j + 1) absolute (relative eps (1 + 2|ln a_j|),
    and a|ln a| <= 1/e), so the difference by eps (a+ + a- + 2), divided by d; truncation
    (d/2)^2/6 max|d^3 a_j/dz_i^3| <= (d/2)^2/48, since a_i as a function of z_i is a logistic
    curve (|s'''| <= 1/8) and a_j (j != i) is at most one minus such a curve."""
    fd = np.empty((z.size, cols.size))
    bound = np.empty((z.size, cols.size))
    for block, _r, zp, zm, d in perturbed_copies(z, cols):
        d = d[:, None]
        ap = softmax_parts(zp)[0]
        am = softmax_parts(zm)[0]
        fd[:, block] = ((ap - am) / d).T
        bound[:, block] = (SAFETY * (EPS * (ap + am + 2.0) / d + (d / 2.0) ** 2 * SIGMA3_MAX / 6.0)).T
    return fd, bound


def _dC_da_fd(a: np.ndarray, log_a: np.ndarray, y: np.ndarray, dC_da: np.ndarray,
              probed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences of C(a) = -sum_k y_k ln a_k, a taken as free variables, at a_j +- h_j
    with the relative step h_j = eps^(1/3) a_j (so a_j - h_j > 0).

    C(a + h e_j) - C(a - h e_j) is summed term by term, (-y_k ln a_k+) - (-y_k ln a_k-) over every
    k with y_k != 0: terms that do not move cancel exactly, so rounding comes from term j alone,
    at most 2 eps |y_j| (1 + |ln a_j|) per evaluation; truncation (d/2)^2/6 * 2|y_j|/(a_j - d/2)^3
    (the third derivative of -y ln a on the step). Allowed: twice their sum, plus 4 eps |dC/da_j|."""
    nz = np.flatnonzero(y)
    aj = a[probed]
    h = np.where(aj > 0.0, KAPPA * aj, KAPPA)
    ap, am = aj + h, aj - h
    d = ap - am
    k = probed.size
    fd = np.zeros(k)
    per = max(1, (1 << 22) // max(1, nz.size))
    for s in range(0, k, per):
        cols = probed[s:s + per]
        r = np.arange(cols.size)
        lp = np.tile(a[nz], (cols.size, 1))
        lm = lp.copy()
        inside = np.isin(cols, nz)
        pos = np.searchsorted(nz, cols[inside])
        lp[r[inside], pos] = ap[s:s + per][inside]
        lm[r[inside], pos] = am[s:s + per][inside]
        terms = (-y[nz] * np.log(lp)) - (-y[nz] * np.log(lm))
        fd[s:s + per] = terms.sum(axis=1) / d[s:s + per]
    yj = np.abs(y[probed])
    rounding = 2.0 * (2.0 * EPS * yj * (1.0 + np.abs(log_a[probed]))) / d
    truncation = cube_term(yj, aj, d)
    allowed = SAFETY * (rounding + np.where(yj != 0, truncation, 0.0)) + 4.0 * EPS * np.abs(dC_da[probed])
    return fd, allowed


# ---------------------------------------------------------------------------------------------
# the checks, step by step


def _softmax_checks(e: Explanation, masked: np.ndarray, dfd_allowed: np.ndarray, absdot: np.ndarray,
                    nnz: int) -> tuple[list[CheckResult], list[str]]:
    """Every step's checks, in the order of the steps, and the notes that explain them."""
    scope = "" if e.jacobian is not None else f" (on the {e.probed.size} probed classes)"
    checks = _softmax_output_checks(e, masked)
    target = _target_check(e.y)
    checks.append(target)
    checks += _jacobian_checks(e, scope)
    derivative, fd_skipped = _derivative_checks(e, dfd_allowed, absdot, nnz, scope)
    notes = [] if target.ok else [_target_note(e.y)]
    if fd_skipped:
        notes.append(fd_skip_note(fd_skipped, e.probed.size))
    return checks + derivative, notes + _softmax_notes(e, masked)


def _softmax_output_checks(e: Explanation, masked: np.ndarray) -> list[CheckResult]:
    """Step 2: |sum a - 1| <= 4 eps (C + 1 + ln C) and 0 < a_i < 1."""
    C = e.n_classes
    return [
        compare("softmax_sums_to_1", [1.0], [e.a.sum()], [4.0 * EPS * (C + 1.0 + math.log(C))],
                "|sum a - 1| <= 4 eps (C + 1 + ln C): each a_i errs by eps (1 + |ln a_i|) relative, "
                "sum a_i |ln a_i| <= ln C, and the sum adds C eps",
                expected_label="1", got_label="sum a", index=scalar_index),
        open_interval_check("softmax_in_0_1", "a", e.a, e.log_a, e.one_minus_a, masked),
    ]


def _target_check(y: np.ndarray) -> CheckResult:
    """Step 3: y_i >= 0 and |sum y - 1| <= 4 C eps."""
    res = compare(
        "target_is_distribution", [1.0], [float(y.sum())], [4.0 * EPS * y.size],
        "y_i >= 0 and |sum y - 1| <= 4 C eps: sum y = 1 is what collapses a_i sum_j y_j into a_i",
        expected_label="1", got_label="sum y", index=scalar_index)
    negative = int((y < 0).sum())
    if negative:
        res = replace(res, ok=False, mismatches=res.mismatches + negative,
                      note=f"{negative} negative target entries")
    return res


def _target_note(y: np.ndarray) -> str:
    negative = int((y < 0).sum())
    return (f"the target is not a probability distribution (sum y = {float(y.sum()):.17g}"
            + (f", {negative} negative entries" if negative else "") + "): the chain rule gives "
            "dC/dz = (sum y) a - y, which the finite differences confirm; a - y assumes sum y = 1")


def _jacobian_checks(e: Explanation, scope: str) -> list[CheckResult]:
    """Step 4: the measured J is symmetric, J's rows sum to 0, and J matches central differences."""
    C = e.n_classes
    P = e.probed
    jbound = e.jacobian_fd_bound
    sub = np.searchsorted(P, P)  # positions of the probed classes among the probed columns
    block = e.jacobian_fd[P][:, sub]
    rows = np.arange(C) if e.jacobian is not None else P
    row_sums = (e.jacobian if e.jacobian is not None else jacobian_rows(e.a, e.one_minus_a, P)).sum(axis=1)
    return [
        compare("jacobian_symmetric", block.T, block, jbound[P][:, sub] + jbound[P][:, sub].T,
                "the measured Jacobian: central difference da_j/dz_i vs da_i/dz_j, within the sum of their "
                "error bounds (the formula a_i (1{i=j} - a_j) is symmetric by construction)" + scope,
                expected_label="FD da_i/dz_j", got_label="FD da_j/dz_i", index=matrix_index(P, P)),
        compare("jacobian_rows_sum_to_0", np.zeros(rows.size), row_sums,
                2.0 * EPS * e.a[rows] * (3.0 * C + 2.0 * math.log(C) + 4.0) + TINY,
                "|sum_i J[j, i]| <= 2 eps a_j (3C + 2 ln C + 4): a_j (1 - a_j) - sum_(i != j) a_j a_i, with "
                "a's rounding (eps (1 + ln C) in total) and the sum's (2C eps a_j)" + scope,
                expected_label="0", got_label="row sum", index=vector_index(rows)),
        compare("jacobian_vs_fd", e.jacobian_cols, e.jacobian_fd, jbound,
                "J[j, i] = a_i (1{i=j} - a_j) vs (a_j(z + h e_i) - a_j(z - h e_i))/2h, h = eps^(1/3) "
                "max(1, |z_i|): within 2 (eps (a+ + a- + 2)/2h + h^2/48)" + scope,
                expected_label="a_i(1{i=j}-a_j)", got_label="finite diff",
                index=matrix_index(np.arange(C), P)),
    ]


def _derivative_checks(e: Explanation, dfd_allowed: np.ndarray, absdot: np.ndarray, nnz: int,
                       scope: str) -> tuple[list[CheckResult], int]:
    """Steps 5-8: dC/da against central differences of C(a), J^T dC/da against a - y (within the
    dot product's rounding 4 (nnz(y) + 1) eps sum_j |J[j, i] dC/da_j|), a - y against the loss's
    finite differences (the probes they cannot take skipped and counted)."""
    P = e.probed
    a_minus_y = e.a_minus_y
    allowed = np.maximum(CHAIN_RTOL * np.maximum(1.0, np.abs(a_minus_y)),
                         4.0 * (nnz + 1) * EPS * absdot)
    fd_check, skipped = fd_compare(
        "fd_vs_a_minus_y", a_minus_y[P], e.fd[P], SAFETY * e.fd_bound[P],
        "a - y vs (C(z + h e_i) - C(z - h e_i))/2h, h = eps^(1/3) max(1, |z_i|), C from the float64 "
        "kernel: within twice the kernel's bound (rounding 8 eps (|C| + 2 + 2 log2 C)/h + truncation "
        "h^2/6 max|a(1 - a)(1 - 2a)|)" + scope,
        expected_label="a - y", index=vector_index(P))
    return [
        compare("dC_da_vs_fd", e.dC_da[P], e.dC_da_fd[P], dfd_allowed[P],
                "-y_j/a_j (0 where y_j = 0) vs central differences of C(a) = -sum y_k ln a_k in a_j, step "
                "eps^(1/3) a_j: within 2 (rounding 4 eps |y_j| (1 + |ln a_j|)/2h + truncation h^2 |y_j|/"
                "(3 (a_j - h)^3)) + 4 eps |dC/da_j|" + scope,
                expected_label="-y/a", got_label="finite diff", index=vector_index(P)),
        compare("chain_rule_vs_a_minus_y", a_minus_y, e.chain_rule, allowed,
                "sum_j J[j, i] dC/da_j vs a_i - y_i: within 1e-12 max(1, |a_i - y_i|) (or the dot product's "
                "rounding bound 4 (nnz(y) + 1) eps sum_j |J[j, i] dC/da_j|, if larger)",
                expected_label="a - y", got_label="J^T dC/da", index=vector_index(np.arange(e.n_classes))),
        fd_check,
    ], skipped


def _softmax_notes(e: Explanation, masked: np.ndarray) -> list[str]:
    """Why a check reads as it does: underflow of a, masks, 1/a out of range, probing."""
    a, y, C = e.a, e.y, e.n_classes
    notes = []
    under = (a == 0.0) & ~masked
    if (under & (y == 0)).any():
        notes.append(f"a underflows to 0 for {int((under & (y == 0)).sum())} classes (ln a < {LOG_TINY:.0f}): "
                     "there -y/a would be 0/0, but with y = 0 the term -y ln a is absent from C, so "
                     "dC/da is exactly 0 (its value for any a > 0) and the chain rule uses 0")
    if masked.any():
        notes.append(f"{int(masked.sum())} classes are masked (logit -inf): a = 0 exactly, their rows "
                     "and columns of J are 0, and finite differences skip them")
    overflow = (y != 0) & ~np.isfinite(e.dC_da)
    if overflow.any():
        j = int(np.flatnonzero(overflow)[0])
        notes.append(f"class {j} has y = {y[j]:g} but a = exp({e.log_a[j]:.1f}), below float64's range for "
                     "1/a: dC/da = -y/a is not representable, so the literal chain rule fails in float64 "
                     "while the closed form a - y stays exact; this is why frameworks fuse softmax with "
                     "the cross-entropy")
    if e.jacobian is None:
        notes.append(f"C = {C} > {FULL_C}: the Jacobian and the finite differences are checked on "
                     f"{e.probed.size} probed classes (the target, the arg-max, the {PROBE_TOP} largest a and y, "
                     f"{PROBE_RANDOM} random); the chain rule and a - y on all {C}")
    return notes
