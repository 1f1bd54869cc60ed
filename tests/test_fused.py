"""The compiled kernel (ce_cli/_fused.c) against the numpy kernel it accelerates.

Both compute the same formulas; they differ only in exp (both below one ulp) and in the order
of the row sums, so row losses agree to ~1e-15 relative and gradients to ~1e-16 of the row's
scale. The comparison statistics the kernel folds in on the way (mismatch counts, the worst
entries) must give the same report as the numpy comparison.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ce_cli
from ce_cli.verify.checks import check_grad, reference
from ce_cli.kernels.compiled import FusedKernel, kernel
from ce_cli.kernels.numpy_softmax import softmax_rows
from ce_cli.models.softmax import build_softmax_ce


def _cpu_has_avx512() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags


def _gcc_major() -> int:
    gcc = shutil.which("gcc")
    if gcc is None:
        return 0
    out = subprocess.run([gcc, "-dumpversion"], capture_output=True, text=True).stdout.strip()
    return int(out.split(".")[0]) if out.split(".")[0].isdigit() else 0


def test_kernel_is_built_where_it_can_run():
    """The README's install builds the kernel; it must load wherever gcc >= 12 and AVX-512 exist."""
    if _gcc_major() < 12 or not _cpu_has_avx512() or platform.machine() != "x86_64":
        pytest.skip("no gcc >= 12 or no AVX-512 here: the numpy kernel serves")
    if os.environ.get("CE_CHECK_FUSED", "").lower() in ("0", "off", "false", "no"):
        pytest.skip("CE_CHECK_FUSED turns the kernel off")
    built = [p.name for p in (Path(ce_cli.__file__).parent / "kernels").glob("_fused*.so")]
    assert built, "ce_cli/kernels/_fused*.so missing: install with pip install -e ."
    assert kernel() is not None


needs_kernel = pytest.mark.skipif(kernel() is None, reason="compiled kernel not built / no AVX-512")


def _both(problem, rows, z_rows=None, grad=True, floor_coef=4 * 2.0**-23):
    z_rows = problem.z[rows[0]:rows[-1] + 1] if z_rows is None else z_rows
    fused = FusedKernel.plan(problem).evaluate(z_rows, rows, grad=grad, floor_coef=floor_coef)
    with np.errstate(invalid="ignore"):
        ref = softmax_rows(problem, z_rows, rows, grad=grad, floor_coef=floor_coef)
    return fused, ref


