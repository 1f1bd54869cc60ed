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
