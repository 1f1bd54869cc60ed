"""`ce-check explain`: the derivation of dC/dz = a - y, verified number by number on one sample.

Multiclass (softmax cross-entropy), logits z in R^C, target y (one-hot or probabilities):

    a = softmax(z)                               sums to 1, every a_i in (0, 1)
    J[j, i] = da_j/dz_i = a_i * (1{i=j} - a_j)   symmetric, rows sum to 0
    C = -sum_j y_j ln a_j,  dC/da_j = -y_j / a_j   (0 where y_j = 0: the term is absent)
    dC/dz_i = sum_j J[j, i] dC/da_j = -y_i + a_i * sum_j y_j = a_i - y_i   when sum y = 1

Binary (sigmoid BCE), one logit z and a label y in [0, 1]:

    s = sigmoid(z),  s' = s (1 - s),  dC/ds = -y/s + (1 - y)/(1 - s),  dC/dz = s' dC/ds = s - y

Every step carries a check that computes something and can fail: the properties of a and J are
measured, the Jacobian and dC/da are compared with central differences of softmax and of C(a),
the chain-rule product with a - y, and a - y with finite differences of the loss (the float64
kernel of ce_cli.models.softmax / ce_cli.models.sigmoid). Tolerances are error bounds, stated in each
check's rule. Pure numpy; the renderers in ce_cli.explain.render only format what is here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ce_cli.verify.compare import Comparison
from ce_cli.verify.finite_diff import central_differences, step_for
from ce_cli.errors import CeCheckError
from ce_cli.models.layout import make_layout, match_batch
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX
from ce_cli.verify.results import CheckResult, Entry
from ce_cli.models.sigmoid import build_sigmoid_bce
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.tolerance import Tolerance

KAPPA = EPS ** (1.0 / 3.0)          # the finite-difference step factor, eps^(1/3) ~ 6.06e-6
TINY = 2.0 ** -1074                 # smallest positive float64
LOG_TINY = math.log(TINY)           # ~ -744.44: exp of anything below rounds to 0 (or 2^-1074)
FULL_C = 1024                       # up to this many classes: the full Jacobian, every entry probed
PROBE_TOP = 16                      # beyond FULL_C: probe the target, the arg-max, the largest a ...
PROBE_RANDOM = 16                   # ... and this many random classes
PRODUCT_LIMIT = 1 << 28             # C * nnz(y) terms of the chain-rule product, at most
CHAIN_RTOL = 1e-12                  # chain rule vs a - y: relative to max(1, |a - y|)
SAFETY = 2.0                        # every finite-difference bound is doubled, as in `grad`
SIGMA3_MAX = 0.125                  # max |s'''| of the logistic (at s = 1/2)
SATURATION_OFFSETS = (0.0, 2.0, 5.0, 10.0, 20.0)
STEP_GRID = tuple(10.0 ** (-k / 2.0) for k in range(2, 25))   # 1e-1 ... 1e-12, half decades

_F64 = Tolerance(precision="f64", eps=EPS, tiny=TINY, rtol=0.0, atol=0.0, floor_factor=0.0)


@dataclass(frozen=True, eq=False)
class Explanation:
    """One sample's derivation: every intermediate array, and the checks of every step.

    Arrays are float64 with C entries (binary: C = 1, the one logit). The Jacobian uses
    J[j, i] = da_j/dz_i (row j: output a_j, column i: input z_i), so dC/dz = J^T dC/da.
    """

    kind: str                         # "multiclass" or "binary"
    z: np.ndarray                     # (C,) logits
    a: np.ndarray                     # (C,) softmax(z) (binary: [sigmoid(z)])
    one_minus_a: np.ndarray           # (C,) 1 - a, formed without cancellation
    log_a: np.ndarray                 # (C,) ln a
    y: np.ndarray                     # (C,) target: one-hot, probabilities, or [label]
    label: int | None                 # the class index, when the target is one
    target: int                       # the target class: the label, or the largest y
    loss: float                       # C = -sum y ln a (binary: BCE), from the float64 kernel
    gradient: np.ndarray              # (C,) dC/dz from the kernel: (sum y) a - y
    jacobian: np.ndarray | None       # (C, C) when C <= FULL_C, else None (see jacobian_cols)
    probed: np.ndarray                # classes probed by finite differences (all, up to FULL_C)
    jacobian_cols: np.ndarray         # (C, P) J[:, probed]
    jacobian_fd: np.ndarray           # (C, P) central differences of softmax: column i = da/dz_i
    jacobian_fd_bound: np.ndarray     # (C, P) bound on their error
    dC_da: np.ndarray                 # (C,) -y/a, 0 where y = 0
    dC_da_fd: np.ndarray              # (C,) central differences of C(a); NaN where not probed
    chain_rule: np.ndarray            # (C,) J^T dC/da, the literal product
    a_minus_y: np.ndarray             # (C,) a - y, without cancellation where a ~ 1
    fd: np.ndarray                    # (C,) central differences of the loss; NaN where not probed
    fd_bound: np.ndarray              # (C,) bound on their error
    checks: tuple[CheckResult, ...]
    notes: tuple[str, ...]
    problem: object                   # the kernel's problem (SoftmaxCE / SigmoidBCE), for --steps

    @property
    def n_classes(self) -> int:
        return int(self.z.size)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True)
class SaturationRow:
    """One row of the --compare-mse table: the wrong logit at `z`."""

    offset: float        # how far the wrong logit was pushed (multiclass: above the other logits)
    z: float             # the wrong logit
    sigma: float         # sigmoid(z)
    sigma_prime: float   # sigmoid'(z)
    mse: float           # the MSE + sigmoid error (s - y) s' at the wrong entry
    ce: float            # the cross-entropy error a - y at the wrong entry
    ce_target: float     # the cross-entropy error at the target class (multiclass; NaN for binary)


@dataclass(frozen=True, eq=False)
class MseComparison:
    """--compare-mse: the quadratic cost on sigmoid outputs, M = 1/2 sum (s - y)^2, whose output
    error (s - y) * s'(z) carries the factor s' that vanishes when s saturates, against CE's a - y."""

    wrong: int                        # the class whose logit grows in the saturation table
    sigma: np.ndarray
    sigma_prime: np.ndarray
    mse_error: np.ndarray             # (s - y) * s'
    mse_fd: np.ndarray                # central differences of M; NaN where not probed
    ce_error: np.ndarray              # a - y
    saturation: tuple[SaturationRow, ...]
    checks: tuple[CheckResult, ...]


