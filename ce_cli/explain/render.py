"""Renderers for `ce-check explain`: Rich tables, a JSON object, and the --steps table as SVG.

Formatting only: every number comes from the derivations, every selection from
ce_cli.explain.display.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass
from functools import partial
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.columns import Columns
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderResult
from rich.table import Table
from rich.text import Text

from ce_cli.explain.common import fd_skip_note
from ce_cli.explain.display import (
    SHOW_FULL,
    discrepancy,
    display_classes,
    jacobian_entry,
    jacobian_fd_entry,
    largest_jacobian_entries,
)
from ce_cli.explain.results import Explanation, MseComparison, StepCurve
from ce_cli.report.format import FAIL, PASS, fmt, json_safe
from ce_cli.verify.results import CheckResult

JSON_FULL_C = 256   # the JSON carries the whole Jacobian up to this many classes
BAR_WIDTH = 28

STEPS = {
    "multiclass": (
        ("1", "z", "the logits of one sample"),
        ("2", "a = softmax(z)", "a_i = exp(z_i - max z) / sum_k exp(z_k - max z)"),
        ("3", "y", "the target"),
        ("4", "J[j, i] = da_j/dz_i = a_i (1{i=j} - a_j)", "the softmax Jacobian"),
        ("5", "dC/da_j = -y_j / a_j", "C = -sum_j y_j ln a_j  (0 where y_j = 0: the term is absent)"),
        ("6", "dC/dz_i = sum_j J[j, i] dC/da_j", "the chain rule, J^T dC/da = -y_i + a_i sum_j y_j"),
        ("7", "a - y", "the closed form (sum y = 1)"),
        ("8", "(C(z + h e_i) - C(z - h e_i)) / 2h", "finite differences of the loss, h = eps^(1/3) max(1, |z_i|)"),
    ),
    "binary": (
        ("1", "z", "one logit"),
        ("2", "s = sigmoid(z)", "s = 1 / (1 + exp(-z))"),
        ("3", "y", "the label, in [0, 1]"),
        ("4", "s' = ds/dz = s (1 - s)", "the sigmoid's derivative (its 1x1 Jacobian)"),
        ("5", "dC/ds = -y/s + (1 - y)/(1 - s)", "C = -y ln s - (1 - y) ln(1 - s)"),
        ("6", "dC/dz = s' dC/ds", "the chain rule: -y (1 - s) + (1 - y) s"),
        ("7", "s - y", "the closed form"),
        ("8", "(C(z + h) - C(z - h)) / 2h", "finite differences of the loss, h = eps^(1/3) max(1, |z|)"),
    ),
}

CHECK_STEP = {
    "softmax_sums_to_1": "2", "softmax_in_0_1": "2", "sigmoid_sums_to_1": "2", "sigmoid_in_0_1": "2",
    "target_is_distribution": "3", "jacobian_symmetric": "4", "jacobian_rows_sum_to_0": "4",
    "jacobian_vs_fd": "4", "dC_da_vs_fd": "5", "chain_rule_vs_a_minus_y": "6-7",
    "fd_vs_a_minus_y": "8", "mse_vs_fd": "mse", "mse_vanishes_at_saturation": "mse",
    "step_curve_within_bound": "steps",
}


def num(x: float, digits: int = 10) -> str:
    x = float(x)
    if math.isnan(x):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


class _Titled(Table):
    """A table whose title is a line above it, wrapped at the console's width (a Rich title wraps
    at the table's, which splits long titles over narrow tables)."""

    def __init__(self, heading: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heading = heading

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")  # a narrow terminal wraps a number, never truncates it
        super().add_column(*args, **kwargs)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.heading:
            yield Text(self.heading)
        yield from super().__rich_console__(console, options)


def _table(title: str | None = None) -> Table:
    """A plain table; titles and headers are Text, never markup (they hold brackets like J[j, i])."""
    return _Titled(title, show_edge=False, pad_edge=False)


def _columns(table: Table, *cols: tuple[str, JustifyMethod]) -> None:
    for col, justify in cols:
        table.add_column(Text(col), justify=justify)


# ---------------------------------------------------------------------------------------------
# the one Output


@dataclass(eq=False)
class ExplainOutput:
    """`ce-check explain`'s result for `emit`: the explanation and what the CLI chose to show
    (--compare-mse, --steps). Its checks are the derivation's, then theirs."""

    expl: Explanation
    where: str                         # the sample, e.g. "row 7 of logits file 'x.npy'"
    row: tuple[int, ...] | None        # its index in the input's batch shape
    mse: MseComparison | None = None
    curve: StepCurve | None = None
    warnings: tuple[str, ...] = ()
    verbose: bool = False              # the steps table, every check's numbers and rule

    @property
    def checks(self) -> tuple[CheckResult, ...]:
        return (self.expl.checks + (self.mse.checks if self.mse else ())
                + (self.curve.checks if self.curve else ()))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return explanation_to_dict(self.expl, where=self.where, row=self.row, checks=self.checks,
                                   mse=self.mse, curve=self.curve)

    def render(self, console: Console) -> None:
        render_explanation(self.expl, console, where=self.where, checks=self.checks, mse=self.mse,
                           curve=self.curve, verbose=self.verbose)


# ---------------------------------------------------------------------------------------------
# tables


def render_explanation(expl: Explanation, console: Console, *, where: str, checks: tuple[CheckResult, ...],
                       mse: MseComparison | None = None, curve: StepCurve | None = None,
                       verbose: bool = False) -> None:
    """The verdict, the sample, the Jacobian, the gradient three ways, the checks and the verdict
    again; verbose adds the step-by-step table and every check's numbers and rule."""
    console.print(_verdict(checks))
    _render_header(expl, console, where)
    if verbose:
        console.print(_steps_table(expl, checks))
        console.print()
    shown = display_classes(expl)
    _render_sample(expl, console, shown)
    console.print()
    _render_jacobian(expl, console, shown)
    console.print()
    _render_gradient(expl, console, shown)
    console.print()
    if mse is not None:
        render_mse(expl, mse, console)
        console.print()
    if curve is not None:
        console.print(steps_table(curve, binary=expl.kind == "binary"))
        console.print(Text(steps_summary(curve)))
        console.print()
    if verbose:
        render_checks(checks, console)
    else:
        render_checks_compact(checks, console)
    for note in expl.notes:
        console.print(Text(f"note: {note}"))
    console.print(_verdict(checks))


def _verdict(checks: tuple[CheckResult, ...]) -> Text:
    """`verdict: PASS` or `FAIL` with its reason: how many checks hold, the failing ones by name."""
    failed = [c.name for c in checks if not c.ok]
    if not failed:
        return Text("verdict: ").append("PASS", style="bold green").append(
            f": all {len(checks)} checks of the derivation hold")
    return Text("verdict: ").append("FAIL", style="bold red").append(
        f": {len(failed)} of {len(checks)} checks failed ({', '.join(failed)})")


def _render_header(expl: Explanation, console: Console, where: str) -> None:
    if expl.kind == "binary":
        head = f"ce-check explain: sigmoid binary cross-entropy, one logit ({where})"
        target = f"label y = {expl.y[0]:g}"
    else:
        head = f"ce-check explain: softmax cross-entropy, one sample ({where})"
        target = (f"target: label {expl.label}" if expl.label is not None
                  else f"target: probabilities (largest at class {expl.target})")
        target = f"C = {expl.n_classes} classes, {target}"
    console.print(Text(head, style="bold"))
    console.print(Text(f"{target}, loss C = {num(expl.loss)}"))
    console.print()


def _steps_table(expl: Explanation, checks: tuple[CheckResult, ...]) -> Table:
    """The eight steps, each with the marks of its checks (steps 6 and 7 share theirs)."""
    steps = _table("the derivation, step by step")
    _columns(steps, ("step", "right"), ("quantity", "left"), ("checks", "left"))
    by_step: dict[str, list[CheckResult]] = {}
    for c in checks:
        by_step.setdefault(CHECK_STEP.get(c.name, ""), []).append(c)
    for key, quantity, what in STEPS[expl.kind]:
        marks = Text()
        for c in by_step.get(key, []) + (by_step.get("6-7", []) if key in ("6", "7") else []):
            if marks:
                marks.append("\n")
            marks.append(PASS if c.ok else FAIL, style="green" if c.ok else "bold red")
            marks.append(f" {c.name}")
        cell = Text(quantity, style="bold")
        cell.append(f"\n{what}")
        steps.add_row(key, cell, marks)
    return steps


def _partial(expl: Explanation, shown: np.ndarray) -> str:
    C = expl.n_classes
    return "" if shown.size == C else (f" ({shown.size} of {C} classes: the target, the largest a, "
                                       "the largest discrepancies)")


def _render_sample(expl: Explanation, console: Console, shown: np.ndarray) -> None:
    """Steps 1-3 and 5: z, a, y and dC/da at the classes shown."""
    binary = expl.kind == "binary"

    def build(digits: int) -> Table:
        sample = _table("steps 1-3 and 5: the sample" + _partial(expl, shown))
        for col in ("" if binary else "class", "z", "s = sigmoid(z)" if binary else "a = softmax(z)",
                    "y", "dC/ds" if binary else "dC/da = -y/a"):
            sample.add_column(Text(col), justify="right", no_wrap=True)
        for i in shown:
            sample.add_row(str(i) + (" *" if i == expl.target and not binary else ""),
                           num(expl.z[i], digits), num(expl.a[i], digits), num(expl.y[i], digits),
                           num(expl.dC_da[i], digits))
        return sample

    console.print(_fitting(console, build))
    if not binary:
        console.print(Text("  * the target class; sum a = "
                           f"{num(float(np.sum(expl.a)), 17)}, sum y = {num(float(np.sum(expl.y)), 17)}"))


def _fits(console: Console, table: Table) -> bool:
    """The table's natural width (unconstrained) is within the console's."""
    wide = console.options.update_width(1 << 16)
    return console.measure(table, options=wide).maximum <= console.width


def _fitting(console: Console, build: Callable[[int], Table], digits: tuple[int, ...] = (10, 6, 4)
             ) -> Table:
    """The table with the most significant digits whose columns fit the console (its number
    columns never wrap, so a number is never split over two lines)."""
    for d in digits[:-1]:
        table = build(d)
        if _fits(console, table):
            return table
    return build(digits[-1])


def _nanmax(x: np.ndarray) -> float:
    """max ignoring NaN; NaN when every entry is (without numpy's All-NaN warning)."""
    return float(np.nanmax(x)) if not np.isnan(x).all() else math.nan


def _render_gradient(expl: Explanation, console: Console, shown: np.ndarray) -> None:
    """Steps 6-8: the chain-rule product, the closed form and finite differences, side by side."""
    binary = expl.kind == "binary"
    closed = "s - y" if binary else "a - y"
    product = "s' dC/ds" if binary else "J^T dC/da"
    disc = discrepancy(expl)

    def build(digits: int) -> Table:
        grad = _table(f"steps 6-8: the chain rule, {closed} and finite differences, side by side"
                      + _partial(expl, shown))
        for col in ("" if binary else "class", product, closed, "finite diff", "max |diff|"):
            grad.add_column(Text(col), justify="right", no_wrap=True)
        for i in shown:
            grad.add_row(str(i), num(expl.chain_rule[i], digits), num(expl.a_minus_y[i], digits),
                         num(expl.fd[i], digits), fmt(float(disc[i])) if np.isfinite(disc[i]) else "nan")
        return grad

    console.print(_fitting(console, build))
    worst_chain = _nanmax(np.abs(expl.chain_rule - expl.a_minus_y))
    with np.errstate(invalid="ignore"):
        fd_err = np.abs(expl.fd - expl.a_minus_y)
    worst_fd = float(np.nanmax(fd_err)) if np.isfinite(fd_err).any() else math.nan
    C = expl.n_classes
    console.print(Text(f"  max |{product} - ({closed})| = {fmt(worst_chain)}"))
    console.print(Text(f"  max |finite diff - ({closed})| = {fmt(worst_fd)}"
                       + ("" if expl.probed.size == C else f" (over {expl.probed.size} probed classes)")))


def _render_jacobian(expl: Explanation, console: Console, shown: np.ndarray) -> None:
    """Step 4: s' (binary), the whole J up to SHOW_FULL classes, else its largest entries and the
    target's row and column."""
    if expl.kind == "binary":
        console.print(_sigmoid_prime_table(expl))
        return
    if expl.n_classes <= SHOW_FULL:
        for digits in (4, 3):
            full = _full_jacobian_table(expl, digits)
            if _fits(console, full):
                console.print(full)
                return
    # too many classes, or a terminal too narrow for the whole matrix
    console.print(_fitting(console, lambda d: _largest_jacobian_table(expl, d)))
    console.print(_fitting(console, lambda d: _target_jacobian_table(expl, shown, d)))


def _sigmoid_prime_table(expl: Explanation) -> Table:
    t = _table("step 4: s' = s (1 - s)")
    for col in ("s'", "finite diff", "|diff|"):
        t.add_column(Text(col), justify="right")
    assert expl.jacobian is not None  # binary: always the 1 x 1 matrix
    j, f = float(expl.jacobian[0, 0]), float(expl.jacobian_fd[0, 0])
    t.add_row(num(j), num(f), fmt(abs(j - f)))
    return t


def _full_jacobian_table(expl: Explanation, digits: int = 4) -> Table:
    """J[j, i] with each row's sum (0 in exact arithmetic) and its largest |J - FD|."""
    C = expl.n_classes
    assert expl.jacobian is not None  # C <= SHOW_FULL <= FULL_C
    t = _table("step 4: the Jacobian J[j, i] = da_j/dz_i (row j: output a_j; column i: input z_i)")
    wide = digits >= 4   # narrower: a shorter header and error column
    for col in ("j \\ i", *map(str, range(C)), "row sum", "max |J - FD|" if wide else "max |J-FD|"):
        t.add_column(Text(col), justify="right", no_wrap=True)
    for j in range(C):
        row = expl.jacobian[j]
        fd_row = np.array([jacobian_fd_entry(expl, j, i) for i in range(C)])
        with np.errstate(invalid="ignore"):
            err = np.nanmax(np.abs(row - fd_row)) if np.isfinite(fd_row).any() else math.nan
        t.add_row(str(j), *(num(v, digits) for v in row), fmt(float(row.sum()), 3 if wide else 2),
                  fmt(float(err), 3 if wide else 2) if np.isfinite(err) else "-")
    return t


def _largest_jacobian_table(expl: Explanation, digits: int = 10) -> Table:
    C = expl.n_classes
    big = _table(f"step 4: the Jacobian is {C} x {C}; its largest entries (J[j, i] = da_j/dz_i)")
    for col in ("j", "i", "J[j, i]", "finite diff"):
        big.add_column(Text(col), justify="right", no_wrap=True)
    for j, i, v in largest_jacobian_entries(expl):
        big.add_row(str(j), str(i), num(v, digits), num(jacobian_fd_entry(expl, j, i), digits))
    return big


def _target_jacobian_table(expl: Explanation, shown: np.ndarray, digits: int = 10) -> Table:
    t = expl.target
    tr = _table(f"the target's row J[{t}, i] and column J[i, {t}] at the classes shown")
    for col in ("i", f"J[{t}, i] = da_{t}/dz_i", f"J[i, {t}] = da_i/dz_{t}", f"FD da_i/dz_{t}"):
        tr.add_column(Text(col), justify="right", no_wrap=True)
    for i in shown:
        tr.add_row(str(i), num(jacobian_entry(expl, t, int(i)), digits),
                   num(jacobian_entry(expl, int(i), t), digits), num(jacobian_fd_entry(expl, int(i), t), digits))
    return tr


def render_mse(expl: Explanation, mse: MseComparison, console: Console) -> None:
    binary = expl.kind == "binary"
    shown = display_classes(expl)
    t = _table("--compare-mse: the quadratic cost on sigmoid outputs, M = 1/2 sum (s(z) - y)^2, "
               "against cross-entropy")
    for col in ("" if binary else "class", "s(z)", "s'(z)", "MSE (s - y) s'", "finite diff of M",
                "CE " + ("s - y" if binary else "a - y")):
        t.add_column(Text(col), justify="right")
    pos = {int(c): k for k, c in enumerate(expl.probed)}
    for i in shown:
        fd = mse.mse_fd[pos[int(i)]] if int(i) in pos else math.nan
        t.add_row(str(i), num(mse.sigma[i], 6), num(mse.sigma_prime[i], 6), num(mse.mse_error[i], 8),
                  num(fd, 8), num(mse.ce_error[i], 8))
    console.print(t)
    if binary:
        title = ("saturation: the logit pushed away from the label; the MSE error carries s'(z) -> 0, "
                 "CE's s - y does not")
    else:
        title = (f"saturation: the wrong class {mse.wrong}'s logit z pushed to max(other logits) + d; "
                 f"the errors at class {mse.wrong}: MSE's carries s'(z) -> 0, CE's a - y does not")
    s = _table(title)
    cols = (["d"] if not binary else []) + ["z", "s(z)", "s'(z)", "MSE (s - y) s'",
                                            "CE s - y" if binary else "CE a - y",
                                            "|MSE| / |CE|"]
    for col in cols:
        s.add_column(Text(col), justify="right")
    for r in mse.saturation:
        ratio = abs(r.mse) / abs(r.ce) if r.ce else math.nan
        cells = ([num(r.offset, 3)] if not binary else []) + [num(r.z, 6), num(r.sigma, 10), fmt(r.sigma_prime),
                                                              fmt(r.mse), num(r.ce, 6), fmt(ratio)]
        s.add_row(*cells)
    console.print(s)


def steps_table(curve: StepCurve, *, binary: bool = False) -> Table:
    """|fd(h) - dC/dz| against h, one bar per row (log scale), the chosen h and the minimum marked."""
    what = "z" if binary else f"z_{curve.entry}"
    t = _table(f"--steps: finite-difference error against the step h for dC/d{what} = {num(curve.derivative)}")
    cols: tuple[tuple[str, JustifyMethod], ...] = (
        ("h", "right"), ("|error|", "right"), ("bound", "right"), ("log10 |error|", "left"), ("", "left"))
    for col, just in cols:
        t.add_column(Text(col), justify=just, no_wrap=True)
    finite = curve.error[np.isfinite(curve.error) & (curve.error > 0)]
    lo = math.floor(math.log10(finite.min())) if finite.size else -16
    hi = math.ceil(math.log10(finite.max())) if finite.size else 0
    span = max(1, hi - lo)
    for k, (h, err, bound) in enumerate(zip(curve.h, curve.error, curve.bound)):
        if err > 0 and np.isfinite(err):
            n = 1 + round((BAR_WIDTH - 1) * (math.log10(err) - lo) / span)
        else:
            n = 0
        best = k == curve.best and bool(np.isfinite(err))  # every step skipped: no minimum
        style = "bold green" if best else ("cyan" if k == curve.chosen else "")
        marks = [m for m, on in (("< chosen", k == curve.chosen), ("< min", best)) if on]
        t.add_row(f"{h:.2e}", fmt(float(err)), fmt(float(bound)), Text("#" * n, style=style),
                  Text(" ".join(marks)))
    return t


def steps_summary(curve: StepCurve) -> str:
    scaled = "" if curve.scale == 1.0 else (" (steps are relative: each perturbs z by h max(1, |z|) = "
                                            f"h x {curve.scale:.6g})")
    theory = (f"  theoretical optimum h ~ eps^(1/3) = {curve.optimum:.3g}, where truncation h^2 "
              "|C'''|/6 meets rounding eps |C|/h; ")
    skipped = f"; {fd_skip_note(curve.skipped, curve.h.size)}" if curve.skipped else ""
    if curve.skipped == curve.h.size:  # nothing measured: no minimum to point at
        return f"{theory}chosen (< chosen) h = eps^(1/3), the step `grad` uses{scaled}{skipped}"
    return (f"{theory}measured minimum (< min) at h = {curve.h[curve.best]:.3g}; "
            "chosen (< chosen) h = eps^(1/3), the step `grad` uses; the rigorous bound is smallest at "
            f"h = {curve.bound_best_h:.3g}{scaled}{skipped}")


def render_checks(checks: tuple[CheckResult, ...], console: Console) -> None:
    table = _table("checks")
    cols: tuple[tuple[str, JustifyMethod], ...] = (
        ("step", "right"), ("check", "left"), ("", "center"), ("max abs err", "right"),
        ("max rel err", "right"), ("mismatches", "right"))
    for col, justify in cols:
        table.add_column(Text(col), justify=justify, no_wrap=True)
    for c in checks:
        mark = Text(PASS, style="green") if c.ok else Text(FAIL, style="bold red")
        table.add_row(CHECK_STEP.get(c.name, ""), c.name, mark, fmt(c.max_abs_err), fmt(c.max_rel_err),
                      f"{c.mismatches}/{c.total}")
    console.print(table)
    for c in checks:
        _print_rule(c, console)
    _render_worst(checks, console)


def render_checks_compact(checks: tuple[CheckResult, ...], console: Console) -> None:
    """A mark per check, packed into columns; a failing check's rule and note below."""
    console.print(Text(f"checks ({sum(c.ok for c in checks)} of {len(checks)} hold; --verbose: "
                       "each check's errors and rule):"))
    cells = [Text(PASS if c.ok else FAIL, style="green" if c.ok else "bold red").append(f" {c.name}",
                                                                                      style="")
             for c in checks]
    console.print(Columns(cells, padding=(0, 2), equal=True, column_first=True))
    for c in checks:
        if not c.ok:
            _print_rule(c, console)
    _render_worst(checks, console)


# the rule text: breaks only next to words ("within", "where", ...) or after a clause's
# punctuation outside parentheses, so a formula stays on one line
MATH_WORDS = frozenset({"sum", "max", "min", "eps", "exp", "log", "log2", "nnz", "inf", "nan", "tiny",
                        "sigmoid", "softmax", "abs"})


def _prose(token: str) -> bool:
    word = token.strip(",;:.()").removesuffix("'s")
    return len(word) >= 3 and word.isalpha() and word.islower() and word not in MATH_WORDS


def rule_chunks(text: str) -> list[str]:
    """The rule cut at its label boundaries: before or after a prose word, or after ',', ';' or
    ':' outside parentheses. A chunk is never split while it fits the line."""
    tokens = [t for t in re.split(r" +", text.strip()) if t]
    chunks: list[str] = []
    current: list[str] = []
    depth = 0
    for k, tok in enumerate(tokens):
        current.append(tok)
        depth += sum(tok.count(b) for b in "([{") - sum(tok.count(b) for b in ")]}")
        nxt = tokens[k + 1] if k + 1 < len(tokens) else None
        clause = depth <= 0 and tok[-1] in ",;:"
        if nxt is None or clause or _prose(tok) or _prose(nxt):
            chunks.append(" ".join(current))
            current = []
    return chunks


def wrap_rule(head: str, text: str, width: int, indent: int = 4) -> list[str]:
    """`head` then the rule's chunks, packed greedily into lines of at most `width` characters,
    continuation lines indented; a chunk longer than a line is split at its spaces, never inside
    a number."""
    lines: list[str] = []
    line = head.rstrip()
    for chunk in rule_chunks(text):
        for piece in _fit(chunk, width - indent):
            if len(line) + 1 + len(piece) <= width:
                line = f"{line} {piece}"
            else:
                lines.append(line)
                line = " " * indent + piece
    lines.append(line)
    return lines


def _fit(chunk: str, room: int) -> list[str]:
    """A chunk as pieces of at most `room` characters split at spaces (one piece while it fits)."""
    if len(chunk) <= room:
        return [chunk]
    pieces, piece = [], ""
    for word in chunk.split(" "):
        if piece and len(piece) + 1 + len(word) > room:
            pieces.append(piece)
            piece = word
        else:
            piece = f"{piece} {word}" if piece else word
    return pieces + [piece]


def _print_rule(c: CheckResult, console: Console) -> None:
    text = c.rule + (f"; {c.note}" if c.note else "")
    for line in wrap_rule(f"  {c.name}:", text, console.width):
        console.print(Text(line), soft_wrap=True)


def _render_worst(checks: tuple[CheckResult, ...], console: Console) -> None:
    for c in checks:
        if not c.ok and c.worst:
            console.print(_fitting(console, partial(_worst_table, c)))


def _worst_table(c: CheckResult, digits: int) -> Table:
    w = _table(f"{c.name}: worst entries (✗ = over tolerance)")
    for col in ("index", c.expected_label, c.got_label, "abs err", "allowed", ""):
        w.add_column(Text(col), justify="right" if col != "index" else "left", no_wrap=True)
    for e in c.worst:
        w.add_row(str(e.index), num(e.expected, digits), num(e.got, digits), fmt(e.abs_err),
                  fmt(e.allowed), PASS if e.ok else FAIL)
    return w


# ---------------------------------------------------------------------------------------------
# JSON


def _vec(v: Any) -> list[float]:
    return [float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1)]


