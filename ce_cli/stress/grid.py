"""The grid: implementation x scenario x logit scale x dtype, every cell judged; the report and
each implementation's breaking point (its smallest failing scale in a dtype)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ce_cli.stress.builtins import BUILTINS, LossGrad
from ce_cli.stress.dtypes import MAX_FINITE, parse_dtypes
from ce_cli.stress.judge import Case, Cell, Outcome, judge, make_case
from ce_cli.stress.scenarios import DEFAULT_SCALES, SCENARIOS, Scenario

Runner = Callable[[Case], Outcome]


@dataclass(frozen=True)
class BreakingPoint:
    """The smallest failing scale of an implementation in a dtype, over every scenario."""

    impl: str
    dtype: str
    first_fail: float | None         # None: holds on the whole grid
    last_ok: float | None            # largest scale below first_fail where every cell passed
    scenarios: tuple[str, ...]       # scenarios failing at first_fail
    per_scenario: dict = field(default_factory=dict)   # scenario -> its first failing scale


def breaking_point(impl: str, dtype: str, cells: Sequence[Cell],
                   scenarios: Sequence[Scenario]) -> BreakingPoint:
    """first_fail = min failing scale; last_ok = the largest scale run below it (all passed)."""
    per: dict[str, float | None] = {}
    for sc in scenarios:
        f = sorted(c.scale for c in cells if c.scenario == sc.name and not c.ok)
        per[sc.name] = f[0] if f else None
    failing = sorted({c.scale for c in cells if not c.ok})
    if not failing:
        return BreakingPoint(impl, dtype, None, max((c.scale for c in cells), default=None), (), per)
    first = failing[0]
    below = sorted({c.scale for c in cells if c.scale < first})
    names = tuple(sc.name for sc in scenarios if per[sc.name] == first)
    return BreakingPoint(impl, dtype, first, below[-1] if below else None, names, per)


@dataclass(frozen=True)
class StressReport:
    """Everything one stress run established: the grid's axes, its judged cells, notes."""

    kind: str
    mode: str                      # builtin | impl | impl-cmd
    impls: tuple[str, ...]
    reduction: str
    dtypes: tuple[str, ...]
    scales: tuple[float, ...]
    scenarios: tuple[Scenario, ...]
    cells: tuple[Cell, ...]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    saved: tuple[str, ...] = ()    # reproducer folders written by --save-failures

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cells)

    @property
    def failures(self) -> tuple[Cell, ...]:
        return tuple(c for c in self.cells if not c.ok)

    def breaking_points(self) -> list[BreakingPoint]:
        """One per (implementation, dtype), implementation-major."""
        return [breaking_point(impl, dtype,
                               [c for c in self.cells if c.impl == impl and c.dtype == dtype],
                               self.scenarios)
                for impl in self.impls for dtype in self.dtypes]


def grid(kind: str, scenarios: Sequence[Scenario], scales: Sequence[float], dtypes: Sequence[str],
         seed: int = 0) -> tuple[list[Case], list[str]]:
    """Every representable case, scenario-major, and notes on the skipped ones."""
    cases, notes = [], []
    for sc in scenarios:
        for dtype in dtypes:
            for scale in scales:
                case = make_case(kind, sc, scale, dtype, seed)
                if case is None:
                    notes.append(f"{sc.name} at scale {scale:g} skipped for {dtype}: past its largest "
                                 f"value {MAX_FINITE[dtype]:.5g}")
                    continue
                cases.append(case)
    return cases, notes


def run_builtin(fn: Callable[..., LossGrad], reduction: str) -> Runner:
    """A runner calling a built-in implementation in-process with the reduction."""
    def run(case: Case) -> Outcome:
        loss, grad = fn(case.logits, case.labels, reduction=reduction)
        return Outcome(loss=loss, grad=grad)

    return run


def run_cells(kind: str, impls: Iterable[tuple[str, Runner]], cases: Sequence[Case], reduction: str,
              on_cell: Callable[[Cell, Case, Outcome], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[Cell]:
    """Run and judge every (implementation, case), implementation-major, timing each run."""
    impls = list(impls)
    total, done = len(impls) * len(cases), 0
    cells = []
    for name, runner in impls:
        for case in cases:
            t0 = time.perf_counter()
            outcome = runner(case)
            cell = judge(kind, case, outcome, name, reduction, time.perf_counter() - t0)
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell, case, outcome)
            done += 1
            if progress is not None:
                progress(done, total)
    return cells


def builtin_sweep(kind: str = "multiclass", *, dtypes: Sequence[str] | None = None,
                  scales: Sequence[float] = DEFAULT_SCALES, scenarios: Sequence[Scenario] | None = None,
                  reduction: str = "mean", seed: int = 0) -> StressReport:
    """The built-in sweep as a library call (what `ce-check stress` prints)."""
    notes: list[str] = []
    if dtypes is None:
        dtypes, notes = parse_dtypes(None)
    scenarios = tuple(scenarios or SCENARIOS[kind])
    t0 = time.perf_counter()
    cases, skipped = grid(kind, scenarios, scales, dtypes, seed)
    impls = [(b.name, run_builtin(b.fn, reduction)) for b in BUILTINS[kind]]
    cells = run_cells(kind, impls, cases, reduction)
    return StressReport(kind, "builtin", tuple(b.name for b in BUILTINS[kind]), reduction,
                        tuple(dtypes), tuple(scales), scenarios, tuple(cells),
                        tuple(notes + skipped), time.perf_counter() - t0)