@dataclass(frozen=True, eq=False)
class StepCurve:
    """--steps: |finite difference - derivative| against the step h, for one entry."""

    entry: int
    z: float
    derivative: float                 # the kernel's dC/dz at the entry
    h: np.ndarray                     # relative steps, largest first (the grid plus eps^(1/3)); the
                                      # perturbation is h * scale
    scale: float                      # max(1, |z|)
    fd: np.ndarray
    error: np.ndarray                 # |fd - derivative|
    bound: np.ndarray                 # rigorous bound on the error (the kernel's, undoubled)
    chosen: int                       # index of the step `grad` uses: eps^(1/3) max(1, |z|)
    best: int                         # index of the smallest measured error
    bound_best_h: float               # the (relative) step that minimises the bound
    checks: tuple[CheckResult, ...]

    @property
    def optimum(self) -> float:
        """The textbook optimum eps^(1/3): truncation h^2 |C'''|/6 meets rounding eps |C|/h."""
        return KAPPA


# ---------------------------------------------------------------------------------------------
# sample selection (pure: the CLI parses text, this validates and picks)


def parse_row(text: str) -> tuple[int, ...]:
    """'7' (a flat row index) or '1,2' / '(1, 2)' (an index into the batch shape)."""
    body = text.strip().strip("()[]")
    parts = [p for p in body.replace(",", " ").split()]
    if not parts:
        raise CeCheckError(f"--row: empty index {text!r}; expected I or a tuple such as 1,2")
    try:
        idx = tuple(int(p) for p in parts)
    except ValueError:
        raise CeCheckError(f"--row: not an integer index: {text!r}; expected I or a tuple such as 1,2") from None
    if any(i < 0 for i in idx):
        raise CeCheckError(f"--row: negative index {text!r}; indices count from 0")
    return idx