def _assert_close(fused, ref, scale_of_grad, grad=True):
    scale = np.abs(ref.loss) + np.abs(ref.total_weight) * (1 + np.abs(ref.lse))
    assert np.all(np.abs(fused.loss - ref.loss) <= 4e-16 * scale + 1e-300)
    np.testing.assert_allclose(fused.lse, ref.lse, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(fused.row_max, ref.row_max)
    np.testing.assert_allclose(fused.total_weight, ref.total_weight, rtol=0, atol=0)
    if grad:
        # Q a and q may cancel: their own size, Q * scale, bounds the rounding
        row_scale = np.abs(ref.grad).max(axis=1, keepdims=True) + np.abs(ref.total_weight * scale_of_grad)[:, None]
        assert np.all(np.abs(fused.grad - ref.grad) <= 4e-16 * row_scale + 2.0**-1070)
        np.testing.assert_allclose(fused.floor, ref.floor, rtol=1e-13, atol=1e-300)


OPTIONS = {
    "plain": {},
    "weights": {"weight": "w"},
    "smoothing": {"label_smoothing": 0.1},
    "weights+smoothing+sum": {"weight": "w", "label_smoothing": 0.3, "reduction": "sum"},
    "ignore": {"ignore_index": 0},
    "none": {"reduction": "none"},
}


@needs_kernel
@pytest.mark.parametrize("C", [1, 2, 7, 8, 9, 127, 128, 129, 1000, 1031])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_rows_match_numpy_kernel(C, dtype, opt):
    rng = np.random.default_rng(C * 7 + len(opt))
    N = 23
    kw = dict(OPTIONS[opt])
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.0, 3.0, C)
    z = (rng.standard_normal((N, C)) * rng.choice([0.01, 3.0, 40.0], size=(N, 1))).astype(dtype)
    y = rng.integers(0, C, N)
    problem, _ = build_softmax_ce(z, y, **kw)
    fused, ref = _both(problem, np.arange(N))
    _assert_close(fused, ref, problem.grad_scale)


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6), c=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 30.0, 800.0, 1e4]),
    dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**32 - 1),
    smoothing=st.sampled_from([0.0, 0.05]), weighted=st.booleans(),
)
def test_rows_match_numpy_kernel_property(n, c, scale, dtype, seed, smoothing, weighted):
    """Any scale: rows whose exp underflows to subnormals and zero take the kernel's careful exp."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * scale).astype(dtype)
    y = rng.integers(0, c, n)
    w = rng.uniform(0.1, 2.0, c) if weighted else None
    problem, _ = build_softmax_ce(z, y, weight=w, label_smoothing=smoothing)
    fused, ref = _both(problem, np.arange(n))
    _assert_close(fused, ref, problem.grad_scale)


@needs_kernel
def test_exp_across_the_whole_range():
    """Two-class rows [0, x]: the loss of target 0 is log1p(exp(x)), so exp(x) itself for
    x < -40, down through the subnormals (x < -708) to zero (x < -745.2)."""
    x = -np.concatenate([np.linspace(0, 760, 20001), [708.39, 708.4, 744.4, 745.1, 745.2, 1e4]])
    z = np.stack([np.zeros_like(x), x], axis=1)
    problem, _ = build_softmax_ce(z, np.zeros(x.size, dtype=np.int64), reduction="sum")
    fused, _ = _both(problem, np.arange(x.size), grad=False, floor_coef=None)
    exact = np.log1p(np.exp(x))
    tiny = x < -40
    np.testing.assert_array_equal(fused.loss[tiny] == 0, exact[tiny] == 0)
    ulps = np.abs(fused.loss - exact) / np.spacing(np.maximum(exact, 5e-324))
    assert ulps.max() <= 1.0


@needs_kernel
def test_confident_row_keeps_relative_precision():
    """loss = log1p(sum of exp(z - m)) for a row 80 units sure: ~1e-35, not 0."""
    z = np.array([[0.0, -80.0, -81.0, -85.0]])
    problem, _ = build_softmax_ce(z, np.array([0]))
    fused, _ = _both(problem, np.arange(1))
    exact = np.log1p(np.exp(-80.0) + np.exp(-81.0) + np.exp(-85.0))
    assert abs(fused.loss[0] - exact) <= 2e-16 * exact


@needs_kernel
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_masked_rows_match_numpy_kernel(opt):
    """-inf logits (masks), also at the target (infinite loss) and under smoothing."""
    rng = np.random.default_rng(len(opt))
    N, C = 12, 37
    kw = dict(OPTIONS[opt])
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.0, 3.0, C)
        kw["weight"][[3, 4]] = 0.0
    z = rng.standard_normal((N, C)) * 5
    z[rng.random((N, C)) < 0.3] = -np.inf
    y = rng.integers(0, C, N)
    z[np.arange(N), y] = np.where(np.arange(N) == 4, -np.inf, z[np.arange(N), y])
    z[:, 0] = 1.0  # no row is all -inf
    if kw.get("ignore_index") == 0:
        y[4] = 0
    problem, _ = build_softmax_ce(z, y, **kw)
    fused, ref = _both(problem, np.arange(N))
    np.testing.assert_array_equal(np.isinf(fused.loss), np.isinf(ref.loss))
    finite = np.isfinite(ref.loss)
    scale = np.abs(ref.loss) + np.abs(ref.total_weight) * (1 + np.abs(ref.lse))
    assert np.all(np.abs(fused.loss[finite] - ref.loss[finite]) <= 4e-16 * scale[finite])
    row_scale = np.abs(ref.grad).max(axis=1, keepdims=True) + np.abs(ref.total_weight * problem.grad_scale)[:, None]
    assert np.all(np.abs(fused.grad - ref.grad) <= 4e-16 * row_scale)
    np.testing.assert_allclose(fused.floor, ref.floor, rtol=1e-13, atol=1e-300)


@needs_kernel
def test_nan_and_all_masked_rows_are_handed_back():
    z = np.zeros((3, 5))
    z[1, 2] = np.nan
    problem, _ = build_softmax_ce(z, np.array([0, 1, 2]))
    assert FusedKernel.plan(problem).evaluate(z, np.arange(3), grad=True) is None
    z[1] = -np.inf  # legal when ignored: the numpy kernel handles it
    problem, _ = build_softmax_ce(z, np.array([0, -100, 2]))
    assert FusedKernel.plan(problem).evaluate(z, np.arange(3), grad=True) is None
    ev = problem.evaluate(0, 3)
    assert np.all(ev.grad[1] == 0.0) and np.isfinite(ev.loss).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_streaming_comparison_reports_like_numpy(dtype, monkeypatch):
    """The kernel's folded comparison (sample mode) against the numpy comparison: the same
    verdict, mismatch count and worst entries, with planted errors of different sizes."""
    rng = np.random.default_rng(3)
    N, C = 64, 517
    z = (rng.standard_normal((N, C)) * 4).astype(dtype)
    y = rng.integers(0, C, N)
    g = reference(z.astype(np.float64), y).grad.astype(dtype)
    g[5, 7] *= 1.5
    g[40, y[40]] *= 1.2
    g[63, 516] = np.nan
    g[17, 3] = np.inf
    reports = {}
    for which in ("fused", "numpy"):
        monkeypatch.setenv("CE_CHECK_FUSED", "1" if which == "fused" else "0")
        reports[which] = check_grad(z, y, grad=g, fd="sample", worst=4)
    a, b = (next(c for c in reports[k].checks if c.name == "grad_vs_reference") for k in ("fused", "numpy"))
    assert not a.ok and not b.ok
    assert (a.mismatches, a.total, a.note) == (b.mismatches, b.total, b.note)
    assert [e.index for e in a.worst] == [e.index for e in b.worst]
    assert a.worst[0].index in {(63, 516), (17, 3)}
    for ea, eb in zip(a.worst, b.worst):
        assert ea.got == eb.got or (np.isnan(ea.got) and np.isnan(eb.got))
        assert abs(ea.expected - eb.expected) <= 1e-15 * abs(eb.expected) + 1e-300


@needs_kernel
def test_correct_gradient_passes_both_ways(monkeypatch):
    rng = np.random.default_rng(11)
    z = (rng.standard_normal((300, 2000)) * 3).astype(np.float32)
    y = rng.integers(0, 2000, 300)
    g = reference(z, y, label_smoothing=0.1).grad.astype(np.float32)
    for which in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", which)
        rep = check_grad(z, y, grad=g, label_smoothing=0.1, fd="sample")
        assert rep.ok, rep.checks


def test_report_names_the_kernel(monkeypatch):
    z = np.zeros((4, 3))
    y = np.array([0, 1, 2, 0])
    monkeypatch.setenv("CE_CHECK_FUSED", "0")
    assert check_grad(z, y).options["kernel"] == "numpy"
    monkeypatch.delenv("CE_CHECK_FUSED")
    expected = "compiled" if kernel() is not None else "numpy"
    assert check_grad(z, y).options["kernel"] == expected
    # probability targets are the numpy kernel's
    assert check_grad(z, np.full((4, 3), 1 / 3)).options["kernel"] == "numpy"


@needs_kernel
@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.bool_, ">f4", ">f8"])
def test_other_logit_dtypes_widen_exactly(dtype, monkeypatch):
    rng = np.random.default_rng(5)
    z = rng.integers(-20, 20, size=(9, 13)).astype(dtype)
    y = rng.integers(0, 13, 9)
    g = reference(z.astype(np.float64), y).grad
    reports = []
    for which in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", which)
        reports.append(check_grad(z, y, grad=g.astype(np.float32), fd="sample"))
    assert reports[0].ok and reports[1].ok
    assert abs(reports[0].loss - reports[1].loss) <= 1e-15 * abs(reports[1].loss)
