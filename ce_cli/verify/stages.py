"""The stages of one check: each sees every row chunk once (`update`) and then gives its results
(`finish`). The pipeline (pipeline.py) picks the stages for the inputs and the finite-difference
mode, streams the chunks through them and assembles the report.

Every result carries a rank, the order of the report's checks: proofs of the reference (0),
your gradient (1), your loss (2), finite differences against your gradient (3), sampled
finite differences (4), extra checks such as the two-class bridge (5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.output import AtomicFile, install_sigterm_cleanup, npy_header
from ce_cli.kernels.base import ChunkEval
from ce_cli.kernels.numerics import loss_sum
from ce_cli.verify.compare import Comparison
from ce_cli.verify.finite_diff import (directional_chunk, fd_entries, fd_full, localize,
                                       sample_entries)
from ce_cli.verify.results import CheckResult
from ce_cli.verify.tolerance import Tolerance, resolve_tolerance

FD_SAFETY = 2.0  # the finite-difference bound is rigorous; 2x covers the bound's own rounding
Ranked = list[tuple[int, CheckResult]]


@dataclass
class Chunk:
    """Rows [start, stop) as the stages see them: the reference values, and the allowed error of
    your gradient entry by entry (when it was compared in numpy)."""

    start: int
    stop: int
    ev: ChunkEval
    user_tol: np.ndarray | None = None


@dataclass(frozen=True)
class UserGrad:
    """Your gradient as (N, C) rows and the tolerance it is held to."""

    rows: Any
    tol: Tolerance


class Stage:
    """One concern of the streaming pass. `needs_reference`: it reads the (R, C) reference
    gradient of each chunk (the compiled kernel can then not fuse the comparison)."""

    needs_reference = False

    def update(self, chunk: Chunk) -> None:
        """Fold in one chunk."""

    def finish(self) -> Ranked:
        """The stage's checks, ranked."""
        return []

    def abort(self) -> None:
        """The run stopped early: undo side effects."""


def _comparison(name: str, tol: Tolerance, index_of, worst: int, *, user: bool, fd: bool = False,
                note: str = "", extra_atol: float = 0.0) -> Comparison:
    expected = "finite diff" if fd else "reference"
    got = "yours" if user else "reference"
    return Comparison(name, tol, index_of, expected_label=expected, got_label=got, n_worst=worst,
                      note=note, extra_atol=extra_atol)


class GradStage(Stage):
    """Your gradient against the reference, entry by entry (`grad_vs_reference`)."""

    def __init__(self, problem, user: UserGrad, worst: int) -> None:
        self.problem, self.user = problem, user
        self.cmp = _comparison("grad_vs_reference", user.tol, problem.layout.original_index, worst,
                               user=True)

    def finish(self) -> Ranked:
        return [(1, self.cmp.result())]


class LossTotal(Stage):
    """Row losses, summed (exactly up to 2**20 rows) into the reduced reference loss."""

    def __init__(self, n_rows: int) -> None:
        self.row_loss = np.empty(n_rows)

    def update(self, chunk: Chunk) -> None:
        self.row_loss[chunk.start:chunk.stop] = chunk.ev.loss

    def total(self) -> float:
        return loss_sum(self.row_loss)


class LossStage(Stage):
    """Your loss against the reference: per sample for 'none', else the reduced scalar."""

    def __init__(self, problem, loss: np.ndarray, tol: Tolerance, loss_atol: float, worst: int,
                 total: LossTotal) -> None:
        self.problem, self.loss, self.tol, self.loss_atol = problem, loss, tol, loss_atol
        self.worst, self.total = worst, total
        shape = (problem.n_rows,) + problem.per_sample_cols
        self.per_sample, self.floor = np.empty(shape), np.empty(shape)

    def update(self, chunk: Chunk) -> None:
        self.per_sample[chunk.start:chunk.stop] = self.problem.per_sample(chunk.ev)
        self.floor[chunk.start:chunk.stop] = self.problem.loss_floor(chunk.ev, self.tol.floor_coef)

    def finish(self) -> Ranked:
        problem = self.problem
        if problem.reduction == "none":
            cmp = _comparison("loss_vs_reference", self.tol, problem.per_sample_index, self.worst,
                              user=True, extra_atol=self.loss_atol)
            cmp.update(0, self.per_sample, self.loss, self.floor)
            return [(2, cmp.result())]
        total = problem.reduce(self.total.total())
        n = max(1, problem.n_rows)
        # a reduction in the user's precision adds about log2(N) roundings of the total
        floor = (float(np.sum(self.floor)) * problem.grad_scale
                 + self.tol.floor_coef * math.log2(n + 1) * abs(total))
        cmp = _comparison("loss_vs_reference", self.tol, lambda r, c: (), 1, user=True,
                          extra_atol=self.loss_atol)
        got = np.asarray(self.loss, dtype=np.float64).reshape(1)
        cmp.update(0, np.array([total]), got, np.array([floor]) if np.isfinite(floor) else None)
        return [(2, cmp.result())]


