"""Reports read at 80 columns and degrade gracefully at 60: the real renderer on a Rich console
of an explicit width; no line longer than the width, no number cut (no "…"), the verdict with its
reason first and last, worst entries only for failing checks unless verbose, plain words."""

import io
import re

import numpy as np
import pytest
from rich.console import Console

from ce_cli.report.render import CheckOutput
from ce_cli.verify.checks import check_binary, check_grad
from tests.conftest import FIXTURES, softmax

EX = FIXTURES / "example"
WIDTHS = (60, 80, 120)


def _example(grad: str | None):
    z, y = np.load(EX / "logits.npy"), np.load(EX / "labels.npy")
    g = np.load(EX / grad) if grad else None
    return check_grad(z, y, grad=g, sources={"logits": "logits file 'examples/logits.npy'",
                                             "labels": "labels file 'examples/labels.npy'",
                                             "grad": f"grad file 'examples/{grad}'"})


def _big_bad():
    """Long numbers (N in the thousands, a planted error) and a directional finite difference."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3000, 40)) * 8
    y = rng.integers(0, 40, 3000)
    p = softmax(z)
    p[np.arange(3000), y] -= 1
    g = (p / 3000).astype(np.float32)
    g[::7, 3] *= -1.0001
    return check_grad(z.astype(np.float32), y, grad=g, loss=1.5, fd="directional")


def _binary():
    z = np.linspace(-30, 30, 24).reshape(4, 6)
    t = (np.arange(24).reshape(4, 6) % 3 == 0).astype(np.float64)
    s = 1 / (1 + np.exp(-z))
    return check_binary(z, t, grad=((s - t) / 24) * (1 + 1e-3 * (z > 20)), reduction="mean")


REPORTS = {"pass": lambda: _example("grad.npy"), "fail": lambda: _example("grad_bad.npy"),
           "self_check": lambda: _example(None), "big_fail": _big_bad, "binary_fail": _binary}
_cache: dict = {}


def report(name):
    if name not in _cache:
        with np.errstate(all="ignore"):
            _cache[name] = REPORTS[name]()
    return _cache[name]


def render(name: str, width: int, verbose: bool = False) -> list[str]:
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, highlight=False, markup=False,
                      emoji=False, soft_wrap=False)
    CheckOutput(report(name), verbose=verbose).render(console)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(REPORTS))
def test_fits_the_width_and_never_cuts_a_number(name, width, verbose):
    lines = render(name, width, verbose)
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long
    assert not any("…" in line for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    # every number of the worst-entries tables and the checks table is whole on one line
    for c in report(name).checks:
        assert f"{c.mismatches:,}/{c.total:,}" in text


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_verdict_with_reason_first_and_last(name):
    lines = render(name, 80)
    rep = report(name)
    word = "PASS" if rep.ok else "FAIL"
    assert lines[0].startswith(f"verdict: {word}")
    last = max(i for i, line in enumerate(lines) if line.startswith("verdict: "))
    assert lines[0:2] == lines[last:last + 2] or lines[0] == lines[last]
    if not rep.ok:
        assert "entries" in lines[0] or "rows" in lines[0]


def test_summary_line_fits_80_columns():
    lines = render("pass", 80)
    summary = next(line for line in lines if line.startswith("multiclass"))
    assert summary == ("multiclass, N=32 C=10, index targets, reduction mean, finite "
                       "differences: full")
    assert len(summary) <= 80


def test_worst_entries_only_for_failing_checks_unless_verbose():
    assert not any("worst entries" in line for line in render("pass", 80))
    assert any("worst entries" in line for line in render("pass", 80, verbose=True))
    failing = [line for line in render("fail", 80) if "worst entries" in line]
    assert len(failing) == sum(not c.ok for c in report("fail").checks)


@pytest.mark.parametrize("width", WIDTHS)
def test_plain_words_not_jargon(width):
    text = "\n".join(render("big_fail", width, verbose=True) + render("fail", width, verbose=True))
    for jargon in ("4eps", "fd_rows_vs", "fd_vs_", "grad_vs_reference", "row evaluations"):
        assert jargon not in text
    assert "finite differences" in text


def test_inputs_table_does_not_repeat_the_role():
    lines = render("pass", 80)
    logits = next(line for line in lines if line.startswith("logits"))
    assert "logits file" not in logits and "'examples/logits.npy'" in logits


def test_narrow_worst_table_keeps_whole_numbers():
    lines = render("fail", 60)
    row = next(line for line in lines if line.startswith("(7, 3)"))
    numbers = re.findall(r"\d\.\d{3}e[-+]\d\d", row)
    assert len(numbers) == 4, row


# ---------------------------------------------------------------------------------------------
# explain and stress: the same rules at 60, 80 and 120 columns

from ce_cli.explain import explain_binary, explain_softmax  # noqa: E402
from ce_cli.explain.render import ExplainOutput, rule_chunks, wrap_rule  # noqa: E402
from ce_cli.stress import builtin_sweep  # noqa: E402
from ce_cli.stress.render import StressOutput  # noqa: E402

EXPLAINS = {
    "three": lambda: explain_softmax(np.array([2.0, 1.0, 0.1]), label=0),
    "twenty": lambda: explain_softmax(np.random.default_rng(1).normal(size=20) * 3, label=7),
    "bad_target": lambda: explain_softmax(np.array([2.0, 1.0, 0.1]), target=np.array([0.3, 0.3, 0.3])),
    "binary": lambda: explain_binary(np.array([-3.0]), np.array([1.0])),
}


def _console(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, color_system=None, highlight=False, markup=False,
                   emoji=False, soft_wrap=False), buf


def render_explain(name: str, width: int, verbose: bool = False) -> list[str]:
    with np.errstate(all="ignore"):
        expl = EXPLAINS[name]()
    console, buf = _console(width)
    ExplainOutput(expl, "--logits", None, verbose=verbose).render(console)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?$|^(nan|-|inf|-inf|✓|✗|)$"
                    r"|^\((\d+,( \d+)*)?\)$")   # or a worst entry's index and mark


@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(EXPLAINS))
def test_explain_fits_the_width_and_never_cuts_a_number(name, width, verbose):
    lines = render_explain(name, width, verbose)
    assert not [line for line in lines if len(line) > width], "\n".join(lines)
    assert not any("…" in line for line in lines), "\n".join(lines)
    if verbose:
        return   # the steps table holds words; the number tables are the same as below
    for line in (line for line in lines if "│" in line):
        cells = [c.strip().removesuffix(" *") for c in line.split("│")]
        assert cells[0], f"a cell wrapped onto a second line:\n{line}"
        assert all(NUMBER.match(c) for c in cells), line


@pytest.mark.parametrize("width", WIDTHS)
def test_explain_three_classes_is_compact(width):
    lines = render_explain("three", width)
    assert len(lines) <= 40, "\n".join(lines)
    assert lines[0].startswith("verdict: PASS") and lines[-1] == lines[0]
    text = "\n".join(lines)
    assert "the derivation, step by step" not in text          # the steps table: --verbose
    assert "<=" not in text                                    # no tolerance formulas
    verbose = "\n".join(render_explain("three", width, verbose=True))
    assert "the derivation, step by step" in verbose and "  jacobian_vs_fd:" in verbose
    assert len(render_explain("three", width, verbose=True)) > 60


def test_explain_compact_shows_a_failing_rule():
    text = "\n".join(render_explain("bad_target", 80))
    assert text.startswith("verdict: FAIL: 3 of 9 checks failed (target_is_distribution,")
    assert "✗ target_is_distribution" in text and "not a probability distribution" in text
    assert "  target_is_distribution: y_i >= 0 and |sum y - 1| <= 4 C eps" in text


def _all_rules() -> list[str]:
    with np.errstate(all="ignore"):
        return [c.rule + (f"; {c.note}" if c.note else "") for make in EXPLAINS.values()
                for c in make().checks]


def test_rule_chunks_fit_80_columns_so_formulas_never_wrap():
    """Every rule's formulas sit in chunks short enough for an 80-column line (4 indent)."""
    for rule in _all_rules():
        chunks = rule_chunks(rule)
        assert " ".join(chunks) == " ".join(rule.split())
        assert max(map(len, chunks)) <= 76, max(chunks, key=len)