def _flat_index(idx: tuple[int, ...] | None, shape: tuple[int, ...], what: str, source: str,
                full_shape: tuple[int, ...]) -> int:
    """A flat index into `shape` (the batch shape) from a flat or full index; required when there
    is a choice. `full_shape` is the input's shape, for messages."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if idx is None:
        if n == 1:
            return 0
        hint = f" or --row i,j,... (an index into {shape})" if len(shape) > 1 else ""
        raise CeCheckError(f"{source}: shape {full_shape} holds {n} {what}s; pick one with --row I "
                           f"(0..{n - 1}){hint}")
    if len(idx) == 1:
        if idx[0] >= n:
            raise CeCheckError(f"--row {idx[0]}: out of range: {source} (shape {full_shape}) holds "
                               f"{n} {what}s")
        return idx[0]
    if len(idx) != len(shape) or any(i >= s for i, s in zip(idx, shape)):
        raise CeCheckError(f"--row {','.join(map(str, idx))}: not an index into {shape}, the {what} "
                           f"shape of {source} (shape {full_shape})")
    return int(np.ravel_multi_index(idx, shape))


@dataclass(frozen=True)
class Sample:
    z: np.ndarray                     # (C,) float64 (binary: (1,))
    label: int | None
    target: np.ndarray | None         # (C,) probabilities (binary: (1,) soft label)
    where: str                        # e.g. "row 7 of logits file 'x.npy'"
    row: tuple[int, ...] | None       # the index of the sample in the input's batch shape


def softmax_sample(logits: np.ndarray, row: tuple[int, ...] | None, *, labels: np.ndarray | None,
                   label: int | None, target: np.ndarray | None, logits_source: str,
                   labels_source: str) -> Sample:
    """Row `row` of (C,), (N, C) or (B, T, V) logits (class axis last) and its target."""
    logits = np.asarray(logits)
    if logits.dtype.kind not in "biuf":
        raise CeCheckError(f"{logits_source}: dtype {logits.dtype} is not numeric")
    layout = make_layout(logits.shape, -1, logits_source)
    r = _flat_index(row, layout.batch_shape, "sample", logits_source, layout.shape)
    z = np.asarray(layout.to_rows(logits)[r], dtype=np.float64)
    batch_index = layout.batch_index(r)
    where = (f"row {r}" + (f" {batch_index}" if len(batch_index) > 1 else "")
             + f" of {logits_source}") if layout.batch_shape else logits_source
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "biuf":
            raise CeCheckError(f"{labels_source}: dtype {labels.dtype} is not numeric")
        C = layout.n_classes
        if labels.shape == logits.shape and not (labels.ndim == 1 and C == 1):
            target = np.asarray(layout.to_rows(labels)[r], dtype=np.float64)
        else:
            y = match_batch(labels, layout, labels_source, "class-index labels")[r]
            yf = float(y)
            if not math.isfinite(yf) or yf != round(yf):
                raise CeCheckError(f"{labels_source}: label {y!r} of sample {batch_index} is not a whole "
                                   "number (class indices must be integers; probability targets need "
                                   "the logits' shape)")
            label = int(yf)
            if not 0 <= label < C:
                extra = " (PyTorch's ignore_index: that sample has no gradient to explain)" if label == -100 else ""
                raise CeCheckError(f"{labels_source}: label {label} of sample {batch_index} is out of "
                                   f"range [0, {C}){extra}")
    return Sample(z, label, target, where, batch_index if layout.batch_shape else None)


def binary_sample(logits: np.ndarray, row: tuple[int, ...] | None, *, labels: np.ndarray | None,
                  label: float | None, logits_source: str, labels_source: str) -> Sample:
    """Element `row` of logits of any shape, and its label."""
    logits = np.asarray(logits)
    if logits.dtype.kind not in "biuf":
        raise CeCheckError(f"{logits_source}: dtype {logits.dtype} is not numeric")
    if logits.size == 0:
        raise CeCheckError(f"{logits_source}: shape {logits.shape}: no logits")
    shape = tuple(logits.shape)
    r = _flat_index(row, shape, "logit", logits_source, shape)
    index = tuple(int(i) for i in np.unravel_index(r, shape)) if shape else ()
    z = np.array([float(logits.reshape(-1)[r])])
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "biuf":
            raise CeCheckError(f"{labels_source}: dtype {labels.dtype} is not numeric")
        if labels.size != logits.size:
            raise CeCheckError(f"{labels_source}: shape {labels.shape} does not match the logits "
                               f"{shape}: binary labels need the logits' shape")
        label = float(labels.reshape(-1)[r])
    where = f"element {index} of {logits_source}" if logits.size > 1 else logits_source
    return Sample(z, None, np.array([label], dtype=np.float64), where, index if shape else None)


# ---------------------------------------------------------------------------------------------
# stable pieces


def softmax_parts(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _softplus(x):
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def sigmoid(x):
    """s(x) = exp(-softplus(-x)), as ce_cli.models.sigmoid forms it: relative precision down to the
    subnormals (1/(1 + exp(-x)) is 0 once exp(-x) overflows, at x < -709.8)."""
    return np.exp(-_softplus(-np.asarray(x, dtype=np.float64)))


def _minus(a: np.ndarray, one_minus_a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """a - y, as (1 - y) - (1 - a) where a > 1/2 (no cancellation at a ~ y ~ 1)."""
    return np.where(a > 0.5, (1.0 - y) - one_minus_a, a - y)


def _jacobian_rows(a: np.ndarray, one_minus_a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """J[rows, :] with J[j, i] = a_i (1{i=j} - a_j): -a_i a_j off the diagonal, a_j (1 - a_j) on it."""
    block = -np.outer(a[rows], a)
    block[np.arange(rows.size), rows] = a[rows] * one_minus_a[rows]
    return block


def _compare(name: str, expected, got, allowed, rule: str, *, expected_label: str, got_label: str,
             index, note: str = "", worst: int = 5) -> CheckResult:
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


def _open_interval_check(name: str, what: str, a: np.ndarray, log_a: np.ndarray,
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
    notes = []
    if rounded0.any():
        notes.append(f"{int(rounded0.sum())} entries round to exactly 0 in float64 (ln a <= {LOG_TINY:.1f})")
    if rounded1.any():
        notes.append(f"{int(rounded1.sum())} round to exactly 1 (1 - a = "
                     f"{float(one_minus_a[rounded1].max()):.3g} < eps/2)")
    if skip.any():
        notes.append(f"{int(skip.sum())} masked (-inf) classes are 0 by definition")
    return CheckResult(
        name=name, ok=not bad.any(), expected_label="(0, 1)", got_label=what,
        max_abs_err=float(err.max()) if err.size else 0.0, max_rel_err=0.0,
        mismatches=int(bad.sum()), total=int((~skip).sum()), worst=worst,
        rule=(f"0 < {what}_i < 1; float64 may round {what}_i to exactly 0 only where ln {what}_i <= "
              f"ln 2^-1074 = {LOG_TINY:.2f}, to exactly 1 only where 1 - {what}_i <= eps/2"),
        note="; ".join(notes))


def _vector_index(cols: np.ndarray):
    return lambda r, _c: (int(cols[r]),)


def _matrix_index(rows: np.ndarray, cols: np.ndarray):
    return lambda r, c: (int(rows[r]), int(cols[c]))


# ---------------------------------------------------------------------------------------------
# finite differences


def _loss_fd(problem, z: np.ndarray, entry_cols: np.ndarray, steps: np.ndarray):
    """Central differences of the kernel's row loss at (entry_cols[k], steps[k]) for each k,
    with the kernel's rigorous bound (rounding 8 eps (|C| + ...)/h plus truncation
    h^2/6 max|C'''| on the step): `grad`'s own finite differences, on one sample."""
    rows = np.zeros(entry_cols.size, dtype=np.int64)
    ev = problem.evaluate_rows(z[None, :], rows[:1], grad=False).take_rows(rows)
    fd, bound, _ = central_differences(problem, np.tile(z, (entry_cols.size, 1)), rows, entry_cols,
                                       z[entry_cols], ev, h=steps)
    return fd, bound


def _fd_steps(z: np.ndarray) -> np.ndarray:
    """The step `grad` uses: h = eps^(1/3) max(1, |z|)."""
    return step_for(z)


def _softmax_jacobian_fd(z: np.ndarray, cols: np.ndarray):
    """Columns `cols` of the Jacobian by central differences of softmax: column i is
    (a(z + h e_i) - a(z - h e_i)) / d with d = (z_i + h) - (z_i - h).

    Bound: each float64 a_j errs by at most eps (a_j + 1) absolute (relative eps (1 + 2|ln a_j|),
    and a|ln a| <= 1/e), so the difference by eps (a+ + a- + 2), divided by d; truncation
    (d/2)^2/6 max|d^3 a_j/dz_i^3| <= (d/2)^2/48, since a_i as a function of z_i is a logistic
    curve (|s'''| <= 1/8) and a_j (j != i) is at most one minus such a curve."""
    fd = np.empty((z.size, cols.size))
    bound = np.empty((z.size, cols.size))
    for block, _r, zp, zm, d in _perturbed_copies(z, cols):
        d = d[:, None]
        ap = softmax_parts(zp)[0]
        am = softmax_parts(zm)[0]
        fd[:, block] = ((ap - am) / d).T
        bound[:, block] = (SAFETY * (EPS * (ap + am + 2.0) / d + (d / 2.0) ** 2 * SIGMA3_MAX / 6.0)).T
    return fd, bound


def _perturbed_copies(z: np.ndarray, cols: np.ndarray):
    """Copies of the sample z with entry cols[k] moved by -+h (grad's step), in batches of at
    most 2^20 values: yields (slice into cols, row index, z + h e, z - h e, realised 2h)."""
    per = max(1, (1 << 20) // z.size)
    for s in range(0, cols.size, per):
        c = cols[s:s + per]
        r = np.arange(c.size)
        zc = z[c]
        h = _fd_steps(zc)
        zp = np.tile(z, (c.size, 1))
        zm = zp.copy()
        zp[r, c] = zc + h
        zm[r, c] = zc - h
        yield slice(s, s + c.size), r, zp, zm, zp[r, c] - zm[r, c]


# ---------------------------------------------------------------------------------------------
# multiclass


def _probe_columns(z: np.ndarray, a: np.ndarray, y: np.ndarray, target: int, seed: int) -> np.ndarray:
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


def explain_softmax(z, *, label: int | None = None, target=None, seed: int = 0) -> Explanation:
    """The derivation for one sample: logits z (C,), and a class `label` or `target` probabilities."""
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
    if (label is None) == (target is None):
        raise CeCheckError("give the target as a class label or as probabilities (one of them)")
    if label is not None:
        label = int(label)
        if not 0 <= label < C:
            raise CeCheckError(f"--label {label}: out of range [0, {C})")
        y = np.zeros(C)
        y[label] = 1.0
        t = label
    else:
        y = np.asarray(target, dtype=np.float64).reshape(-1)
        if y.size != C:
            raise CeCheckError(f"--target: {y.size} values for {C} logits")
        if not np.isfinite(y).all():
            i = int(np.flatnonzero(~np.isfinite(y))[0])
            raise CeCheckError(f"--target: non-finite probability {y[i]} at class {i}")
        t = int(np.argmax(y))
    hit = masked & (y != 0)
    if hit.any():
        i = int(np.flatnonzero(hit)[0])
        raise CeCheckError(f"class {i} is masked (logit -inf, a = 0) but its target is {y[i]:g}: "
                           "the loss is infinite")
    with np.errstate(all="ignore"):
        return _explain_softmax(z, y, label, t, masked, seed)


def _explain_softmax(z, y, label, t, masked, seed) -> Explanation:
    C = z.size
    a, log_a, oma = (v[0] for v in softmax_parts(z))
    labels = np.array([label]) if label is not None else y[None, :]
    problem, _ = build_softmax_ce(z[None, :], labels, reduction="sum")
    ev = problem.evaluate_rows(problem.z, np.arange(1))
    loss, gradient = float(ev.loss[0]), ev.grad[0].copy()

    probed = _probe_columns(z, a, y, t, seed)
    full = C <= FULL_C
    jac = _jacobian_rows(a, oma, np.arange(C)) if full else None
    # J is symmetric, so column i is computed by the same formula as row i
    jac_cols = jac[:, probed] if full else _jacobian_rows(a, oma, probed).T
    jfd, jbound = _softmax_jacobian_fd(z, probed)

    dC_da = np.where(y != 0, -y / a, 0.0)
    nz = np.flatnonzero(dC_da)
    if full:
        chain = jac.T @ dC_da
        absdot = np.abs(jac).T @ np.abs(dC_da)
    else:
        if nz.size * C > PRODUCT_LIMIT:
            raise CeCheckError(f"target: {nz.size} nonzero entries over {C} classes: the literal chain-rule "
                               f"product needs C*nnz(y) = {nz.size * C:.3g} terms (limit 2^28); use a "
                               "sparser target or fewer classes")
        chain = np.zeros(C)
        absdot = np.zeros(C)
        per = max(1, (1 << 22) // C)
        for s in range(0, nz.size, per):
            rows = nz[s:s + per]
            block = _jacobian_rows(a, oma, rows)      # J[rows, :]; rows with dC/da = 0 add exact zeros
            chain += dC_da[rows] @ block
            absdot += np.abs(dC_da[rows]) @ np.abs(block)
    a_minus_y = _minus(a, oma, y)

    fd = np.full(C, np.nan)
    fd_bound = np.full(C, np.nan)
    fd[probed], fd_bound[probed] = _loss_fd(problem, z, probed, _fd_steps(z[probed]))
    dfd = np.full(C, np.nan)
    dfd_allowed = np.full(C, np.nan)
    dfd[probed], dfd_allowed[probed] = _dC_da_fd(a, log_a, y, dC_da, probed)

    checks, notes = _softmax_checks(z, a, log_a, oma, y, masked, probed, full, jac, jac_cols, jfd, jbound,
                                    dC_da, dfd, dfd_allowed, chain, absdot, nz.size, a_minus_y, fd,
                                    fd_bound)
    return Explanation("multiclass", z, a, oma, log_a, y, label, t, loss, gradient, jac, probed, jac_cols,
                       jfd, jbound, dC_da, dfd, chain, a_minus_y, fd, fd_bound, tuple(checks),
                       tuple(notes), problem)


def _dC_da_fd(a, log_a, y, dC_da, probed):
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
    truncation = _cube_term(yj, aj, d)
    allowed = SAFETY * (rounding + np.where(yj != 0, truncation, 0.0)) + 4.0 * EPS * np.abs(dC_da[probed])
    return fd, allowed


def _softmax_checks(z, a, log_a, oma, y, masked, probed, full, jac, jac_cols, jfd, jbound, dC_da, dfd,
                    dfd_allowed, chain, absdot, nnz, a_minus_y, fd, fd_bound):
    C = z.size
    lnC = math.log(C)
    checks: list[CheckResult] = []
    notes: list[str] = []
    everything = np.arange(C)
    scope = "" if full else f" (on the {probed.size} probed classes)"

    # step 2: a = softmax(z)
    checks.append(_compare(
        "softmax_sums_to_1", [1.0], [a.sum()], [4.0 * EPS * (C + 1.0 + lnC)],
        "|sum a - 1| <= 4 eps (C + 1 + ln C): each a_i errs by eps (1 + |ln a_i|) relative, "
        "sum a_i |ln a_i| <= ln C, and the sum adds C eps",
        expected_label="1", got_label="sum a", index=lambda r, c: ()))
    checks.append(_open_interval_check("softmax_in_0_1", "a", a, log_a, oma, masked))

    # step 3: y
    ysum = float(y.sum())
    res = _compare(
        "target_is_distribution", [1.0], [ysum], [4.0 * EPS * C],
        "y_i >= 0 and |sum y - 1| <= 4 C eps: sum y = 1 is what collapses a_i sum_j y_j into a_i",
        expected_label="1", got_label="sum y", index=lambda r, c: ())
    negative = int((y < 0).sum())
    if negative:
        res = replace(res, ok=False, mismatches=res.mismatches + negative,
                      note=f"{negative} negative target entries")
    checks.append(res)
    if not res.ok:
        notes.append(f"the target is not a probability distribution (sum y = {ysum:.17g}"
                     + (f", {negative} negative entries" if negative else "") + "): the chain rule gives "
                     "dC/dz = (sum y) a - y, which the finite differences confirm; a - y assumes sum y = 1")

    # step 4: the Jacobian
    P = probed
    sub = np.searchsorted(P, P)  # positions of the probed classes among the probed columns
    block = jfd[P][:, sub]
    checks.append(_compare(
        "jacobian_symmetric", block.T, block, jbound[P][:, sub] + jbound[P][:, sub].T,
        "the measured Jacobian: central difference da_j/dz_i vs da_i/dz_j, within the sum of their "
        "error bounds (the formula a_i (1{i=j} - a_j) is symmetric by construction)" + scope,
        expected_label="FD da_i/dz_j", got_label="FD da_j/dz_i", index=_matrix_index(P, P)))
    rows = everything if full else P
    row_sums = jac.sum(axis=1) if full else _jacobian_rows(a, oma, P).sum(axis=1)
    checks.append(_compare(
        "jacobian_rows_sum_to_0", np.zeros(rows.size), row_sums,
        2.0 * EPS * a[rows] * (3.0 * C + 2.0 * lnC + 4.0) + TINY,
        "|sum_i J[j, i]| <= 2 eps a_j (3C + 2 ln C + 4): a_j (1 - a_j) - sum_(i != j) a_j a_i, with "
        "a's rounding (eps (1 + ln C) in total) and the sum's (2C eps a_j)" + scope,
        expected_label="0", got_label="row sum", index=_vector_index(rows)))
    checks.append(_compare(
        "jacobian_vs_fd", jac_cols, jfd, jbound,
        "J[j, i] = a_i (1{i=j} - a_j) vs (a_j(z + h e_i) - a_j(z - h e_i))/2h, h = eps^(1/3) max(1, |z_i|): "
        "within 2 (eps (a+ + a- + 2)/2h + h^2/48)" + scope,
        expected_label="a_i(1{i=j}-a_j)", got_label="finite diff", index=_matrix_index(everything, P)))

    # step 5: dC/da
    checks.append(_compare(
        "dC_da_vs_fd", dC_da[P], dfd[P], dfd_allowed[P],
        "-y_j/a_j (0 where y_j = 0) vs central differences of C(a) = -sum y_k ln a_k in a_j, step "
        "eps^(1/3) a_j: within 2 (rounding 4 eps |y_j| (1 + |ln a_j|)/2h + truncation h^2 |y_j|/(3 (a_j - h)^3))"
        " + 4 eps |dC/da_j|" + scope,
        expected_label="-y/a", got_label="finite diff", index=_vector_index(P)))

    # steps 6-7: the chain rule against a - y
    allowed = np.maximum(CHAIN_RTOL * np.maximum(1.0, np.abs(a_minus_y)),
                         4.0 * (nnz + 1) * EPS * absdot)
    checks.append(_compare(
        "chain_rule_vs_a_minus_y", a_minus_y, chain, allowed,
        "sum_j J[j, i] dC/da_j vs a_i - y_i: within 1e-12 max(1, |a_i - y_i|) (or the dot product's "
        "rounding bound 4 (nnz(y) + 1) eps sum_j |J[j, i] dC/da_j|, if larger)",
        expected_label="a - y", got_label="J^T dC/da", index=_vector_index(everything)))

    # step 8: finite differences of the loss
    checks.append(_compare(
        "fd_vs_a_minus_y", a_minus_y[P], fd[P], SAFETY * fd_bound[P],
        "a - y vs (C(z + h e_i) - C(z - h e_i))/2h, h = eps^(1/3) max(1, |z_i|), C from the float64 "
        "kernel: within twice the kernel's bound (rounding 8 eps (|C| + 2 + 2 log2 C)/h + truncation "
        "h^2/6 max|a(1 - a)(1 - 2a)|)" + scope,
        expected_label="a - y", got_label="finite diff", index=_vector_index(P)))

    under = (a == 0.0) & ~masked
    if (under & (y == 0)).any():
        notes.append(f"a underflows to 0 for {int((under & (y == 0)).sum())} classes (ln a < {LOG_TINY:.0f}): "
                     "there -y/a would be 0/0, but with y = 0 the term -y ln a is absent from C, so "
                     "dC/da is exactly 0 (its value for any a > 0) and the chain rule uses 0")
    if masked.any():
        notes.append(f"{int(masked.sum())} classes are masked (logit -inf): a = 0 exactly, their rows "
                     "and columns of J are 0, and finite differences skip them")
    overflow = (y != 0) & ~np.isfinite(dC_da)
    if overflow.any():
        j = int(np.flatnonzero(overflow)[0])
        notes.append(f"class {j} has y = {y[j]:g} but a = exp({log_a[j]:.1f}), below float64's range for "
                     "1/a: dC/da = -y/a is not representable, so the literal chain rule fails in float64 "
                     "while the closed form a - y stays exact; this is why frameworks fuse softmax with "
                     "the cross-entropy")
    if not full:
        notes.append(f"C = {C} > {FULL_C}: the Jacobian and the finite differences are checked on "
                     f"{P.size} probed classes (the target, the arg-max, the {PROBE_TOP} largest a and y, "
                     f"{PROBE_RANDOM} random); the chain rule and a - y on all {C}")
    return checks, notes


# ---------------------------------------------------------------------------------------------
# binary


def explain_binary(z, y) -> Explanation:
    """The derivation for one logit z and a label y in [0, 1] (sigmoid BCE)."""
    x = float(np.asarray(z, dtype=np.float64).reshape(-1)[0]) if np.size(z) == 1 else None
    if x is None:
        raise CeCheckError(f"logits: --kind binary explains one logit; got {np.size(z)} values")
    if not math.isfinite(x):
        raise CeCheckError(f"logits: the logit is {x}; --kind binary needs a finite logit")
    yv = float(np.asarray(y, dtype=np.float64).reshape(-1)[0])
    if not 0.0 <= yv <= 1.0:
        raise CeCheckError(f"label {yv!r} is outside [0, 1]")
    with np.errstate(all="ignore"):
        return _explain_binary(x, yv)




def _explain_binary(x: float, yv: float) -> Explanation:
    z = np.array([x])
    y = np.array([yv])
    s = sigmoid(z)                 # s(z)
    q = sigmoid(-z)                # 1 - s(z), without cancellation
    log_s = -_softplus(-z)
    label = int(yv) if yv in (0.0, 1.0) else None
    problem, _ = build_sigmoid_bce(z, y, reduction="sum")
    ev = problem.evaluate_rows(problem.z, np.arange(1))
    loss, gradient = float(ev.loss[0]), ev.grad[0].copy()

    jac = (s * q).reshape(1, 1)                                 # s' = s (1 - s)
    g = np.where(yv != 0, -yv / s, 0.0) + np.where(yv != 1, (1.0 - yv) / q, 0.0)
    chain = jac.T @ g
    absdot = np.abs(jac).T @ np.abs(np.where(yv != 0, -yv / s, 0.0)) + \
        np.abs(jac).T @ np.abs(np.where(yv != 1, (1.0 - yv) / q, 0.0))
    a_minus_y = np.where(x > 0, (1.0 - y) - q, s - y)
    probed = np.array([0])

    h = _fd_steps(z)
    zp, zm = z + h, z - h
    d = zp - zm
    sp, sm = sigmoid(zp), sigmoid(zm)
    jfd = ((sp - sm) / d).reshape(1, 1)
    jbound = (SAFETY * (EPS * (sp + sm + 2.0) / d + (d / 2.0) ** 2 * SIGMA3_MAX / 6.0)).reshape(1, 1)

    fd, fd_bound = _loss_fd(problem, z, probed, h)
    dfd, dfd_allowed = _dC_ds_fd(float(s[0]), float(q[0]), yv, float(g[0]))

    checks: list[CheckResult] = []
    one = _vector_index(probed)
    checks.append(_compare(
        "sigmoid_sums_to_1", [1.0], [s[0] + q[0]], [4.0 * EPS * (3.0 + math.log(2.0))],
        "|s(z) + s(-z) - 1| <= 4 eps (3 + ln 2) (softmax over [0, z] is [1 - s, s], C = 2)",
        expected_label="1", got_label="s(z) + s(-z)", index=lambda r, c: ()))
    checks.append(_open_interval_check("sigmoid_in_0_1", "s", s, log_s, q, np.zeros(1, dtype=bool)))
    checks.append(_compare(
        "jacobian_vs_fd", jac.reshape(-1), jfd.reshape(-1), jbound.reshape(-1),
        "s' = s (1 - s) vs (s(z + h) - s(z - h))/2h, h = eps^(1/3) max(1, |z|): within "
        "2 (eps (s+ + s- + 2)/2h + h^2/48)",
        expected_label="s(1-s)", got_label="finite diff", index=one))
    checks.append(_compare(
        "dC_da_vs_fd", g, [dfd], [dfd_allowed],
        "-y/s + (1 - y)/(1 - s) vs central differences of C(s) = -y ln s - (1 - y) ln(1 - s) in s, "
        "step eps^(1/3) min(s, 1 - s), with s and 1 - s carried separately: within 2 (rounding + "
        "truncation) + the step mismatch of 1 - s + 4 eps |dC/ds|",
        expected_label="dC/ds", got_label="finite diff", index=one))
    checks.append(_compare(
        "chain_rule_vs_a_minus_y", a_minus_y, chain,
        np.maximum(CHAIN_RTOL * np.maximum(1.0, np.abs(a_minus_y)), 12.0 * EPS * absdot),
        "s' dC/ds vs s - y: within 1e-12 max(1, |s - y|) (or 12 eps (|s' y/s| + |s' (1 - y)/(1 - s)|), "
        "if larger)",
        expected_label="s - y", got_label="s' dC/ds", index=one))
    checks.append(_compare(
        "fd_vs_a_minus_y", a_minus_y, fd, SAFETY * fd_bound,
        "s - y vs (C(z + h) - C(z - h))/2h, h = eps^(1/3) max(1, |z|), C from the float64 kernel: "
        "within twice the kernel's bound",
        expected_label="s - y", got_label="finite diff", index=one))
    notes = []
    if not np.isfinite(g).all():
        notes.append(f"s = exp({float(log_s[0]):.1f}) or 1 - s is below float64's range for 1/s: "
                     "dC/ds is not representable, so the literal chain rule fails in float64 while s - y "
                     "stays exact; this is why frameworks fuse the sigmoid with the cross-entropy")
    return Explanation("binary", z, s, q, log_s, y, label, 0, loss, gradient, jac, probed, jac.copy(), jfd,
                       jbound, g, np.array([dfd]), chain, a_minus_y, fd, fd_bound, tuple(checks),
                       tuple(notes), problem)


def _cube_term(y, a, d):
    """(d/2)^2/6 * 2|y|/(a - d/2)^3, the truncation of a central difference of -y ln a, formed as
    |y|/3 * r^2/(1 - r)^3 / a with r = (d/2)/a, so nothing underflows for tiny a."""
    r = (d / 2.0) / a
    return np.abs(y) / 3.0 * r * r / (1.0 - r) ** 3 / a


def _dC_ds_fd(p: float, q: float, y: float, g: float) -> tuple[float, float]:
    """Central difference of C(s) = -y ln s - (1 - y) ln(1 - s) along s, with s = p and 1 - s = q
    stored separately (p + h pairs with q - h), step h = eps^(1/3) min over the present terms.

    The step d is the realised one on the side of the smaller present term, (p + h) - (p - h) or
    (q + h) - (q - h): that side holds h to full precision (the other may be ~1). Bound: rounding
    2 eps (1 + |ln|) per present term and evaluation, over d; truncation (d/2)^2/6 (2y/(p - h)^3
    + 2(1 - y)/(q - h)^3); the other side's realised step differs from d, adding
    |dC/d(that term)| |d_other - d|/d."""
    present = [(v, side) for v, side, on in ((p, "p", y != 0), (q, "q", y != 1)) if on]
    m, side = min(present)
    h = KAPPA * m
    pp, pm = p + h, p - h
    qp, qm = q + h, q - h
    dp, dq = pp - pm, qp - qm
    d = dp if side == "p" else dq
    if not d > 0.0:
        return math.nan, 0.0  # s or 1 - s is 0 in float64 (|z| > 745): no step fits

    def cost(ps: float, qs: float) -> float:
        return ((-y * math.log(ps) if y != 0 else 0.0)
                + (-(1.0 - y) * math.log(qs) if y != 1 else 0.0))

    fd = (cost(pp, qm) - cost(pm, qp)) / d
    rounding = 2.0 * 2.0 * EPS * ((y * (1.0 + abs(math.log(p))) if y != 0 else 0.0)
                                 + ((1.0 - y) * (1.0 + abs(math.log(q))) if y != 1 else 0.0)) / d
    truncation = ((_cube_term(y, p, d) if y != 0 else 0.0)
                  + (_cube_term(1.0 - y, q, d) if y != 1 else 0.0))
    mismatch = ((abs(y / p) * abs(dp - d) if y != 0 else 0.0)
                + (abs((1.0 - y) / q) * abs(dq - d) if y != 1 else 0.0)) / d
    return fd, SAFETY * (rounding + truncation) + mismatch + 4.0 * EPS * abs(g)


# ---------------------------------------------------------------------------------------------
# --compare-mse


def _sigmoid_minus(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """s(z) - y, as (1 - y) - s(-z) where z > 0."""
    return np.where(z > 0, (1.0 - y) - sigmoid(-z), sigmoid(z) - y)


def compare_mse(expl: Explanation) -> MseComparison:
    """The quadratic cost M = 1/2 sum (s(z) - y)^2 on sigmoid outputs against cross-entropy.

    Its output error dM/dz = (s - y) s'(z) carries s' = s (1 - s), which vanishes as s saturates;
    CE's a - y does not. The saturation table pushes one wrong logit up (multiclass: to
    max(other logits) + d, so softmax saturates too; binary: away from the label, z = -+d)."""
    with np.errstate(all="ignore"):
        return _compare_mse(expl)


def _compare_mse(expl: Explanation) -> MseComparison:
    z, y = expl.z, expl.y
    s, sm = sigmoid(z), sigmoid(-z)
    sprime = s * sm
    mse = _sigmoid_minus(z, y) * sprime
    P = expl.probed
    mfd, mallowed = _mse_fd(z, y, P)
    checks = [_compare(
        "mse_vs_fd", mse[P], mfd, mallowed,
        "(s - y) s' vs central differences of M = 1/2 sum (s(z_k) - y_k)^2, summed term by term: "
        "within 2 (rounding 4 eps (3|s - y| + 2 (s - y)^2)/2h + truncation h^2/6 (0.2 + 0.125 |y|))",
        expected_label="(s-y)s'", got_label="finite diff", index=_vector_index(P))]
    rows = []
    if expl.kind == "binary":
        sign = -1.0 if y[0] >= 0.5 else 1.0
        wrong = 0
        for d in SATURATION_OFFSETS:
            v = np.array([sign * d])
            sv, qv = sigmoid(v), sigmoid(-v)
            err = _sigmoid_minus(v, y)
            rows.append(SaturationRow(d, float(v[0]), float(sv[0]), float(sv[0] * qv[0]),
                                      float(err[0] * sv[0] * qv[0]), float(err[0]), math.nan))
    else:
        t = expl.target
        others = np.flatnonzero((np.arange(z.size) != t) & np.isfinite(z))
        if others.size == 0:   # every other class is masked: push one anyway (the table is hypothetical)
            others = np.flatnonzero(np.arange(z.size) != t)
        cand = others[y[others] < y[t]] if (y[others] < y[t]).any() else others
        wrong = int(cand[np.argmax(z[cand])])
        rest = np.delete(z, wrong)
        top = float(rest[np.isfinite(rest)].max())
        for d in SATURATION_OFFSETS:
            zz = z.copy()
            zz[wrong] = top + d
            a, _, oma = (v[0] for v in softmax_parts(zz))
            ce = _minus(a, oma, y)
            v = np.array([zz[wrong]])
            sv, qv = sigmoid(v), sigmoid(-v)
            err = _sigmoid_minus(v, y[wrong:wrong + 1])
            rows.append(SaturationRow(d, float(v[0]), float(sv[0]), float(sv[0] * qv[0]),
                                      float(err[0] * sv[0] * qv[0]), float(ce[wrong]), float(ce[t])))
    last = rows[-1]
    ok = abs(last.mse) < abs(last.ce)
    checks.append(CheckResult(
        name="mse_vanishes_at_saturation", ok=ok, expected_label="|a - y|", got_label="|(s-y)s'|",
        max_abs_err=abs(last.mse), max_rel_err=abs(last.mse) / abs(last.ce) if last.ce else math.inf,
        mismatches=0 if ok else 1, total=1,
        worst=(Entry((wrong,), last.ce, last.mse, abs(last.mse), abs(last.ce)),),
        rule=f"at the saturated wrong logit z = {last.z:g}: |(s - y) s'| < |a - y| (the MSE error "
             "carries s' -> 0, CE's does not)"))
    return MseComparison(wrong, s, sprime, mse, mfd, expl.a_minus_y, tuple(rows), tuple(checks))


def _mse_fd(z: np.ndarray, y: np.ndarray, P: np.ndarray):
    """Central differences of M = 1/2 sum_k (s(z_k) - y_k)^2 at the probed entries, the difference
    summed term by term (terms that do not move cancel exactly).

    Bound: term i errs by at most eps (3|s - y| + 2 (s - y)^2) per evaluation (s to 3 eps), twice,
    over d; truncation (d/2)^2/6 max|M'''|, with M''' = 3 s' s'' + (s - y) s''' and |s'| <= 1/4,
    |s''| <= sqrt(3)/18, |s'''| <= 1/8: at most 0.2 + 0.125 |y_i|. Doubled."""
    fd = np.empty(P.size)
    allowed = np.empty(P.size)
    for block, r, zp, zm, d in _perturbed_copies(z, P):
        cols = P[block]
        ep = _sigmoid_minus(zp, y)
        em = _sigmoid_minus(zm, y)
        fd[block] = (0.5 * ep * ep - 0.5 * em * em).sum(axis=1) / d
        e = np.maximum(np.abs(ep[r, cols]), np.abs(em[r, cols]))
        rounding = 2.0 * EPS * (3.0 * e + 2.0 * e * e) / d
        truncation = (d / 2.0) ** 2 / 6.0 * (3.0 * 0.25 * THIRD_MOMENT_MAX + SIGMA3_MAX * (1.0 + np.abs(y[cols])))
        allowed[block] = SAFETY * (rounding + truncation)
    return fd, allowed


# ---------------------------------------------------------------------------------------------
# --steps


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
    fd, bound = _loss_fd(expl.problem, z, cols, h * scale)
    exact = float(expl.gradient[i])
    error = np.abs(fd - exact)
    fine = np.logspace(-1, -12, 221)
    _, fine_bound = _loss_fd(expl.problem, z, np.full(fine.size, i), fine * scale)
    chosen = int(np.flatnonzero(h == KAPPA)[0])
    best = int(np.nanargmin(error))
    check = _compare(
        "step_curve_within_bound", np.full(h.size, exact), fd, SAFETY * bound,
        f"|fd(h) - dC/dz_{i}| <= twice the kernel's bound (rounding 8 eps (|C| + ...)/h + truncation "
        f"h^2/6 max|C'''|) at each of the {h.size} steps",
        expected_label="dC/dz", got_label="finite diff", index=lambda r, c: (float(h[r]),),
        note=f"measured minimum at h = {h[best]:.2g}; eps^(1/3) = {KAPPA:.3g}")
    return StepCurve(i, float(z[i]), exact, h, scale, fd, error, bound, chosen, best,
                     float(fine[int(np.nanargmin(fine_bound))]), (check,))


# ---------------------------------------------------------------------------------------------
# what the renderers show (selection, not formatting)

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
