"""Row-level allowances, applied to the rows of your gradient that fail the entry-wise rule.

A softmax row's gradient is (Q a_c - q_c) * scale with a = exp(z - lse). An implementation that
sums the row's exponentials in its own precision gets lse wrong by a relative factor f: every
softmax term Q a_c comes back as (1 + f) Q a_c. For a sum of C positive terms in precision eps,
|f| <= (C - 1) * eps / 2 (recursive summation's bound; pairwise sums stay far below it, but
PyTorch's class-axis-1 kernel reaches 0.45 of it on adversarial rows; 16-bit values are summed
in float32, `EPS_ACCUMULATE`). The target-weight term
q_c (label smoothing's q = alpha/C on every class sums C terms too) may carry a factor h of the
same size. So a failing row is fitted as

    yours - reference = f * (Q a * scale) - h * (s * scale) + residual

where s is the part of q that smoothing spreads over every class (alpha w_c / C)

with f and h the medians over the entries each term dominates (h: at least MIN_FIT of them, so
no single entry moves it; f: where a row has fewer, as a peaked row with smoothing does, its few
softmax entries are all there is, and their error is indistinguishable from a factor). Factors
within the bound are removed, each leaving its own fit uncertainty; the residual must pass the
entry-wise rule. A row that still fails is reported with its raw errors unless a factor beyond
the entry-wise rule's own k * eps was found.

The row max: an implementation that differentiates through z - max(z) (no stop-gradient:
composed ops, MindSpore's `cross_entropy`, tinygrad before 0.10, autograd written from scratch)
adds (1 - sum_c a_c) Q * scale at the row's arg-max, zero in exact arithmetic but its own sum's
rounding in your precision (MindSpore float16: exactly 0, +-1/2 or -1 ulp of 1). A failing row's
arg-max entries are allowed that much more, times |Q scale|: `path_allowance`.

Flush-to-zero: XLA, TensorFlow and GPU kernels return results below the precision's smallest
normal as 0. An entry beyond the entry-wise rule whose reference is below it and whose value is
exactly 0 passes with error 0 (`strict_subnormals` turns this off). Unlike the row allowances
this is a rule of single entries, applied with the entry-wise rule itself (the compiled kernel's
comparison and `Comparison.measure`), so rows it lets pass are never refitted. The flushed
value may be an intermediate (the softmax entry) that a weight, the z-loss's 1 + 2 zeta lse
and the gradient scale multiply afterwards (T5X's backward: w (1 + 2 zeta lse) e / sum(e) - q):
the threshold is the smallest normal times `flush_factor`, the largest such product. A
subnormal value is held to the entry-wise rule: it was not flushed, and float16 gradients are
mostly subnormal at ordinary sizes. A sum of autodiff paths (the softmax term's and the
z-loss's) one or both of whose float32 values were flushed is short by at most twice float32's
smallest normal times `flush_factor` (`partial`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

import numpy as np

from ce_cli.verify.tolerance import EPS_ACCUMULATE, PRECISIONS, Tolerance, reduction_floor

# smallest positive normal number of each precision
NORMAL_MIN = {"f16": 2.0**-14, "bf16": 2.0**-126, "f32": 2.0**-126, "f64": 2.0**-1022}
# below what a correct result may come back as 0: flush-to-zero acts on float32 and float64
# (MXCSR, CUDA's -ftz); float16 values are computed in float32 and keep float16's subnormals
# (every kernel measured), so a float16 0 is a correct result only where an intermediate
# underflowed: below its smallest subnormal, not its smallest normal (6.1e-5, which let the
# zero gradient of a mean over 16,384+ elements pass)
FLUSH_BELOW = {**NORMAL_MIN, "f16": 2.0**-24}
MIN_FIT = 3  # entries a term must dominate before its factor is fitted: a median of 3 or more
# is never moved by a single wrong entry
NORMALISER_K = 0.5  # |f| <= K * eps * (C - 1), plus the floor's k * eps
TOP_ROWS = 5  # rows whose factors are kept, to tell a systematic factor from rounding
MAX_PEAKS = 8  # a row's tied maxima the row max's path is looked for at, at most
# `median`'s sample, and its window's half-width in sample entries: the sample median's rank
# errs by ~sqrt(n / 4 SAMPLE) entries of n, the window spans 3 of those standard deviations
WEIGHT_ENTRIES = 1 << 15  # target weights taken for rows of this many entries at a time
MEDIAN_SAMPLE = 256
MEDIAN_WINDOW = 24


def path_allowance(tol: Tolerance, n_classes: int) -> float:
    """What the row max's path |1 - sum_c a_c| may be: the sum of C terms accumulated
    (`reduction_floor`), plus k eps for the a_c rounded to your precision (eps/2 sum a) and the
    sum rounded to it (eps/2 of 1)."""
    return reduction_floor(tol, n_classes, 1.0) + tol.floor_coef


def normaliser_bound(tol: Tolerance, n_classes: int, override: float | None = None) -> float:
    """The largest row factor a correct implementation in `tol`'s precision can have: a sum of
    C terms in the accumulating precision (float32 for 16-bit values, `EPS_ACCUMULATE`), plus
    the floor's k * eps (the normaliser's own rounding to your precision)."""
    if override is not None:
        return override
    return (min(tol.eps, EPS_ACCUMULATE) * NORMALISER_K * (n_classes - 1)
            + tol.eps * tol.floor_factor)


class RowAllowance:
    """Refits failing rows (`refine`) and keeps what it found for the report."""

    def __init__(self, tol: Tolerance, n_classes: int, scale: float,
                 target_weights: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None,
                 normaliser_rtol: float | None = None, strict_subnormals: bool = False,
                 flush_factor: float = 1.0) -> None:
        self.scale = scale
        self.target_weights = target_weights  # rows -> dense (R, C) q and its spread part
        self.bound = normaliser_bound(tol, n_classes, normaliser_rtol)
        self.peak = path_allowance(tol, n_classes)
        self.normal_min = 0.0 if strict_subnormals else FLUSH_BELOW[tol.coarse] * max(1.0, flush_factor)
        # a sum of two paths (the softmax term's and the z-loss's, as autodiff forms them) of
        # which float32 flush-to-zero (XLA on the CPU; 16-bit values are computed in float32)
        # zeroed one or both: short by up to twice float32's smallest normal, times what
        # multiplies it after (float64's, 1e-308, are left to the rule above)
        ftz = 0.0 if strict_subnormals or tol.coarse == "f64" else NORMAL_MIN["f32"]
        self.partial = 2.0 * ftz * max(1.0, flush_factor)
        self.precision = tol.coarse
        self.noise = tol.floor_coef  # factors this small are the entry-wise rule's business
        # storage coarser than the computing precision (f32 stored as bf16): its rounding
        # swamps a factor's median fit, so the factor is fitted by intervals (`_interval_fit`)
        coarse = tol.storage != tol.precision and tol.coarse == tol.storage
        self.store_eps, self.store_tiny = PRECISIONS[tol.storage] if coarse else (0.0, 0.0)
        self.rtol = tol.rtol
        self.resolved = NORMAL_MIN[tol.coarse] / tol.eps  # smaller values lose relative precision
        self.half_tiny = PRECISIONS[tol.coarse][1] / 2.0
        self.n_classes = n_classes
        self.flushed = 0  # counted by the entry-wise rule (`flush`, the compiled kernel)
        self.rows_fitted = 0
        self.rows_rescued = 0  # rows that pass only with the allowances
        self.rows_peak = 0     # ... of which only with their arg-max's (the row max's path)
        self.rows_over = 0
        self.max_factor = 0.0
        self.worst_row: int | None = None
        # (row, softmax factor, rescued): the TOP_ROWS largest, applied or over the bound
        self.largest: list[tuple[int, float, bool]] = []
        # every rescued row and the softmax factor applied to it (`LossStage.unexplained`)
        self.soft_rows, self.soft_factors = array("q"), array("d")
        # the entries (row * C + column) a row passed with the path at, and what they were
        # allowed more: 16 bytes an entry (a million rows may need it)
        self.path_keys, self.path_amounts = array("q"), array("d")

    def weights(self, rows: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each row's (q, spread) times the gradient scale for `refine`, taken WEIGHT_ENTRIES
        at a time: one call for many narrow rows, and a wide row's while it is still in cache."""
        assert self.target_weights is not None  # softmax models only (`may_change`)
        step = max(1, WEIGHT_ENTRIES // max(1, self.n_classes))
        for a in range(0, len(rows), step):
            block = np.asarray(rows[a:a + step], dtype=np.int64)
            q, spread = (t * self.scale for t in self.target_weights(block))
            yield from zip(q, spread)

    def refine(self, row: int, ref: np.ndarray, got: np.ndarray, allowed: np.ndarray,
               ratio: np.ndarray, weights: tuple[np.ndarray, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row `row`'s |error| / allowed, |error| and allowed error after the allowances
        (non-finite entries unchanged); `weights`: the row's entry of `weights`. A softmax's
        rows only (`may_change`): the row factors are what refitting adds."""
        g = np.asarray(got, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            d = g - ref
        finite = np.isfinite(d) & np.isfinite(ratio)
        every = bool(finite.all())  # the common case: no masked copies
        if not every:
            d = np.where(finite, d, 0.0)
        flushed = finite & self.flushed_entries(ref, g, allowed)  # counted by the entry-wise rule
        fit = _Fit(row)
        d[flushed] = 0.0
        slack = np.zeros_like(d)
        where = None if every else finite
        bounds = self._entry_bounds(g, ref, allowed) if self.store_eps else None
        fitted = self._remove_factors(fit, ref, d, ~flushed & finite, slack, bounds, weights)
        out = _ratios(ratio, where, fitted, allowed, slack)
        # a failing row keeps its raw errors unless a factor beyond noise level was found
        if out.max() <= 1.0 or fit.significant:
            d = fitted
        else:
            slack[:] = 0.0
        # the path lands on the arg-max: only a row that fails there alone may need it
        if 0 < np.count_nonzero(out > 1.0) <= MAX_PEAKS:
            fit.peak = self._peak_slack(row, fit.soft_term, slack, finite, d, allowed)
        out = _ratios(ratio, where, d, allowed, slack)
        fit.rescued = bool(out.max() <= 1.0)
        if fit.over and not fit.rescued:  # the factor over the bound is the row's failure
            fit.factors.append(fit.over_factor)
        self._count(fit)
        error = np.abs(d) if every else np.where(finite, np.abs(d), np.abs(g - ref))
        return out, error, allowed + slack

    def _count(self, fit: _Fit) -> None:
        """Count what refining one row found."""
        self.rows_fitted += fit.fitted
        self.rows_peak += fit.peak
        self.rows_rescued += fit.rescued
        self.rows_over += fit.over and not fit.rescued
        for factor in fit.factors:
            self._record(fit.row, factor)
        if fit.rescued and fit.soft:
            self._keep(fit.row, fit.soft, True)
            self.soft_rows.append(fit.row)
            self.soft_factors.append(fit.soft)
        elif fit.over and not fit.rescued and fit.soft_over:
            self._keep(fit.row, fit.soft_over, False)

    def softmax_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """The rescued rows and the factor f applied to each one's softmax term: its lse off
        by -log(1 + f), if the factor is the normaliser's."""
        return (np.frombuffer(self.soft_rows, dtype=np.int64),
                np.frombuffer(self.soft_factors, dtype=np.float64))

    def may_change(self) -> bool:
        """Whether refining a failing row can change its errors or counts: with a softmax's row
        factors only (flushed entries passed already, with the entry-wise rule)."""
        return self.target_weights is not None

    def flushed_entries(self, ref: np.ndarray, got: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Where `got` fails the entry-wise rule (|error| / `allowed` > 1, the mismatches'
        test) but is a correct result below the smallest normal number returned as 0, or a sum
        one or both of whose paths were (`partial`)."""
        got = np.asarray(got)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            short = np.abs(got - ref)
            fails = short / allowed > 1.0
        flushed = (np.abs(ref) < self.normal_min) & (got == 0)
        if self.partial:
            flushed |= short <= self.partial
        return flushed & fails

    def flush_args(self) -> dict[str, float] | None:
        """`flushed_entries` as the compiled kernel's arguments (ce_args.flush_min), or None
        when nothing is let pass (strict subnormals)."""
        if not (self.normal_min or self.partial):
            return None
        return {"flush_min": self.normal_min, "flush_partial": self.partial,
                "flush_tiny": self.half_tiny}

    def flush(self, ref: np.ndarray, got: np.ndarray, diff: np.ndarray, ratio: np.ndarray,
              allowed: np.ndarray) -> int:
        """The entry-wise rule's part: errors and ratios of the `flushed_entries` of rows
        (R, C) set to 0 in place; returns how many of them a correctly rounded result would
        not have made 0 (|ref| above half the smallest subnormal)."""
        flushed = self.flushed_entries(ref, got, allowed)
        diff[flushed] = 0.0
        ratio[flushed] = 0.0
        return int(np.count_nonzero(flushed & (np.abs(ref) > self.half_tiny)))

    def flushed_note(self, count: int) -> str:
        part = "; a sum may lose a term that small" if self.partial else ""
        least = "subnormal" if self.precision == "f16" else "normal"
        return (f"{count:,} entries flushed to zero beyond the entry-wise rule (allowed: below "
                f"the smallest {least} {self.precision} number{part})")

    def _peak_slack(self, row: int, soft: np.ndarray, slack: np.ndarray, finite: np.ndarray,
                    d: np.ndarray, allowed: np.ndarray) -> bool:
        """The row max's path at the arg-max entries of `soft` = Q a * scale (ties: each),
        added to `slack` when that lets the row pass (then True: `rows_peak`, and `path_keys`)."""
        top = float(np.max(np.abs(soft), initial=0.0))
        if not top:
            return False
        peak = np.abs(soft) == top
        amount = self.peak * abs(float(soft.sum()))
        extra = np.where(peak, amount, 0.0)
        if not np.all(np.abs(d[finite]) <= (allowed + slack + extra)[finite]):
            return False
        slack += extra
        cols = np.flatnonzero(peak)
        self.path_keys.extend((row * self.n_classes + cols).tolist())
        self.path_amounts.extend([amount] * cols.size)
        return True

    def path_slack(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """What entries (rows[k], cols[k]) were allowed more for the row max's path (0 where
        their row passed without it, or they are not its arg-max)."""
        keys = np.frombuffer(self.path_keys, dtype=np.int64)
        if not keys.size:
            return np.zeros(len(rows))
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        want = np.asarray(rows, dtype=np.int64) * self.n_classes + np.asarray(cols, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, want), keys.size - 1)
        amounts = np.frombuffer(self.path_amounts, dtype=np.float64)[order]
        return np.where(keys[at] == want, amounts[at], 0.0)

    def _entry_bounds(self, got: np.ndarray, ref: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Each entry's error bound apart from the row factors, for coarse storage: the final
        rounding (half an ulp of the stored value) and the computing precision's floor (the
        allowed error less its relative rule)."""
        with np.errstate(invalid="ignore"):
            _mantissa, exponent = np.frexp(got)
            half_ulp = np.maximum(np.ldexp(self.store_eps, exponent - 2), self.store_tiny / 2)
            return half_ulp + np.maximum(allowed - self.rtol * np.abs(ref), 0.0)

    def _remove_factors(self, fit: _Fit, ref: np.ndarray, d: np.ndarray, usable: np.ndarray,
                        slack: np.ndarray, bounds: np.ndarray | None,
                        weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """d less the fitted factors (noted in `fit`); `slack` gains each removed factor's own
        uncertainty. `bounds` (coarse storage): each entry's error bound apart from the
        factors; `weights`: the row's (q, spread) times the scale."""
        q, spread = weights
        soft = ref + q          # Q a * scale
        fit.soft_term = soft
        weight = -spread        # smoothing's share of the target-weight term
        found = False
        soft_size, weight_size = np.abs(soft), np.abs(weight)
        # a peaked row with smoothing has one or two entries the softmax term dominates: their
        # error is a normaliser factor as far as anything can tell, so it is fitted from them
        for term, size, other_size, least in ((soft, soft_size, weight_size, 1),
                                              (weight, weight_size, soft_size, MIN_FIT)):
            # entries the term dominates, well above the subnormal range (full relative precision)
            resolved = size > self.resolved
            if not resolved.any():
                continue  # none (the target weights without smoothing: 0)
            pick = usable & (size > 2.0 * other_size) & resolved
            if np.count_nonzero(pick) < least:
                continue
            # coarse storage: the factor every entry allows (the other term's factor at most
            # the bound); else, or when no factor fits them all, the median
            interval = None if bounds is None else _interval_fit(
                d[pick], term[pick], bounds[pick] + self.bound * other_size[pick])
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # unpicked
                factor, error = interval or (median((d / term)[pick]), None)
            found = True
            if abs(factor) > self.bound:  # not applied: reported only if the row then fails
                fit.over, fit.over_factor = True, max(fit.over_factor, abs(factor))
                if term is soft:
                    fit.soft_over = factor
            else:
                if error is None:  # a median's uncertainty, needed only for a factor applied
                    error = self._fit_error(term, pick)
                fit.factors.append(factor)
                if term is soft:
                    fit.soft = factor
                d = d - factor * term
                slack += error * np.abs(term)
                fit.significant |= abs(factor) > self.noise
        fit.fitted = found
        return d

    def _fit_error(self, term: np.ndarray, pick: np.ndarray) -> float:
        """How far a median-fitted factor can be from the row's true one: the entries it was
        fitted from each carry the entry-wise rounding k*eps*(1 + |log a|), and in a row of
        equal logits they all carry the same one."""
        share = np.abs(term[pick]) / max(float(np.abs(term).sum()), 1e-300)
        with np.errstate(divide="ignore"):
            log_a = float(np.median(-np.log(np.maximum(share, 1e-300))))
        return self.noise * (1.0 + log_a)

    def _keep(self, row: int, factor: float, rescued: bool) -> None:
        """Keep (row, factor, rescued) among the TOP_ROWS largest softmax factors, applied
        (the row rescued) or over the bound (it fails): a z-loss left out gives either."""
        self.largest.append((row, factor, rescued))
        self.largest.sort(key=lambda rf: -abs(rf[1]))
        del self.largest[TOP_ROWS:]

    def _record(self, row: int, factor: float) -> None:
        """A factor applied to row `row`, or over the bound on a row that fails."""
        if abs(factor) > self.max_factor:
            self.max_factor, self.worst_row = abs(factor), row


class _Fit:
    """What refining one row finds: whether a factor was fitted, the row passes, only with its
    arg-max's allowance (`peak`), or fails with a factor over the bound (`over`); the factors
    to record, in order, the softmax factor applied (0: none) or found over the bound
    (`soft_over`) and the row's softmax term Q a * scale."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.fitted = self.rescued = self.peak = self.over = self.significant = False
        self.over_factor = self.soft = self.soft_over = 0.0
        self.factors: list[float] = []
        self.soft_term = np.zeros(0)


def _ratios(ratio: np.ndarray, where: np.ndarray | None, d: np.ndarray, allowed: np.ndarray,
            slack: np.ndarray) -> np.ndarray:
    """|d| / (allowed + slack) at `where` (None: everywhere), `ratio` elsewhere."""
    if where is None:
        return np.abs(d) / (allowed + slack)
    out = ratio.copy()
    out[where] = np.abs(d[where]) / (allowed[where] + slack[where])
    return out


def median(x: np.ndarray) -> float:
    """np.median of a finite array, the same bits: its middle order statistics are found in a
    window around a strided sample's median, a few passes and a small partition (about half
    the time at C = 32,000, where a failing row's refit spent most of its time); the whole
    array is partitioned only when the window misses them."""
    n = x.size
    if n < 4 * MEDIAN_SAMPLE:
        return float(np.median(x))
    k_lo, k_hi = (n - 1) // 2, n // 2
    s = np.sort(x[::n // MEDIAN_SAMPLE])
    mid, half = s.size // 2, MEDIAN_WINDOW
    lo, hi = s[max(0, mid - half)], s[min(s.size - 1, mid + half)]
    below = int(np.count_nonzero(x < lo))
    inside = x[(x >= lo) & (x <= hi)]
    if not below <= k_lo <= k_hi < below + inside.size:
        return float(np.median(x))
    part = np.partition(inside, [k_lo - below, k_hi - below])
    a, b = part[k_lo - below], part[k_hi - below]
    return float(a if k_lo == k_hi else (a + b) / 2.0)  # numpy: the mean of the two


def _interval_fit(d: np.ndarray, term: np.ndarray, bound: np.ndarray) -> tuple[float, float] | None:
    """The factor f with |d - f term| <= bound at every entry: the middle of the intersection of
    the entries' intervals and its half-width (how far the row's true factor can be from it), or
    None when they do not intersect (no single factor explains the entries)."""
    centre, radius = d / term, bound / np.abs(term)
    lo, hi = float(np.max(centre - radius)), float(np.min(centre + radius))
    return ((lo + hi) / 2.0, (hi - lo) / 2.0) if lo <= hi else None