class OutGradStage(Stage):
    """Writes the float64 reference gradient to a .npy file through `ce_cli.io.output` (an
    unpredictable temporary file written with `write()`, renamed into place at the end, so an
    input error, Ctrl-C or SIGTERM leaves no half-written file and no planted name is followed)."""

    needs_reference = True

    def __init__(self, path: str | Path, shape: tuple[int, ...], layout) -> None:
        header = npy_header(tuple(shape))
        self.out = AtomicFile(path, "out_grad", len(header) + 8 * math.prod(shape))
        install_sigterm_cleanup()
        self.layout, self.offset = layout, len(header)
        self.rows = None
        if layout.class_axis != len(shape) - 1:  # written in the original axis order at the end
            self.rows = np.empty((layout.n_rows, layout.n_classes))
        self.out.write(header)

    def update(self, chunk: Chunk) -> None:
        if self.rows is not None:
            self.rows[chunk.start:chunk.stop] = chunk.ev.grad
            return
        data = np.ascontiguousarray(chunk.ev.grad, dtype=np.float64)
        self.out.pwrite(data.data, self.offset + 8 * chunk.start * self.layout.n_classes)

    def finish(self) -> Ranked:
        if self.rows is not None:
            self.out.write(np.ascontiguousarray(self.layout.from_rows(self.rows)).data)
        self.out.commit()
        return []

    def abort(self) -> None:
        self.out.discard()


def _settle_skipped(fdv: np.ndarray, bound: np.ndarray, ref: np.ndarray):
    """Entries finite differences cannot probe (NaN), or whose reference is NaN (0/0 means),
    compare as equal to the reference."""
    skip = np.isnan(fdv) | np.isnan(ref)
    if skip.any():
        fdv = np.where(skip, ref, fdv)
        bound = np.where(skip, 0.0, bound)
    return fdv, bound


class FullFDStage(Stage):
    """Every entry by central differences (2*C evaluations per chunk): the reference and your
    gradient against them."""

    needs_reference = True

    def __init__(self, problem, user: UserGrad | None, worst: int) -> None:
        self.problem, self.user = problem, user
        index = problem.layout.original_index
        self.ref = _comparison("fd_vs_reference", resolve_tolerance(np.float64), index, worst,
                               user=False, fd=True)
        self.mine = (_comparison("fd_vs_grad", user.tol, index, worst, user=True, fd=True)
                     if user is not None else None)
        self.skipped = self.evaluations = 0

    def update(self, chunk: Chunk) -> None:
        start, stop, ev = chunk.start, chunk.stop, chunk.ev
        fdv, bound, skipped = fd_full(self.problem, start, stop)
        self.skipped += skipped
        self.evaluations += 2 * (stop - start) * self.problem.n_classes
        fdv, bound = _settle_skipped(fdv, bound, ev.grad)
        self.ref.update(start, fdv, ev.grad, FD_SAFETY * bound)
        if self.mine is not None:
            self.mine.update(start, fdv, self.user.rows[start:stop], FD_SAFETY * bound + ev.floor)

    def finish(self) -> Ranked:
        out = [(0, self.ref.result())]
        if self.mine is not None:
            out.append((3, self.mine.result()))
        return out


