"""Renderers: a `Report` to Rich tables or to a JSON object. Formatting only, no decisions."""

from __future__ import annotations

import math
from dataclasses import asdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ce_cli.errors import as_flags
from ce_cli.report.format import FAIL, PASS, fmt, fmt_value, json_safe, json_text
from ce_cli.verify.results import CheckResult, Entry, Report

def render_table(report: Report, console: Console) -> None:
    """Inputs, loss, one row per check, each check's worst entries, the likely causes, the verdict."""
    _render_inputs(report, console)
    if report.checks:
        _render_checks(report, console)
    for d in report.diagnosis:
        console.print(Text(f"likely cause ({d.code}): {d.message} [{d.evidence}]"))
    word, _, reason = as_flags(report.verdict or ("PASS" if report.ok else "FAIL")).partition(" ")
    verdict = Text(word, style="bold green" if report.ok else "bold red")
    console.print(Text("verdict: ").append(verdict).append(f" {reason}" if reason else ""))


def _render_inputs(report: Report, console: Console) -> None:
    inputs = Table(title="inputs", title_justify="left", show_edge=False, pad_edge=False)
    for col in ("role", "source", "shape", "dtype"):
        inputs.add_column(col)
    for info in report.inputs:
        inputs.add_row(info.role, Text(info.source), str(info.shape), info.dtype)
    console.print(inputs)
    summary = (
        f"{report.kind}: N={report.n_rows} C={report.n_classes} targets={report.target_kind} "
        f"ignored={report.n_ignored} reduction={report.reduction} "
        f"finite-diff={report.fd_mode} ({report.fd_evaluations} row evaluations)"
    )
    console.print(Text(summary))
    loss_label = "loss (sum of per-sample losses)" if report.reduction == "none" else "loss"
    console.print(Text(f"{loss_label}: {fmt_value(report.loss)}"))


def _render_checks(report: Report, console: Console) -> None:
    table = Table(title="checks", title_justify="left", show_edge=False, pad_edge=False)
    for col, justify in (("check", "left"), ("", "center"), ("max abs err", "right"),
                         ("max rel err", "right"), ("mismatches", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for c in report.checks:
        mark = Text(PASS, style="green") if c.ok else Text(FAIL, style="bold red")
        table.add_row(c.name, mark, fmt(c.max_abs_err), fmt(c.max_rel_err),
                      f"{c.mismatches}/{c.total}")
    console.print(table)
    for c in report.checks:
        console.print(Text(f"  {c.name}: {c.rule}" + (f"; {c.note}" if c.note else "")))
    for c in report.checks:
        if c.worst and (not c.ok or c.name == "grad_vs_reference"):
            console.print(worst_table(c))


def worst_table(check: CheckResult) -> Table:
    title = (f"{check.name}: worst entries, ranked by error / allowed"
             + ("" if check.ok else " (✗ = over tolerance)"))
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for col in ("index", check.expected_label, check.got_label, "abs err", "allowed", ""):
        table.add_column(col, justify="right" if col != "index" else "left")
    for e in check.worst:
        table.add_row(str(e.index), fmt_value(e.expected), fmt_value(e.got), fmt(e.abs_err),
                      fmt(e.allowed), PASS if e.ok else FAIL)
    return table


def report_to_dict(report: Report) -> dict:
    data = asdict(report)
    data["fd"] = {"mode": data.pop("fd_mode"), "evaluations": data.pop("fd_evaluations")}
    for check, result in zip(data["checks"], report.checks):
        for entry, e in zip(check["worst"], result.worst):
            entry["ok"] = e.ok
    return json_safe(data)


def to_json(report: Report) -> str:
    return json_text(report_to_dict(report))


class CheckOutput:
    """A check `Report` as an `Output` for `emit`."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.warnings = report.warnings

    def to_dict(self) -> dict:
        return report_to_dict(self.report)

    def render(self, console: Console) -> None:
        render_table(self.report, console)


def failure_message(report: Report) -> str:
    """Plain text for a failed report: the verdict line (`Report.verdict`), then in torch.testing's
    words, for each failing check, the mismatched elements, the greatest absolute and relative
    differences with their index, and the worst entries (the rows of the CLI's worst-entries
    table). Used by `ce_cli.testing` and the JUnit writer; "" when the report passed."""
    failing = [c for c in report.checks if not c.ok]
    if report.ok or not failing:
        return ""
    lines = [report.verdict or "FAIL",
             f"{report.kind} check failed: {', '.join(c.name for c in failing)} "
             f"(shape {report.shape}, reduction {report.reduction}, "
             f"reference loss {fmt_value(report.loss)})"]
    for c in failing:
        lines += ["", *_failed_check_lines(c), *_worst_lines(c)]
    return "\n".join(lines)


def _index(entry: Entry) -> str:
    return str(tuple(entry.index))


def _failed_check_lines(c: CheckResult) -> list[str]:
    """The check's rule, its mismatch count and where its greatest differences are."""
    share = f" ({c.mismatches / c.total:.1%})" if c.total else ""
    at_abs = next((e for e in c.worst if e.abs_err == c.max_abs_err), None)
    at_rel = next((e for e in c.worst if e.expected != 0
                   and math.isclose(e.abs_err / abs(e.expected), c.max_rel_err, rel_tol=1e-9)), None)
    abs_where = f" at index {_index(at_abs)} (up to {fmt(at_abs.allowed)} allowed)" if at_abs else ""
    rel_where = f" at index {_index(at_rel)}" if at_rel else ""
    lines = [f"{c.name}: {c.got_label} vs {c.expected_label}, {c.rule}",
             f"Mismatched elements: {c.mismatches} / {c.total}{share}",
             f"Greatest absolute difference: {fmt(c.max_abs_err)}{abs_where}",
             f"Greatest relative difference: {fmt(c.max_rel_err)}{rel_where}"]
    return lines + ([f"Note: {c.note}"] if c.note else [])


def _worst_lines(c: CheckResult) -> list[str]:
    """The worst entries as an aligned plain-text table: index left, numbers right."""
    if not c.worst:
        return []
    header = ("index", c.expected_label, c.got_label, "abs err", "allowed", "")
    rows = [(_index(e), fmt_value(e.expected), fmt_value(e.got), fmt(e.abs_err),
             fmt(e.allowed), PASS if e.ok else FAIL) for e in c.worst]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["Worst entries:"]
    for r in (header, *rows):
        cells = [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines
