"""Name the likely cause of a failed gradient check from the error's pattern, with evidence.

Run only when `grad_vs_reference` failed, on a sample of rows (the rows of the worst entries
first, then rows spread over the batch; at most SAMPLE_ROWS), so its cost stays small. Each
rule looks at d = yours - reference on those rows:

- nonfinite:        NaN or inf in yours
- scale:            yours = K * reference everywhere (K = -1: the sign; K = D or N: a reduction)
- ignored_rows:     every error sits in an ignored row (ignored rows not zeroed)
- target_only:      every error sits at a target entry (the -y missing or applied twice)
- wrong_axis:       yours matches softmax over another axis of the logits (or the transpose)
- smoothing_form:   yours matches label smoothing of the form not in force (alpha/C vs
                    alpha/(C-1))
- targets_sum:      probability targets whose rows do not sum to 1, and yours = softmax -
                    targets: their sum taken as 1 (TensorFlow, Keras)
- row_scale:        each row scaled as a whole (its target entry too) by a factor of its own
                    (a per-chunk mean summed)
- row_factor:       each row's softmax terms are off by one common factor (a normaliser error,
                    or an extra term like z-loss)
- isolated:         a few isolated entries
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ce_cli.verify.results import Diagnosis

SAMPLE_ROWS = 512
# the sample's (R, C) float64 arrays hold at most this many entries (16 MB), at least MIN_ROWS
# rows: at C = 32,000 a 512-row sample took seconds of every failing check's diagnosis
SAMPLE_ENTRIES = 1 << 21
MIN_ROWS = 16
CLOSE = 1e-3  # relative agreement that counts as "matches" (at least: the precision's rule)
AGREE = 0.95  # the share of the sampled entries a common scale must hold for


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(eq=False)
class _Sample:
    rows: np.ndarray
    ref: np.ndarray     # (R, C) reference gradient of the reduced loss
    got: np.ndarray     # (R, C) yours, float64
    q: np.ndarray       # (R, C) target weights
    valid: np.ndarray   # (R,) rows that contribute
    tiny: float         # an entry's absolute rounding at the subnormals of your precision

    @property
    def d(self) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return self.got - self.ref


def diagnose(problem: Any, user_rows: Any, worst_rows: list[int], mismatches: int, total: int,
             allowed_rel: float, tiny: float = 0.0) -> tuple[Diagnosis, ...]:
    """Likely causes of your gradient's mismatches, most specific first (may be empty);
    `tiny`: your precision's absolute rounding at its subnormals (float16's 6e-8)."""
    sample = _sample(problem, user_rows, worst_rows, tiny)
    if sample is None:
        return ()
    found: list[Diagnosis] = []
    for rule in RULES:
        if any(d.code in SAID_BY.get(rule.__name__, ()) for d in found):
            continue
        hit = rule(problem, sample, allowed_rel)
        if hit is not None:
            found.append(hit)
    # isolated: a few, and few of all (10 of 10 wrong entries are not "isolated")
    if not found and 0 < mismatches <= max(10, total // 1000) and 4 * mismatches <= total:
        found.append(Diagnosis("isolated", f"{mismatches} isolated entries are wrong; the rest "
                               "match", f"{mismatches} of {total} entries over the tolerance"))
    return tuple(found)


def _sample(problem: Any, user_rows: Any, worst_rows: list[int], tiny: float) -> _Sample | None:
    N = problem.n_rows
    budget = max(MIN_ROWS, min(SAMPLE_ROWS, SAMPLE_ENTRIES // max(1, problem.n_classes)))
    worst = np.unique(np.asarray(worst_rows, dtype=np.int64))[:budget]
    spread = np.linspace(0, N - 1, num=min(N, budget - worst.size), dtype=np.int64)
    rows = np.unique(np.concatenate([worst, spread]))  # the worst rows, then rows across the batch
    target_weights = getattr(problem, "target_weights", None)
    if target_weights is None or rows.size == 0:
        return None
    ev = problem.evaluate_rows(np.asarray(problem.z[rows]), rows)
    got = np.asarray(user_rows[rows], dtype=np.float64)
    q, _spread = target_weights(rows)
    return _Sample(rows, ev.grad, got, q, problem.valid[rows], tiny)


def _nonfinite(problem, s: _Sample, _tol) -> Diagnosis | None:
    bad = ~np.isfinite(s.got)
    if not bad.any():
        return None
    r, c = (int(v) for v in np.argwhere(bad)[0])
    where = problem.layout.original_index(int(s.rows[r]), c)
    return Diagnosis("nonfinite", "your gradient holds NaN or inf",
                     f"{int(bad.sum())} non-finite entries in the sampled rows, first at {where}")


def _ratio(s: _Sample) -> np.ndarray | None:
    """yours / reference on the entries where the reference is clearly nonzero."""
    big = np.abs(s.ref) > 1e-6 * np.abs(s.ref).max() if s.ref.size else np.zeros(0, bool)
    if np.count_nonzero(big) < 4 or not np.isfinite(s.got[big]).all():
        return None
    return s.got[big] / s.ref[big]


def _scale(problem, s: _Sample, tol: float) -> Diagnosis | None:
    """One factor k on (nearly) every entry: within the precision's relative rule `tol` (at
    least CLOSE) of k on AGREE of the sampled entries (a 16-bit gradient's roundings, or its
    tiniest entries at a large logit spread, need not follow it exactly)."""
    ratio = _ratio(s)
    if ratio is None:
        return None
    k = float(np.median(ratio))
    close = max(CLOSE, tol)
    agree = float(np.mean(np.abs(ratio - k) <= close * abs(k)))
    if abs(k - 1) < close or agree < AGREE:
        return None
    where = "every sampled entry" if agree == 1.0 else f"{agree:.1%} of the sampled entries"
    evidence = f"yours / reference = {k:.6g} on {where}"
    if abs(k + 1) < close:
        return Diagnosis("sign", "the sign is flipped (yours = -reference)", evidence)
    n_rows, n_valid = problem.n_rows, int(np.count_nonzero(problem.valid))
    hints = {f"sum instead of mean over {n_valid} rows?": n_valid,
             f"mean over all {n_rows} rows instead of the {n_valid} not ignored?": n_valid / n_rows,
             f"mean over {n_rows} rows where the sum was meant?": 1.0 / n_rows,
             f"divided by N*C = {n_rows * problem.n_classes}?": 1.0 / problem.n_classes}
    for text, value in hints.items():
        if value != 1 and abs(k / value - 1) < close:
            return Diagnosis("scale", f"yours = {k:.6g} x reference: {text}", evidence)
    return Diagnosis("scale", f"yours = {k:.6g} x reference everywhere (a wrong scale factor)",
                     evidence)


def _bad(s: _Sample, tol: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.abs(s.d) > tol * np.maximum(np.abs(s.ref), np.abs(s.ref).max() * 1e-6)


def _ignored_rows(problem, s: _Sample, tol) -> Diagnosis | None:
    """Ignored rows (reference 0) that carry a gradient, the other rows matching to CLOSE of
    their largest entry (not to the rule itself: a correct row's smallest entries may be off
    by more than `tol` relative, within its floor)."""
    ignored = ~s.valid
    if not ignored.any():
        return None
    carry = (np.abs(np.nan_to_num(s.got[ignored], nan=1.0)) > s.tiny).any(axis=1)
    if not carry.any():
        return None
    with np.errstate(invalid="ignore"):
        valid_d = np.abs(s.d[s.valid])
        scale = np.abs(s.ref[s.valid]).max(axis=1, keepdims=True, initial=0.0)
        if (valid_d > max(CLOSE, tol) * scale).any():
            return None
    return Diagnosis("ignored_rows", "every error is in an ignored row: ignored rows not zeroed",
                     f"{int(carry.sum())} of the sample's {int(ignored.sum())} ignored rows carry "
                     "a gradient (the reference is 0 there); the other rows match")


def _target_only(problem, s: _Sample, tol) -> Diagnosis | None:
    bad = _bad(s, tol)
    target = s.q != 0
    if not bad.any() or (bad & ~target).any() or problem.smoothing:
        return None
    if target[bad.any(axis=1)].all():  # dense (soft) targets: no other entry to match
        return None
    scale = problem.grad_scale
    k = np.median(s.d[bad] / (s.q[bad] * scale))
    what = "missing" if abs(k - 1) < 0.05 else ("applied twice" if abs(k + 1) < 0.05 else "wrong")
    return Diagnosis("target_only", f"errors only at the target entries: the -y term {what}",
                     f"{int(bad.sum())} target entries off by {k:.3g} x y; every other entry matches")


def _wrong_axis(problem, s: _Sample, _tol) -> Diagnosis | None:
    """Softmax over the batch axis of a 2-D (N, C) batch: a transposed layout."""
    z = problem.z
    if z.shape[0] < 2 or z.shape[0] * z.shape[1] > 1 << 22 or problem.layout.class_axis != 1 or len(problem.layout.shape) != 2:
        return None
    zf = np.asarray(z[:], dtype=np.float64)  # a slice: a bf16 input keeps no widened copy
    e = np.exp(zf - zf.max(axis=0, keepdims=True))
    a = (e / e.sum(axis=0, keepdims=True))[s.rows]
    alt = (a * s.q.sum(axis=1, keepdims=True) - s.q) * problem.grad_scale
    if np.allclose(s.got, alt, rtol=CLOSE, atol=1e-12 * _largest(alt)):
        return Diagnosis("wrong_axis", "softmax over the wrong axis: yours normalises over the "
                         "batch axis (a transposed layout?)", "yours matches softmax along axis 0")
    return None


def _largest(a: np.ndarray) -> float:
    """max |a| over its numbers (NaN rows of a 0/0 'mean' skipped; 0 when there are none)."""
    return float(np.fmax.reduce(np.abs(a), axis=None, initial=0.0))


# label smoothing's two forms (`smoothing_form`): the share of alpha each non-target class gets
_SPREAD = {"torch": lambda eps, C: eps / C, "others": lambda eps, C: eps / (C - 1)}
_SHORT = {"torch": "alpha/C", "others": "alpha/(C-1)"}
_SPREADS = {"torch": "alpha/C over every class", "others": "alpha/(C-1) over the other classes"}


def _smoothing_form(problem, s: _Sample, _tol) -> Diagnosis | None:
    """Yours matches label smoothing of the form not in force (torch: eps/C on every class;
    others: 1 - eps on the target, eps/(C-1) elsewhere)."""
    eps, C = problem.smoothing, problem.n_classes
    if not eps or C < 3:
        return None
    form = problem.sem.smoothing_form
    other = "others" if form == "torch" else "torch"
    # the other form moves d = spread(other) - spread(form) onto every non-target q_c and takes
    # (C - 1) d off the target's (both sum to 1). With coef = q w the gradient is
    # (a sum coef - coef) scale, so it moves by (a sum dcoef - dcoef) scale, where
    # a scale = (reference + coef scale) / sum coef (sum dcoef = 0 without class weights)
    d = _SPREAD[other](eps, C) - _SPREAD[form](eps, C)
    w = problem.weight if problem.weight is not None else np.ones(C)
    y = np.argmax(s.q, axis=1)
    dq = np.where(s.valid[:, None], d, 0.0) * np.ones(C)
    dq[np.arange(y.size), y] *= -(C - 1)
    dcoef = dq * w
    total = s.q.sum(axis=1, keepdims=True)
    soft = s.ref + s.q * problem.grad_scale
    with np.errstate(invalid="ignore", divide="ignore"):
        moved = np.where(total != 0, soft * dcoef.sum(axis=1, keepdims=True) / total, 0.0)
    alt = s.ref + moved - dcoef * problem.grad_scale
    if np.allclose(s.got, alt, rtol=CLOSE, atol=1e-9 * _largest(alt)):
        return Diagnosis("smoothing_form", f"label smoothing of the other form: yours spreads "
                         f"{_SPREADS[other]}, the check expects {_SHORT[form]} (`smoothing_form`)",
                         f"yours matches the {_SHORT[other]} form, alpha = {eps}")
    return None


def _targets_sum(problem, s: _Sample, tol) -> Diagnosis | None:
    """Probability target rows summing to Q != 1 and yours = (a - q) scale, not (Q a - q) scale:
    TensorFlow's softmax_cross_entropy_with_logits and Keras form softmax - labels whatever
    the labels' sum (16-bit targets: 1 +- 3e-3), which is not the derivative of the loss they
    report, -sum q log a."""
    if problem.probs is None or problem.sem.extended or problem.weight is not None:
        return None  # (class weights: q = p w sums to anything)
    total = s.q.sum(axis=1, keepdims=True)
    if np.all(total == 1.0):
        return None
    scale = problem.grad_scale
    soft = s.ref + s.q * scale  # Q a scale
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(total != 0, soft / total, 0.0)
        alt = a - s.q * scale
        # your rounding of the result, and CLOSE of it for the terms' (a - q cancels where the
        # target is near the softmax)
        bound = tol * (np.abs(alt) + CLOSE * (np.abs(a) + np.abs(s.q * scale))) + s.tiny
        if not np.all(np.abs(s.got - alt) <= bound) or np.all(np.abs(s.d) <= bound):
            return None
    off = float(np.max(np.abs(total - 1.0)))
    return Diagnosis("targets_sum", "your target rows do not sum to 1 and yours is softmax - "
                     "targets, their sum taken as 1 (as TensorFlow's "
                     "softmax_cross_entropy_with_logits and Keras form it), not the derivative of "
                     "-sum q log softmax: normalise the targets",
                     f"row sums off 1 by up to {off:.3g}; yours matches (a - q) x scale")


def _row_scale(problem, s: _Sample, tol: float) -> Diagnosis | None:
    """Each contributing row scaled as a whole, its target entry too, by factors that differ
    between rows (one factor for all is `scale`): the row's gradient divided by a count of its
    own group - a per-chunk or per-sequence mean summed, or one row's weight given to all."""
    rows = s.valid & (np.abs(s.ref).max(axis=1, initial=0.0) > 0)
    if np.count_nonzero(rows) < 2:
        return None
    ref, got = s.ref[rows], s.got[rows]
    top = np.abs(ref).max(axis=1, keepdims=True)
    big = np.abs(ref) > 1e-3 * top  # the row's entries that carry its scale
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        k = np.nanmedian(np.where(big, got / np.where(big, ref, 1.0), np.nan), axis=1)
    close = max(CLOSE, tol)
    if not np.all(np.isfinite(k)) or np.all(np.abs(k - 1) <= close):
        return None
    if np.all(np.abs(k - k[0]) <= close * abs(k[0])):  # one factor: `scale` speaks of it
        return None
    if not np.all(np.abs(got - k[:, None] * ref) <= close * top):
        return None
    lo, hi = float(np.min(k)), float(np.max(k))
    return Diagnosis("row_scale", "each row is scaled as a whole, its target entry too, by a "
                     "factor of its own: a mean per chunk or per sequence summed, or another "
                     "row's weight or count applied?",
                     f"yours / reference per row from {lo:.4g} to {hi:.4g}; each row matches "
                     "once its factor is removed")


