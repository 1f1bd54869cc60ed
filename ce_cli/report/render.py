"""Renderers: a `Report` to Rich tables or to a JSON object. Formatting only, no decisions."""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from typing import TYPE_CHECKING

from ce_cli.errors import as_flags
from ce_cli.report.format import FAIL, PASS, fmt, fmt_value, json_safe, json_text
from ce_cli.verify.results import CheckResult, Entry, Report

if TYPE_CHECKING:  # Rich's tables load when a table is drawn (not for --json, not for --help)
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

# Display names of the checks (the JSON keeps `name`: it is an interface)
CHECK_NAMES = {
    "grad_vs_reference": "gradient vs reference",
    "loss_vs_reference": "loss vs reference",
    "fd_vs_reference": "reference vs finite differences",
    "fd_vs_grad": "gradient vs finite differences",
    "fd_rows_vs_reference": "reference vs finite differences (rows)",
    "fd_rows_vs_grad": "gradient vs finite differences (rows)",
    "normaliser": "row normaliser (softmax sum)",
    "two_class_bridge": "two-class bridge: CE([0, z]) = BCE(z)",
    "grad_hidden_vs_reference": "your dL/dH vs reference",
    "grad_weight_vs_reference": "your dL/dW vs reference",
    "grad_bias_vs_reference": "your dL/db vs reference",
}
NARROW = 80  # below this width numbers get 4 significant digits (never cut)


def display_name(name: str) -> str:
    return CHECK_NAMES.get(name, name.replace("_", " "))


def plain_rule(rule: str) -> str:
    """`f32: rtol 2.4e-07, atol 0, floor 4eps` in words: `... error floor 4 x eps`."""
    return re.sub(r"\bfloor (\S+?)eps\b", r"error floor \1 × eps", rule)


def verdict_text(report: Report) -> Text:
    from rich.text import Text

    word, _, reason = as_flags(report.verdict or ("PASS" if report.ok else "FAIL")).partition(" ")
    for name, shown in CHECK_NAMES.items():
        reason = reason.replace(f"{name}:", f"{shown}:")
    return (Text("verdict: ").append(word, style="bold green" if report.ok else "bold red")
            .append(f" {reason}" if reason else ""))


def render_table(report: Report, console: Console, *, verbose: bool = False) -> None:
    """The verdict with its reason, inputs, the summary line, the loss, the checks, worst entries
    of failing checks (of every check with `verbose`), likely causes, the verdict again."""
    from rich.text import Text

    console.print(verdict_text(report))
    _render_inputs(report, console)
    if report.checks:
        _render_checks(report, console, verbose)
    for d in report.diagnosis:
        console.print(Text(f"likely cause ({d.code}): {d.message} ({d.evidence})"))
    console.print(verdict_text(report))


def summary_line(report: Report) -> str:
    """One line: what was checked. Numbers carry thousands separators; words wrap, not numbers."""
    parts = [f"{report.kind}, N={report.n_rows:,} C={report.n_classes:,}",
             f"{report.target_kind} targets"]
    if report.n_ignored:
        parts.append(f"{report.n_ignored:,} ignored")
    parts.append(f"reduction {report.reduction}")
    parts.append(f"finite differences: {report.fd_mode}")
    return ", ".join(parts)


def shown_source(role: str, source: str) -> str:
    """`logits file 'z.npy'` in the row of `logits` is just `'z.npy'`; an array given to the
    API without a name is `(array)`."""
    prefix = f"{role} file "
    if source == role:
        return "(array)"
    return source[len(prefix):] if source.startswith(prefix) else source


def _render_inputs(report: Report, console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    inputs = Table(title="inputs", title_justify="left", show_edge=False, pad_edge=False,
                   box=None, show_header=False)
    inputs.add_column("role", no_wrap=True)
    inputs.add_column("source", overflow="fold")
    inputs.add_column("shape", no_wrap=True)
    inputs.add_column("dtype", no_wrap=True)
    for info in report.inputs:
        inputs.add_row(info.role, Text(shown_source(info.role, info.source)), str(info.shape),
                       info.dtype)
    console.print(inputs)
    console.print(Text(summary_line(report)))
    loss_label = "loss (sum of per-sample losses)" if report.reduction == "none" else "loss"
    console.print(Text(f"{loss_label}: {fmt_value(report.loss)}"))


def _render_checks(report: Report, console: Console, verbose: bool) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    narrow = console.width < NARROW
    table = Table(title="checks", title_justify="left", show_edge=False, pad_edge=False,
                  box=None if narrow else box.HEAVY_HEAD)
    table.add_column("check", overflow="fold")
    table.add_column("", justify="center", no_wrap=True, max_width=1)
    for col in ("max abs err", "max rel err", "over tol." if narrow else "over tolerance"):
        table.add_column(col, justify="right", no_wrap=True)
    for c in report.checks:
        mark = Text(PASS, style="green") if c.ok else Text(FAIL, style="bold red")
        table.add_row(display_name(c.name), mark, fmt(c.max_abs_err), fmt(c.max_rel_err),
                      f"{c.mismatches:,}/{c.total:,}")
    console.print(table)
    shown = [c for c in report.checks if verbose or not c.ok]
    for c in report.checks:
        _print_rule(console, c, with_rule=c in shown)
    for c in shown:
        if c.worst:
            console.print(worst_table(c, narrow=narrow))


def _print_rule(console: Console, check: CheckResult, *, with_rule: bool) -> None:
    """`  name: tolerance rule; note` (the rule only for failing checks or --verbose)."""
    from rich.text import Text

    text = "; ".join(part for part in (plain_rule(check.rule) if with_rule else "", check.note)
                     if part)
    if text:
        console.print(Text(f"  {display_name(check.name)}: {text}"))


def worst_table(check: CheckResult, *, narrow: bool = False) -> Table:
    """The worst entries of one check; `narrow`: values in 4 significant digits, so that the
    table fits 60 columns without cutting a number."""
    from rich import box
    from rich.table import Table

    title = (f"{display_name(check.name)}: worst entries, by error / allowed"
             + ("" if check.ok else " (✗ = over tolerance)"))
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False,
                  box=None if narrow else box.HEAVY_HEAD)
    value = (lambda x: fmt(x, 3)) if narrow else fmt_value
    table.add_column("index", overflow="fold")
    for col in (check.expected_label, check.got_label, "abs err", "allowed", ""):
        table.add_column(col, justify="right", no_wrap=not col.count(" ") or col == "abs err",
                         overflow="fold")
    for e in check.worst:
        table.add_row(str(e.index), value(e.expected), value(e.got), fmt(e.abs_err),
                      fmt(e.allowed), PASS if e.ok else FAIL)
    return table


def report_to_dict(report: Report) -> dict:
    data = asdict(report)
    data["fd"] = {"mode": data.pop("fd_mode"), "evaluations": data.pop("fd_evaluations")}
    for check, result in zip(data["checks"], report.checks):
        if not math.isfinite(result.max_abs_err):  # NaN output: no relative error beside null
            check["max_rel_err"] = None
        for entry, e in zip(check["worst"], result.worst):
            entry["ok"] = e.ok
    return json_safe(data)


def to_json(report: Report) -> str:
    return json_text(report_to_dict(report))


class CheckOutput:
    """A check `Report` as an `Output` for `emit`."""

    def __init__(self, report: Report, *, verbose: bool = False) -> None:
        self.report = report
        self.verbose = verbose
        self.warnings = report.warnings

    def to_dict(self) -> dict:
        return report_to_dict(self.report)

    def render(self, console: Console) -> None:
        render_table(self.report, console, verbose=self.verbose)


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