class DirectionalStage(Stage):
    """One random direction per row (2 evaluations per row); a failing row of yours is then
    bisected over column blocks to the bad entry."""

    needs_reference = True
    NOTE = "one random direction per row"

    def __init__(self, problem, user: UserGrad | None, worst: int, seed: int) -> None:
        self.problem, self.user, self.seed = problem, user, seed
        self.rng = np.random.default_rng(seed)

        def row_index(r, _c):
            return problem.layout.batch_index(r)

        ref64 = resolve_tolerance(np.float64)
        self.ref = _comparison("fd_rows_vs_reference", ref64, row_index, worst, user=False,
                               fd=True, note=self.NOTE)
        self.mine = (_comparison("fd_rows_vs_grad", user.tol, row_index, worst, user=True,
                                 fd=True, note=self.NOTE) if user is not None else None)
        self.evaluations = 0

    def update(self, chunk: Chunk) -> None:
        start, stop = chunk.start, chunk.stop
        got = None if self.user is None else self.user.rows[start:stop]
        dc = directional_chunk(self.problem, start, stop, chunk.ev.grad, self.rng, got,
                               chunk.user_tol)
        self.evaluations += 2 * (stop - start)
        self.ref.update(start, dc.fd, dc.ref, FD_SAFETY * dc.bound)
        if self.mine is not None:
            self.mine.update(start, dc.fd, dc.got, FD_SAFETY * dc.bound + dc.got_bound)

    def finish(self) -> Ranked:
        out = [(0, self.ref.result())]
        if self.mine is not None:
            out.append((3, self._localize(self.mine.result(), self.mine.positions())))
        return out

    def _localize(self, result: CheckResult, positions, max_rows: int = 3) -> CheckResult:
        """Bisection over column blocks in the worst failing rows; the finds go into the note."""
        if result.ok:
            return result
        problem, tol = self.problem, self.user.tol
        found = []
        failing = [r for (r, _c), e in zip(positions, result.worst) if not e.ok][:max_rows]
        for row in failing:
            ev = problem.evaluate_rows(np.asarray(problem.z[row:row + 1]), np.array([row]),
                                       floor_coef=tol.floor_coef)
            got = np.asarray(self.user.rows[row], dtype=np.float64)
            allowed = np.abs(ev.grad[0]) * tol.rtol + tol.atol + tol.tiny + ev.floor[0]
            col, n = localize(problem, row, got, allowed, self.seed + row)
            self.evaluations += n
            where = problem.layout.original_index(row, col) if col is not None else "not isolated"
            found.append(f"row {problem.layout.batch_index(row)} -> entry {where}")
        note = "; ".join([result.note, "bisection: " + ", ".join(found)]) if found else result.note
        return replace(result, note=note)


class SampledFDStage(Stage):
    """K entries by central differences after the pass: each sampled row's target entry, a
    random entry, and the worst entries of your gradient's comparison."""

    def __init__(self, problem, user: UserGrad | None, worst: int, samples: int, seed: int,
                 grad_stage: GradStage | None) -> None:
        self.problem, self.user, self.worst = problem, user, worst
        self.samples, self.seed, self.grad_stage = samples, seed, grad_stage
        self.skipped = self.evaluations = 0

    def finish(self) -> Ranked:
        problem, user = self.problem, self.user
        extra = self.grad_stage.cmp.positions() if self.grad_stage is not None else []
        rows, cols = sample_entries(problem, self.samples, self.seed, extra)
        res = fd_entries(problem, rows, cols, user.tol.floor_coef if user is not None else None)
        self.skipped, self.evaluations = res.skipped, res.evaluations
        fdv, bound = _settle_skipped(res.fd, res.bound, res.reference)
        layout = problem.layout

        def index_of(i, _c):
            return layout.original_index(int(rows[i]), int(cols[i]))

        note = f"{rows.size} sampled entries"
        cmp = _comparison("fd_vs_reference", resolve_tolerance(np.float64), index_of, self.worst,
                          user=False, fd=True, note=note)
        cmp.update(0, fdv, res.reference, FD_SAFETY * bound)
        out = [(4, cmp.result())]
        if user is not None:
            cmp = _comparison("fd_vs_grad", user.tol, index_of, self.worst, user=True, fd=True,
                              note=note)
            cmp.update(0, fdv, np.asarray(user.rows[rows, cols]), FD_SAFETY * bound + res.floor)
            out.append((4, cmp.result()))
        return out


class ProgressStage(Stage):
    """Calls `progress(done_rows, total_rows)` after every chunk."""

    def __init__(self, progress: Callable[[int, int], None], n_rows: int) -> None:
        self.progress, self.n_rows = progress, n_rows

    def update(self, chunk: Chunk) -> None:
        self.progress(chunk.stop, self.n_rows)
