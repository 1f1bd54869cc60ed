"""Renderers for `ce-check stress`: a `StressReport` to Rich tables or to a JSON object, and
`StressOutput`, the report as an `Output` for `ce_cli.report.emit`.

Formatting only: the verdicts come from `ce_cli.stress.judge`, the breaking points from
`ce_cli.stress.grid`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ce_cli.enums import Kind
from ce_cli.report.format import FAIL, PASS, json_safe
from ce_cli.stress.dtypes import thresholds
from ce_cli.stress.grid import BreakingPoint, StressReport
from ce_cli.stress.judge import Cell

DETAIL_LIMIT = 20      # failing cells listed in full (table output; --json has all)
DETAIL_TAIL_LINES = 6  # stderr lines shown per failing cell (table output; --json has 20)


def fmt_scale(scale: float | None) -> str:
    """A scale as a mark: 30, 100, 1e3, 1e4 ('-' for none)."""
    if scale is None:
        return "-"
    if scale >= 1000:
        exp = int(math.floor(math.log10(scale)))
        mant = scale / 10**exp
        return f"{mant:g}e{exp}"
    return f"{scale:g}"


def _ratio(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.2g}" if math.isfinite(r) else "inf"


# a failing cell's reason in at most 5 characters (g: gradient, L: loss); --verbose spells it out
SHORT_REASON = {"nan grad": "g:nan", "inf grad": "g:inf", "grad error": "g:err", "nan loss": "L:nan",
                "inf loss": "L:inf", "loss error": "L:err", "crash": "crash", "timeout": "hung",
                "bad output": "bad", "error": "err"}
LEGEND = ("cells: a mark per scale ({scales}), then the worst error / tolerance, or why the first "
          "failing scale failed (g: gradient, L: loss, err: over tolerance, hung: timeout); "
          "--verbose spells it out")
VERBOSE_LEGEND = ("cells: one mark per scale ({scales}), then the worst error as a fraction of the "
                  "tolerance, or the first failing scale and why")


def short_ratio(r: float) -> str:
    """A pass cell's worst error over its tolerance in at most 5 characters: 0.21, 5e-3, 0."""
    if r == 0:
        return "0"
    if not math.isfinite(r):
        return "inf"
    if 0.01 <= r < 10:
        return f"{r:.2f}"
    return f"{r:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def render_stress(report: StressReport, console: Console, verbose: bool = False) -> None:
    """Summary line, the grid, breaking points with the analytic thresholds, failing cells, verdict.
    The grid's cells are a mark per scale and a short number or reason; verbose spells the reason
    out (and the range of the first failure)."""
    n = len(report.cells)
    what = ("built-in implementations" if report.mode == "builtin"
            else f"implementation {report.impls[0]}")
    console.print(Text(
        f"ce-check stress: {report.kind}, reduction {report.reduction}, {what}; "
        f"{len(report.scenarios)} scenarios x {len(report.scales)} scales x "
        f"{len(report.dtypes)} dtypes = {n} cells in {report.seconds:.1f} s"))
    for note in report.notes:
        console.print(Text(f"note: {note}"))
    legend = VERBOSE_LEGEND if verbose else LEGEND
    console.print(Text("\n" + legend.format(scales=" ".join(fmt_scale(s) for s in report.scales))))
    console.print(grid_table(report, verbose=verbose))
    console.print(Text("\nbreaking points: (largest scale where every scenario passed, first failing "
                       "scale]: the scenarios failing there; then where the textbook forms break "
                       "analytically"))
    console.print(breaking_table(report, verbose=verbose))
    if report.mode != "builtin":
        render_failures(report, console)
    if report.saved:
        console.print(Text(f"reproducers: {len(report.saved)} folders, e.g. {report.saved[0]}"))
    if report.mode == "builtin":
        console.print(Text("verdict: a report (exit 0)"))
    else:
        bad = len(report.failures)
        verdict = (Text("PASS", style="bold green") if report.ok else Text("FAIL", style="bold red"))
        detail = f": all {n} cells passed" if report.ok else f": {bad} of {n} cells failed"
        console.print(Text("verdict: ").append(verdict).append(detail))


def _threshold_rows(report: StressReport) -> list[tuple[str, list[str]]]:
    ts = [thresholds(d) for d in report.dtypes]
    if report.kind == Kind.binary.value:
        return [("ln(2/eps): s(x) rounds to 1", [f"{t.sigmoid_saturation:.2f}" for t in ts]),
                ("ln(max): exp(-x) overflows", [f"{t.exp_overflow:.2f}" for t in ts])]
    return [("ln(max): exp(z) = inf", [f"{t.exp_overflow:.2f}" for t in ts]),
            ("-ln(tiny): p = 0 past gap", [f"{t.softmax_underflow:.2f}" for t in ts])]