def _row_factor(problem, s: _Sample, tol) -> Diagnosis | None:
    soft = s.ref + s.q * problem.grad_scale
    # where the softmax term dominates, and not lost in the subnormals' rounding (float16
    # flushes most entries of a large batch's mean to 0 or to a few units of 6e-8)
    pick = (np.abs(soft) > 2 * np.abs(s.q * problem.grad_scale)) & (soft != 0)
    pick &= 4 * tol * np.abs(soft) > s.tiny
    fitted = pick.any(axis=1)
    if np.count_nonzero(pick) < 8:
        return None
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row of NaN errors: NaN
        f = np.where(pick, s.d / np.where(pick, soft, 1.0), np.nan)
        per_row = np.zeros(len(f))
        per_row[fitted] = np.nan_to_num(np.nanmedian(f[fitted], axis=1))
    resid = np.where(pick, s.d - per_row[:, None] * soft, 0.0)
    if (not np.all(np.abs(resid) <= 4 * tol * np.abs(soft) + s.tiny + 1e-300)
            or np.all(np.abs(per_row) <= tol)):
        return None
    per_row = per_row[fitted]
    lo, hi = float(np.min(per_row)), float(np.max(per_row))
    return Diagnosis("row_factor", "each row's softmax terms are off by one common factor: an "
                     "error in the normaliser (log-sum-exp), or a term added or lost (z-loss, "
                     "a smoothing coefficient rounded to 0)",
                     f"row factors from {lo:.3g} to {hi:.3g}; the entries agree once it is removed")


RULES = (_nonfinite, _scale, _ignored_rows, _targets_sum, _target_only, _wrong_axis,
         _smoothing_form, _row_scale, _row_factor)
# a rule not run when one of these was found: it would say the same again. One scale of every
# entry is every row's scale and factor too; an ignored row's gradient is a factor on its zero
# reference; the targets' sum moves every entry, the target ones too
SAID_BY = {"_row_scale": ("scale", "sign"),
           "_row_factor": ("scale", "sign", "targets_sum", "ignored_rows", "row_scale"),
           "_target_only": ("targets_sum",)}