@pytest.mark.parametrize("width", WIDTHS)
def test_wrap_rule_breaks_only_between_chunks(width):
    for rule in _all_rules():
        lines = wrap_rule("  name:", rule, width)
        assert all(len(line) <= width for line in lines)
        body = " ".join(line.strip() for line in lines).removeprefix("name: ")
        assert body == " ".join(rule.split())     # nothing lost, no word split
        if width < 80:
            continue
        starts, pos = set(), 0
        for chunk in rule_chunks(rule):
            starts.add(pos)
            pos += len(chunk) + 1
        pos = 0
        for line in lines[1:]:
            piece = line.strip()
            pos = body.index(piece, pos)
            assert pos in starts, f"a line starts inside a formula: {piece!r}"


def test_rule_formulas_stay_whole_at_80_columns():
    text = "\n".join(render_explain("three", 80, verbose=True))
    for formula in ("J[j, i] = a_i (1{i=j} - a_j)", "h = eps^(1/3) max(1, |z_i|)",
                    "|sum a - 1| <= 4 eps (C + 1 + ln C)", "4 (nnz(y) + 1) eps sum_j |J[j, i] dC/da_j|"):
        assert formula in text, formula


_stress: dict = {}


def render_stress(kind: str, width: int, verbose: bool = False) -> list[str]:
    if kind not in _stress:
        _stress[kind] = builtin_sweep(kind, dtypes=("f16", "f32", "f64"))
    console, buf = _console(width)
    StressOutput(_stress[kind], verbose=verbose).render(console)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_stress_fits_the_width(kind, width, verbose):
    lines = render_stress(kind, width, verbose)
    assert not [line for line in lines if len(line) > width], "\n".join(lines)
    assert not any("…" in line for line in lines), "\n".join(lines)


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_stress_cells_stay_on_one_line(kind, width):
    lines = render_stress(kind, width)
    report = _stress[kind]
    cell = re.compile(r"[✓✗-]{%d} (\S+)" % len(report.scales))
    for sc in report.scenarios:
        rows = [line for line in lines if line.startswith(f"  {sc.name} ")]
        assert len(rows) == len(report.impls), sc.name     # one line per implementation
        for row in rows:
            shorts = cell.findall(row)
            assert len(shorts) == len(report.dtypes), row
            assert all(len(s) <= 5 for s in shorts), row
    # what a compact cell leaves out is in --verbose
    verbose = "\n".join(render_stress(kind, 120, verbose=True))
    assert "<=" in verbose and ("nan grad" in verbose or "loss" in verbose)