def _row_summary(cells: list[Cell], scales: Sequence[float], verbose: bool = False) -> Text:
    by_scale = {c.scale: c for c in cells}
    text = Text()
    for s in scales:
        c = by_scale.get(s)
        if c is None:
            text.append("-", style="dim")
        elif c.ok:
            text.append(PASS, style="green")
        else:
            text.append(FAIL, style="bold red")
    failing = [c for c in cells if not c.ok]
    if failing:
        first = min(failing, key=lambda c: c.scale)
        text.append(f" {fmt_scale(first.scale)}: {first.reason}" if verbose
                    else f" {SHORT_REASON.get(first.reason, first.reason[:5])}")
    elif cells:
        worst = max((c.worst_ratio or 0.0) for c in cells)
        if verbose:
            text.append(f" <={_ratio(worst)}" if worst else " exact", style="dim")
        else:
            text.append(f" {short_ratio(worst)}", style="dim")
    return text


def grid_table(report: StressReport, verbose: bool = False) -> Table:
    """A row per (implementation, scenario), a column per dtype: a mark per scale. Compact: each
    implementation a heading row over its scenarios (no impl column; none at all for one)."""
    table = Table(show_edge=False, pad_edge=False)
    if verbose:
        table.add_column("impl", overflow="fold")   # a narrow column wraps a name, never cuts it
    table.add_column("scenario", no_wrap=not verbose, overflow="fold")
    for dtype in report.dtypes:
        table.add_column(dtype, overflow="fold")
    index: dict[tuple, list[Cell]] = {}
    for c in report.cells:
        index.setdefault((c.impl, c.scenario, c.dtype), []).append(c)
    headings = not verbose and len(report.impls) > 1
    for impl in report.impls:
        if headings:
            table.add_row(Text(impl, style="bold"), *[""] * len(report.dtypes))
        for i, sc in enumerate(report.scenarios):
            row: list[str | Text] = [impl if i == 0 else ""] if verbose else []
            row.append(f"  {sc.name}" if headings else sc.name)
            row += [_row_summary(index.get((impl, sc.name, d), []), report.scales, verbose)
                    for d in report.dtypes]
            table.add_row(*row, end_section=i == len(report.scenarios) - 1)
    return table


def _interval(last_ok: float | None, first_fail: float, sep: str = ", ") -> str:
    """(last passing, first failing]; compact output joins them without a space, so a narrow
    column never wraps inside the interval."""
    return f"({fmt_scale(last_ok)}{sep}{fmt_scale(first_fail)}]" if last_ok is not None \
        else f"<={fmt_scale(first_fail)}"


def _breaking_text(bp: BreakingPoint, report: StressReport, verbose: bool = False) -> Text:
    if bp.first_fail is None:
        return Text(f"holds to {fmt_scale(bp.last_ok)}", style="green")
    n_scenarios = len(report.scenarios)
    names = list(bp.scenarios)
    if len(names) == n_scenarios and n_scenarios > 1:
        shown = "all scenarios"
    else:
        shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
    sep = ", " if verbose else ","
    text = Text(f"{_interval(bp.last_ok, bp.first_fail, sep)}: {shown}")
    # the first scenario (spread) is the plain scale probe: show its own breaking point too
    probe = report.scenarios[0].name
    own = bp.per_scenario.get(probe)
    if own is not None and probe not in names:
        below = [s for s in report.scales if s < own]
        text.append(f"\n{probe}: {_interval(below[-1] if below else None, own, sep)}")
    return text


def breaking_table(report: StressReport, verbose: bool = False) -> Table:
    """Each implementation's breaking point per dtype, then the analytic thresholds."""
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("impl", overflow="fold")
    for dtype in report.dtypes:
        table.add_column(dtype, overflow="fold")
    bps = {(bp.impl, bp.dtype): bp for bp in report.breaking_points()}
    for i, impl in enumerate(report.impls):
        table.add_row(impl, *[_breaking_text(bps[(impl, d)], report, verbose) if (impl, d) in bps else Text("-")
                              for d in report.dtypes], end_section=i == len(report.impls) - 1)
    for label, values in _threshold_rows(report):
        table.add_row(Text(label, style="dim"), *[Text(v, style="dim") for v in values])
    return table