def _check_dict(c: CheckResult) -> dict:
    d = asdict(c)
    for entry, e in zip(d["worst"], c.worst):
        entry["ok"] = e.ok
    return d


def explanation_to_dict(expl: Explanation, *, where: str, row: tuple[int, ...] | None,
                        checks: tuple[CheckResult, ...], mse: MseComparison | None = None,
                        curve: StepCurve | None = None) -> dict:
    """The JSON object: every array of the derivation, the checks, and --compare-mse / --steps."""
    C = expl.n_classes
    full = expl.jacobian is not None and C <= JSON_FULL_C
    data = {
        "ok": all(c.ok for c in checks),
        "kind": expl.kind,
        "source": where,
        "row": list(row) if row is not None else None,
        "n_classes": C,
        "label": expl.label,
        "target": expl.target,
        "loss": expl.loss,
        "z": _vec(expl.z),
        "a": _vec(expl.a),
        "y": _vec(expl.y),
        "jacobian": [_vec(r) for r in expl.jacobian] if full and expl.jacobian is not None else None,
        "jacobian_summary": _jacobian_summary(expl),
        "dC_da": _vec(expl.dC_da),
        "chain_rule": _vec(expl.chain_rule),
        "a_minus_y": _vec(expl.a_minus_y),
        "fd": _vec(expl.fd),
        "fd_probed": None if expl.probed.size == C else [int(i) for i in expl.probed],
        "checks": [_check_dict(c) for c in checks],
        "notes": list(expl.notes),
    }
    if mse is not None:
        data["compare_mse"] = _mse_dict(mse)
    if curve is not None:
        data["steps"] = _steps_dict(curve)
    return json_safe(data)


