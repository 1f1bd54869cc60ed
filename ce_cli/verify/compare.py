"""Streaming entry-by-entry comparison with a running worst-k.

An entry passes when |got - ref| <= atol + rtol * |ref| + floor (+ the storage dtype's smallest
subnormal). NaN or inf in `got` always fails. Chunks arrive as (R, C) blocks; only O(k) state is
kept between them, so a 0.5 GB gradient is compared in the memory of one chunk.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ce_cli.verify.allowance import RowAllowance
from ce_cli.verify.results import CheckResult, Entry
from ce_cli.verify.tolerance import Tolerance


# entries of the failing rows reopened at once for the row allowances: one kernel call (on the
# check's threads) for up to 64 rows of 32,000, three float64 arrays of 16 MB
OPEN_ENTRIES = 1 << 21


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(eq=False)
class Measured:
    """One chunk compared entry by entry (`Comparison.measure`), not yet folded in: |error|,
    allowed error, their ratio, and per row the largest ratio and relative error."""

    ref: np.ndarray
    got: Any
    diff: np.ndarray | None
    tol: np.ndarray
    ratio: np.ndarray | None
    rowmax: np.ndarray | None
    rel_rows: np.ndarray | None
    nonfinite: int
    row_abs: np.ndarray | None = None  # largest |error| of each row
    kept: np.ndarray | None = None     # the rows whose entries are kept (None: every row)
    overflowed: int = 0                # +-inf of yours where the reference rounds to it
    inf_in_range: int = 0              # +-inf of yours where the reference is finite in range
    flushed: int = 0                   # entries the flush rule let pass (RowAllowance.flush)

    def compact(self, open_above: float) -> Measured:
        """The entries of only the rows a fold may open: a row maximum over 1 (counted, refined
        by the row allowances) or over `open_above` (`Comparison.open_above` read earlier: the
        k-th worst ratio only grows, so rows at or below it never hold a worst entry)."""
        if self.rowmax is None or self.ratio is None or self.diff is None:
            return self
        keep = np.flatnonzero((self.rowmax > 1.0) | (self.rowmax > open_above))
        if keep.size == self.rowmax.size:
            return self
        return Measured(self.ref[keep], self.got[keep], self.diff[keep], self.tol[keep],
                        self.ratio[keep], self.rowmax, self.rel_rows, self.nonfinite,
                        self.row_abs, keep, self.overflowed, self.inf_in_range, self.flushed)

    def at(self, rows: Any) -> Any:
        """Where rows `rows` of the chunk are in the kept arrays."""
        return rows if self.kept is None else np.searchsorted(self.kept, rows)


class Comparison:
    """Accumulates one check over chunks; `result()` freezes it into a `CheckResult`."""

    def __init__(
        self,
        name: str,
        tol: Tolerance,
        index_of: Callable[[int, int], tuple[int, ...]],
        *,
        expected_label: str = "reference",
        got_label: str = "yours",
        n_worst: int = 5,
        extra_atol: float = 0.0,
        note: str = "",
        allowance: RowAllowance | None = None,
        beyond_range: bool = False,
    ) -> None:
        self.name = name
        self.tol = tol
        self.index_of = index_of
        self.expected_label = expected_label
        self.got_label = got_label
        self.n_worst = max(0, int(n_worst))
        self.extra_atol = extra_atol
        self.note = note
        self.allowance = allowance
        # flush-to-zero, applied with the entry-wise rule (None: strict, or no allowances)
        self.flush = allowance.flush_args() if allowance is not None else None
        # losses (sums of many terms) may lie beyond your precision's range: its +-inf then
        # matches, and an inf within the range is named as an overflow on the way
        self.overflow = tol.overflow if beyond_range else float("inf")
        self.total = 0
        self.mismatches = 0
        self.nonfinite = 0
        self.overflowed = 0
        self.inf_in_range = 0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self._worst: list[tuple[float, int, int, float, float, float, float]] = []
        # rows whose largest ratio is at or below this never hold a worst entry (the k-th worst
        # so far; it only grows): read by threads that measure chunks ahead (Measured.compact)
        self.open_above = -1.0 if self.n_worst else float("inf")

    def update(self, row0: int, ref: np.ndarray, got: np.ndarray, floor: np.ndarray | None = None) -> np.ndarray:
        """Compare rows [row0, row0 + R) of `got` (any float dtype) against float64 `ref`.

        Returns the per-entry allowed error (R, C)."""
        tol = self.fold(row0, self.measure(ref, got, floor))
        assert tol is not None  # measured here in full, not compacted
        return tol

    def measure(self, ref: np.ndarray, got: np.ndarray, floor: np.ndarray | None = None) -> Measured:
        """The entry-by-entry part of `update`: reads no state of the comparison, so chunks may
        be measured on several threads at once and folded (`fold`) in row order."""
        if ref.ndim == 1:
            ref, got = ref[:, None], np.asarray(got).reshape(-1, 1)
            floor = None if floor is None else floor[:, None]
        R, C = ref.shape
        if R == 0 or C == 0:
            return Measured(ref, got, None, np.zeros((R, C)), None, None, None, 0)
        with np.errstate(invalid="ignore"):
            diff = _minus(got, ref)
        np.abs(diff, out=diff)
        tol = np.abs(ref)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            quot = np.divide(diff, tol)
            # entries with ref == 0 have no relative error (x/0 is inf, 0/0 NaN: fmax skips NaN)
            rel_rows = _fmax_rows(quot)
            inf_rows = np.isinf(rel_rows)
            for i in np.flatnonzero(inf_rows) if inf_rows.any() else ():
                row = quot[i]
                rel_rows[i] = np.fmax.reduce(np.where(tol[i] == 0, np.nan, row))
            tol *= self.tol.rtol
            tol += self.tol.atol + self.extra_atol + self.tol.tiny
            if floor is not None:
                tol += floor
            ratio = np.divide(diff, tol, out=quot)
        rowmax = ratio.max(axis=1)
        flushed = self._flush(ref, got, diff, ratio, tol, rowmax, rel_rows)
        odd = ~np.isfinite(rowmax)
        nonfinite = overflowed = inf_in_range = 0
        if odd.any():
            for i in np.flatnonzero(odd):
                bad = ~np.isfinite(diff[i])
                g = np.asarray(got[i], dtype=np.float64)
                # the same non-finite value on both sides (NaN reference loss, inf loss) matches,
                # and so does +-inf where the reference is beyond your precision's range
                rounded = bad & np.isinf(g) & (np.abs(ref[i]) >= self.overflow) & (
                    np.sign(g) == np.sign(ref[i]))
                same = bad & ((g == ref[i]) | (np.isnan(g) & np.isnan(ref[i])) | rounded)
                diff[i][same] = 0.0
                ratio[i][same] = 0.0
                bad &= ~same
                nonfinite += int(np.count_nonzero(bad))
                overflowed += int(np.count_nonzero(rounded & np.isfinite(ref[i])))
                if self.overflow < float("inf"):
                    inf_in_range += int(np.count_nonzero(bad & np.isinf(g) & np.isfinite(ref[i])))
                ratio[i][bad] = np.inf
            rowmax = ratio.max(axis=1)
        return Measured(ref, got, diff, tol, ratio, rowmax, rel_rows, nonfinite, _fmax_rows(diff),
                        overflowed=overflowed, inf_in_range=inf_in_range, flushed=flushed)

    def _flush(self, ref: np.ndarray, got: Any, diff: np.ndarray, ratio: np.ndarray,
               tol: np.ndarray, rowmax: np.ndarray, rel_rows: np.ndarray) -> int:
        """The flush rule (`RowAllowance.flush`) on the rows with an entry beyond its allowed
        error, their statistics updated in place; returns the count of entries it let pass."""
        rows = np.flatnonzero(~(rowmax <= 1.0))
        if self.flush is None or not rows.size:
            return 0
        assert self.allowance is not None
        r_ref, d, q = ref[rows], diff[rows], ratio[rows]
        count = self.allowance.flush(r_ref, np.asarray(got)[rows], d, q, tol[rows])
        diff[rows], ratio[rows], rowmax[rows] = d, q, q.max(axis=1)
        rel_rows[rows] = _max_rel(d, r_ref, axis=1)
        return count

    def fold(self, row0: int, m: Measured) -> np.ndarray | None:
        """Fold one measured chunk, rows [row0, row0 + R), into the running statistics (the row
        allowances, which keep counts, apply here); returns the per-entry allowed error (None
        when `m` was compacted)."""
        if m.ratio is None:
            return m.tol
        ref, got, diff, tol, ratio = m.ref, m.got, m.diff, m.tol, m.ratio
        rowmax, rel_rows, row_abs, at = m.rowmax, m.rel_rows, m.row_abs, m.at
        assert diff is not None and rowmax is not None and rel_rows is not None
        assert row_abs is not None
        R, C = rowmax.size, ref.shape[1]
        self.total += R * C
        self.nonfinite += m.nonfinite
        self.overflowed += m.overflowed
        self.inf_in_range += m.inf_in_range
        over = rowmax > 1.0
        if self.allowance is not None:
            self.allowance.flushed += m.flushed
        if self.allowance is not None and self.allowance.may_change() and over.any():
            failing = np.flatnonzero(over).tolist()
            for i, weights in zip(failing, self.allowance.weights([row0 + i for i in failing])):
                p = at(i)
                ratio[p], diff[p], tol[p] = self.allowance.refine(row0 + i, ref[p], got[p],
                                                                  tol[p], ratio[p], weights)
                rowmax[i] = ratio[p].max()
                rel_rows[i] = _max_rel(diff[p], ref[p])
                row_abs[i] = np.fmax.reduce(diff[p])
            over = rowmax > 1.0
        # the largest of the rows' largest: fmax over the whole chunk, without another pass here
        self.max_abs = max(self.max_abs, float(np.fmax.reduce(row_abs)))
        self.max_rel = max(self.max_rel, float(np.fmax.reduce(rel_rows)) if R else 0.0)
        if over.any():
            self.mismatches += int(np.count_nonzero(ratio[at(np.flatnonzero(over))] > 1.0))
        self._collect_worst(row0, rowmax, lambda r: (ratio[at(r)], ref[at(r)], got[at(r)],
                                                     diff[at(r)], tol[at(r)]))
        return tol if m.kept is None else None

    def update_summary(self, row0: int, n_entries: int, rowmax: np.ndarray, mismatches: np.ndarray,
                       nonfinite: np.ndarray, max_abs: np.ndarray, max_rel: np.ndarray,
                       open_rows: Callable[[list[int]], list[tuple]], got: Any,
                       flushed: np.ndarray | None = None) -> None:
        """Fold in per-row statistics computed elsewhere (the fused kernel) on your gradient's
        rows `got`, `flushed` the entries it let pass by the flush rule (`flush`).
        `open_rows(rows)` returns each row's (ratio, ref, got, diff, tol), for rows that may
        hold one of the worst entries or fail."""
        self.total += n_entries
        if flushed is not None:
            assert self.allowance is not None
            self.allowance.flushed += int(flushed.sum())
            open_rows = self._flushing(open_rows)

        def open_row(r: int) -> tuple:
            return open_rows([r])[0]

        if self.allowance is not None and self.allowance.may_change() and (rowmax > 1.0).any():
            rowmax, mismatches, max_abs, max_rel, open_row = self._refine_summary(
                row0, rowmax, mismatches, max_abs, max_rel, open_rows, got)
        if rowmax.size:
            self.mismatches += int(mismatches.sum())
            self.nonfinite += int(nonfinite.sum())
            # fmax: a refitted row of NaN errors has no largest error (NaN), the others do
            self.max_abs = max(self.max_abs, float(np.fmax.reduce(max_abs)))
            self.max_rel = max(self.max_rel, float(np.fmax.reduce(max_rel)))
            self._collect_worst(row0, rowmax, open_row)

    def _flushing(self, open_rows: Callable[[list[int]], list[tuple]]
                  ) -> Callable[[list[int]], list[tuple]]:
        """`open_rows` with the errors of the entries the flush rule let pass set to 0 (their
        ratios are: the kernel applied it)."""
        rule = self.allowance
        assert rule is not None

        def opened(rows: list[int]) -> list[tuple]:
            return [(ratio, ref, g, np.where(rule.flushed_entries(ref, g, tol), 0.0, diff), tol)
                    for ratio, ref, g, diff, tol in open_rows(rows)]
        return opened

    def _refine_summary(self, row0: int, rowmax: np.ndarray, mismatches: np.ndarray,
                        max_abs: np.ndarray, max_rel: np.ndarray,
                        open_rows: Callable[[list[int]], list[tuple]], got: Any):
        """The row allowances on the rows of `got` the kernel found failing (their entries
        reopened, OPEN_ENTRIES at a time). Only the refined entries of the rows
        `_collect_worst` can open are kept: the n_worst largest by (row maximum, lower row
        first), its order (every failing row's would be 3 (C,) arrays a row: 0.8 GB a chunk of
        a 4096 x 32000 gradient wrong everywhere)."""
        assert self.allowance is not None
        rowmax, mismatches = rowmax.copy(), mismatches.copy()
        max_abs, max_rel = max_abs.copy(), max_rel.copy()
        refined: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        kept: list[tuple[float, int]] = []  # a heap of (row maximum, -row) of the rows kept
        failing = np.flatnonzero(rowmax > 1.0).tolist()
        step = max(1, OPEN_ENTRIES // max(1, got.shape[1]))
        for i in range(0, len(failing), step):
            batch = failing[i:i + step]
            weights = self.allowance.weights([row0 + r for r in batch])
            for r, (ratio, ref, yours, _diff, tol), w in zip(batch, open_rows(batch), weights):
                out = self.allowance.refine(row0 + r, ref, yours, tol, ratio, w)
                rowmax[r] = out[0].max()
                mismatches[r] = np.count_nonzero(out[0] > 1.0)
                max_abs[r] = np.fmax.reduce(out[1])
                max_rel[r] = _max_rel(out[1], ref)
                if self.n_worst:
                    refined[r] = out
                    heapq.heappush(kept, (float(rowmax[r]), -r))
                    if len(kept) > self.n_worst:
                        del refined[-heapq.heappop(kept)[1]]

        def reopen(r: int) -> tuple:
            row = open_rows([r])[0]
            if r not in refined:
                return row
            ratio, residual, allowed = refined[r]
            return ratio, row[1], row[2], residual, allowed

        return rowmax, mismatches, max_abs, max_rel, reopen

    def _collect_worst(self, row0, rowmax, open_row) -> None:
        """Keep the k largest ratios: only rows whose maximum beats the current k-th are opened."""
        k = self.n_worst
        if k == 0:
            return
        threshold = self._worst[-1][0] if len(self._worst) >= k else -1.0
        if rowmax.size == 0 or rowmax.max() <= threshold:
            return  # no row beats the k-th worst so far
        rows = np.flatnonzero(rowmax > threshold)
        if rows.size > k:
            rows = rows[np.argsort(-rowmax[rows], kind="stable")[:k]]
        for r in rows.tolist():
            row, ref, got, diff, tol = open_row(r)
            cols = _largest(row, np.flatnonzero(row > threshold), k)
            for j in cols.tolist():
                g = float(np.asarray(got[j], dtype=np.float64))
                self._worst.append((float(row[j]), row0 + r, j, float(ref[j]), g,
                                    float(diff[j]), float(tol[j])))
        self._worst.sort(key=lambda t: (-t[0], t[1], t[2]))
        del self._worst[k:]
        if len(self._worst) >= k:
            self.open_above = self._worst[-1][0]  # one store: a reader sees the old or the new

    def positions(self) -> list[tuple[int, int]]:
        """(row, column) of the worst entries so far, worst first."""
        return [(r, c) for _ratio, r, c, *_ in self._worst]

    def result(self) -> CheckResult:
        worst = tuple(
            Entry(self.index_of(r, c), exp, got, err, allowed)
            for _ratio, r, c, exp, got, err, allowed in self._worst
        )
        max_abs = float("inf") if self.nonfinite else self.max_abs
        ok = self.mismatches == 0 and self.nonfinite == 0
        note = self.note
        if self.allowance is not None and self.allowance.flushed:
            note = (note + "; " if note else "") + self.allowance.flushed_note(self.allowance.flushed)
        if self.overflowed:
            note = (note + "; " if note else "") + (
                f"{self.overflowed:,} entries +-inf where the reference is beyond the "
                f"{self.tol.coarse} range (|x| >= {self.overflow:.6g}): the correctly "
                "rounded value, passed")
        if self.nonfinite:
            note = (note + "; " if note else "") + (
                f"{self.nonfinite} entries NaN/inf on one side only ({self.got_label} or {self.expected_label})")
        if self.inf_in_range:
            note += (f"; {self.inf_in_range:,} of them +-inf where the reference is finite and "
                     f"within the {self.tol.coarse} range: a step before the result "
                     "overflowed (a sum or product in a narrow accumulator?)")
        return CheckResult(
            name=self.name,
            ok=ok,
            expected_label=self.expected_label,
            got_label=self.got_label,
            max_abs_err=max_abs,
            max_rel_err=self.max_rel,
            mismatches=self.mismatches,
            total=self.total,
            worst=worst,
            rule=self.tol.describe() + (f" +{self.extra_atol:.2g}" if self.extra_atol else ""),
            note=note,
        )


def _minus(got: Any, ref: np.ndarray) -> np.ndarray:
    """got - ref in float64: a narrower `got` is widened first (exact) and `ref` subtracted in
    place, twice as fast as numpy's mixed-type subtract (which casts in small buffers)."""
    got = np.asarray(got)
    if got.dtype == np.float64 or got.shape != ref.shape:
        return np.subtract(got, ref, dtype=np.float64)
    diff = np.array(got, dtype=np.float64)
    diff -= ref
    return diff


def _fmax_rows(a: np.ndarray) -> np.ndarray:
    """np.fmax.reduce(a, axis=1) (NaN skipped), by a plain max (twice as fast) and fmax only on
    the rows where the max met a NaN."""
    out = a.max(axis=1)
    nan = np.isnan(out)
    if nan.any():
        out[nan] = np.fmax.reduce(a[nan], axis=1)
    return out


def _max_rel(diff: np.ndarray, ref: np.ndarray, axis: int | None = None) -> Any:
    """Largest |error| / |reference| over the entries whose reference is not 0 (of each row
    with `axis` 1)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.fmax.reduce(np.where(ref == 0, np.nan, diff / np.abs(ref)), axis=axis)


def _largest(values: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """The k indices of `idx` with the largest `values`, largest first, ties in index order: a
    stable argsort of the candidates at or above the k-th largest value (no NaN among them)."""
    if idx.size <= k:
        return idx
    vals = values[idx]
    kth = np.partition(vals, vals.size - k)[vals.size - k]
    idx = idx[vals >= kth]
    return idx[np.argsort(-values[idx], kind="stable")[:k]]