def render_failures(report: StressReport, console: Console) -> None:
    """Failing cells, grouped when the scenario, the error and the output are the same."""
    failures = report.failures
    if not failures:
        return
    groups: dict[tuple, list[Cell]] = {}
    for c in failures:
        groups.setdefault((c.scenario, c.error or c.reason, c.stderr_tail), []).append(c)
    console.print(Text(f"failing cells ({len(failures)} of {len(report.cells)}):"))
    for shown, ((scenario, error, tail_text), cells) in enumerate(groups.items()):
        if shown == DETAIL_LIMIT:
            rest = sum(len(g) for g in list(groups.values())[DETAIL_LIMIT:])
            console.print(Text(f"  ... and {rest} more cells (--json lists every cell)"))
            break
        line = Text(f"  {FAIL} {scenario} {_where(cells, report.dtypes)}: ", style="bold")
        line.append(error, style="")
        console.print(line)
        for tl in tail_text.splitlines()[-DETAIL_TAIL_LINES:]:
            console.print(Text(f"      | {tl}"))


def _where(cells: list[Cell], dtypes: Sequence[str]) -> str:
    """'scale 30 f16', or 'f16 at 1, 10; f32 at 1 (3 cells)' for a group."""
    if len(cells) == 1:
        return f"scale {fmt_scale(cells[0].scale)} {cells[0].dtype}"
    parts = []
    for d in dtypes:
        scales = [fmt_scale(c.scale) for c in cells if c.dtype == d]
        if scales:
            parts.append(f"{d} at {', '.join(scales)}")
    return f"{'; '.join(parts)} ({len(cells)} cells)"


# ---------------------------------------------------------------------------------------------


def consistent_rel(abs_err: float | None, rel_err: float | None) -> float | None:
    """No relative error next to an absolute error that is missing or not finite (NaN output):
    JSON never shows `"grad_max_rel": 1` beside `"grad_max_abs": null`."""
    if abs_err is None or not math.isfinite(abs_err):
        return None
    return rel_err


def cell_to_dict(c: Cell) -> dict:
    """One cell for --json (its stderr tail up to 20 lines)."""
    return {
        "impl": c.impl, "scenario": c.scenario, "scale": c.scale, "dtype": c.dtype, "ok": c.ok,
        "errors": {"grad_max_abs": c.max_abs_err,
                   "grad_max_rel": consistent_rel(c.max_abs_err, c.max_rel_err),
                   "loss_abs": c.loss_err, "worst_over_allowed": c.worst_ratio},
        "reason": c.reason, "error": c.error,
        "where": list(c.where) if c.where is not None else None,
        "stderr_tail": c.stderr_tail, "seconds": round(c.seconds, 6),
    }


def stress_to_dict(report: StressReport) -> dict:
    """The report for --json: axes, thresholds, every cell, breaking points (non-finite -> null)."""
    data = {
        "ok": report.ok,
        "kind": report.kind,
        "mode": report.mode,
        "impls": list(report.impls),
        "reduction": report.reduction,
        "dtypes": list(report.dtypes),
        "scales": list(report.scales),
        "scenarios": [{"name": s.name, "description": s.description} for s in report.scenarios],
        "thresholds": {d: {"eps": t.eps, "exp_overflow": t.exp_overflow,
                           "softmax_underflow_gap": t.softmax_underflow,
                           "sigmoid_saturation": t.sigmoid_saturation}
                       for d in report.dtypes for t in [thresholds(d)]},
        "cells": [cell_to_dict(c) for c in report.cells],
        "breaking_points": [
            {"impl": bp.impl, "dtype": bp.dtype, "first_failing_scale": bp.first_fail,
             "last_passing_scale": bp.last_ok, "scenarios": list(bp.scenarios),
             "per_scenario": bp.per_scenario}
            for bp in report.breaking_points()],
        "failures": len(report.failures),
        "notes": list(report.notes),
        "saved": list(report.saved),
        "seconds": round(report.seconds, 3),
    }
    return json_safe(data)


class StressOutput:
    """A `StressReport` as an `Output` for `emit`. Notes are part of the report (printed in
    the text and listed in the JSON), not warnings on stderr."""

    warnings: tuple[str, ...] = ()

    def __init__(self, report: StressReport, verbose: bool = False) -> None:
        self.report = report
        self.verbose = verbose

    def to_dict(self) -> dict:
        return stress_to_dict(self.report)

    def render(self, console: Console) -> None:
        render_stress(self.report, console, verbose=self.verbose)