def _jacobian_summary(expl: Explanation) -> dict:
    C = expl.n_classes
    t = expl.target
    return {
        "shape": [C, C],
        "convention": "jacobian[j][i] = da_j/dz_i",
        "largest": [{"index": [j, i], "value": v} for j, i, v in largest_jacobian_entries(expl)],
        "target_row": [jacobian_entry(expl, t, i) for i in range(C)],
        "target_column": [jacobian_entry(expl, i, t) for i in range(C)],
    }


def _mse_dict(mse: MseComparison) -> dict:
    return {
        "sigma": _vec(mse.sigma),
        "sigma_prime": _vec(mse.sigma_prime),
        "mse_error": _vec(mse.mse_error),
        "ce_error": _vec(mse.ce_error),
        "wrong_class": mse.wrong,
        "saturation": [asdict(r) for r in mse.saturation],
    }


def _steps_dict(curve: StepCurve) -> dict:
    return {
        "entry": curve.entry,
        "derivative": curve.derivative,
        "optimum": curve.optimum,
        "chosen_h": float(curve.h[curve.chosen]),
        "best_h": float(curve.h[curve.best]),
        "bound_best_h": curve.bound_best_h,
        "scale": curve.scale,
        "rows": [{"h": float(h), "step": float(h * curve.scale), "fd": float(f), "error": float(e),
                  "bound": float(b)}
                 for h, f, e, b in zip(curve.h, curve.fd, curve.error, curve.bound)],
    }


# ---------------------------------------------------------------------------------------------
# --plot


def write_svg(curve: StepCurve, path: Path, *, binary: bool, title: str) -> None:
    """The --steps table with its bars, exported by Rich as an SVG (no extra dependency)."""
    console = Console(record=True, width=130, file=io.StringIO(), color_system="truecolor",
                      force_terminal=True, highlight=False, emoji=False)
    console.print(steps_table(curve, binary=binary))
    console.print(Text(steps_summary(curve)))
    svg = console.export_svg(title=title)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(svg, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
