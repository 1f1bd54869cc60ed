"""Streaming in row chunks: chunked == unchunked, memory-mapped == in-memory, and the
finite-difference modes that scale (column sweeps, directional rows, bisection) find planted errors."""

import numpy as np
import pytest

from ce_cli.verify.checks import check_grad, reference
from ce_cli.verify.pipeline import row_chunks
from ce_cli.verify.finite_diff import choose_mode, fd_full
from ce_cli.models.softmax import build_softmax_ce

# every test runs through the compiled kernel and through the numpy kernel
pytestmark = pytest.mark.usefixtures("both_kernels")


def problem_and_grad(n=37, c=53, dtype=np.float32, seed=0, **opts):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * 3).astype(dtype)
    y = rng.integers(0, c, n)
    y[::7] = -100
    return z, y, reference(z, y, **opts).grad


@pytest.mark.parametrize("chunk", [1, 7, 53, 54, 53 * 5 + 1, 53 * 37, 1 << 20])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2, "reduction": "sum"},
                                  {"weight": np.linspace(0.5, 2, 53)}])
def test_chunked_equals_unchunked(chunk, opts):
    z, y, _ = problem_and_grad()
    problem, _ = build_softmax_ce(z, y, **opts)
    whole = problem.evaluate(0, problem.n_rows, floor_coef=1e-7)
    parts = [problem.evaluate(a, b, floor_coef=1e-7) for a, b in row_chunks(37, 53, chunk)]
    for field in ("loss", "grad", "floor", "lse"):
        joined = np.concatenate([getattr(p, field) for p in parts])
        # identical arithmetic per row: equal to the last bit (<= 1e-15 relative is the brief's bar)
        np.testing.assert_array_equal(joined, getattr(whole, field))


def test_check_grad_report_independent_of_chunking():
    z, y, g = problem_and_grad()
    g32 = g.astype(np.float32)
    a = check_grad(z, y, grad=g32, fd="off", chunk_elements=60)
    b = check_grad(z, y, grad=g32, fd="off", chunk_elements=1 << 20)
    assert a.loss == b.loss
    assert a.checks == b.checks


def test_memory_mapped_and_in_memory_agree(tmp_path):
    z, y, g = problem_and_grad(n=64, c=300)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "g.npy", g.astype(np.float32))
    zm = np.load(tmp_path / "z.npy", mmap_mode="r")
    gm = np.load(tmp_path / "g.npy", mmap_mode="r")
    a = check_grad(zm, y, grad=gm, fd="sample", samples=40)
    b = check_grad(z, y, grad=g.astype(np.float32), fd="sample", samples=40)
    assert a.ok and b.ok
    assert a.loss == b.loss
    assert a.checks == b.checks


def test_full_sweep_matches_analytic_gradient():
    z, y, g = problem_and_grad(n=9, c=11, dtype=np.float64)
    problem, _ = build_softmax_ce(z, y)
    fd, bound, skipped = fd_full(problem, 0, 9)
    assert skipped == 0
    assert np.all(np.abs(fd - g) <= bound)
    assert np.max(np.abs(fd - g)) < 1e-9


def test_auto_mode_by_cost():
    assert choose_mode("auto", 256, 500) == "full"
    assert choose_mode("auto", 4096, 1000) == "directional"
    assert choose_mode("auto", 4096, 32000) == "sample"
    assert choose_mode("sample", 2, 2) == "sample"


@pytest.mark.parametrize("factor", [1.5, -1.0])
def test_directional_check_and_bisection_locate_a_planted_error(factor):
    rng = np.random.default_rng(3)
    n, c = 200, 4000
    z = rng.standard_normal((n, c)).astype(np.float32)
    y = rng.integers(0, c, n)
    g = reference(z, y, reduction="sum").grad.astype(np.float32)
    col = int(np.argmax(np.abs(g[123]) * (np.arange(c) != y[123])))  # a large non-target entry
    g[123, col] *= factor
    report = check_grad(z, y, grad=g, reduction="sum", fd="directional")
    checks = {ch.name: ch for ch in report.checks}
    assert report.fd_mode == "directional"
    assert checks["fd_rows_vs_reference"].ok
    rows = checks["fd_rows_vs_grad"]
    assert not rows.ok and rows.mismatches == 1
    assert rows.worst[0].index == (123,)
    assert f"entry (123, {col})" in rows.note
    assert checks["grad_vs_reference"].worst[0].index == (123, col)


def test_directional_passes_correct_float32_gradients():
    z, y, g = problem_and_grad(n=300, c=2000, seed=5)
    report = check_grad(z, y, grad=g.astype(np.float32), fd="directional")
    assert report.ok, [c for c in report.checks if not c.ok]
    assert report.fd_evaluations >= 2 * 300
