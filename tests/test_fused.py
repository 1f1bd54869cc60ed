"""The compiled kernel (ce_cli/kernels/_fused.c) against the numpy kernel it accelerates, on every
target this CPU runs, and its targets and thread counts against each other (bit for bit).

Both compute the same formulas; they differ only in exp (both below one ulp) and in the order
of the row sums, so row losses agree to ~1e-15 relative and gradients to ~1e-16 of the row's
scale. The comparison statistics the kernel folds in on the way (mismatch counts, the worst
entries) must give the same report as the numpy comparison.

With CI set in the environment nothing here skips for want of the kernel: a test that needs it
fails when it did not build or when this CPU should run a target that is missing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ce_cli
from ce_cli.verify.checks import check_grad, reference
from ce_cli.kernels.compiled import (FusedKernel, _Args, kernel, row_scan, target, targets,
                                     use_threads)
from ce_cli.kernels.numpy_softmax import softmax_rows
from ce_cli.models.semantics import Semantics
from ce_cli.models.softmax import build_softmax_ce


IN_CI = bool(os.environ.get("CI"))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    found = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    return set(found.group(1).split()) if found else set()


def _gcc_major() -> int:
    gcc = shutil.which("gcc")
    if gcc is None:
        return 0
    out = subprocess.run([gcc, "-dumpversion"], capture_output=True, text=True).stdout.strip()
    return int(out.split(".")[0]) if out.split(".")[0].isdigit() else 0


X86_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_V4 = X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# the targets built for this architecture, best first
ARCH_TARGETS = {"x86_64": ["avx512", "avx2", "sse2", "scalar"],
                "aarch64": ["neon", "scalar"]}.get(platform.machine(), ["scalar"])


def _expected_targets() -> list[str]:
    """The targets a build with gcc >= 12 must run on this CPU (from /proc/cpuinfo)."""
    flags, machine = _cpu_flags(), platform.machine()
    if machine == "x86_64":
        return ([t for t, need in (("avx512", X86_V4), ("avx2", X86_V3)) if need <= flags]
                + ["sse2", "scalar"])
    return ["neon", "scalar"] if machine == "aarch64" else ["scalar"]


def _fused_off() -> bool:
    return os.environ.get("CE_CHECK_FUSED", "").lower() in ("0", "off", "false", "no")


def _require_kernel() -> None:
    """Skip without the kernel, except under CI, where that is a failure."""
    if kernel() is not None:
        return
    why = ("CE_CHECK_FUSED turns the kernel off" if _fused_off() else
           "the compiled kernel did not build or does not run on this CPU "
           f"(CE_CHECK_TARGET={os.environ.get('CE_CHECK_TARGET', '')!r})")
    if IN_CI:
        pytest.fail(f"CI needs the compiled kernel: {why}")
    pytest.skip(why)


def test_kernel_is_built_where_it_can_run():
    """The README's install builds the kernel; it must load wherever gcc >= 12 exists, with every
    target this CPU can run (under CI: wherever, since .ci/run installs it)."""
    if not IN_CI and _gcc_major() < 12:
        pytest.skip("no gcc >= 12 here: the numpy kernel serves")
    if _fused_off():
        pytest.skip("CE_CHECK_FUSED turns the kernel off")
    built = [p.name for p in (Path(ce_cli.__file__).parent / "kernels").glob("_fused*.so")]
    assert built, "ce_cli/kernels/_fused*.so missing: install with pip install -e ."
    assert kernel() is not None
    missing = set(_expected_targets()) - set(targets())
    assert not missing, f"targets this CPU runs but the build lacks: {sorted(missing)} ({targets()})"


@pytest.fixture
def compiled_kernel():
    _require_kernel()


needs_kernel = pytest.mark.usefixtures("compiled_kernel")


@pytest.fixture(params=ARCH_TARGETS)
def on_target(request, monkeypatch):
    """Each target built for this architecture in turn (CE_CHECK_TARGET); one this CPU does not
    run is skipped, unless under CI the CPU should run it."""
    name = request.param
    monkeypatch.setenv("CE_CHECK_TARGET", name)
    if name not in targets():
        if IN_CI and (not targets() or name in _expected_targets()):
            pytest.fail(f"CI: target {name} should run on this CPU but is not built ({targets()})")
        pytest.skip(f"this CPU does not run target {name}")
    _require_kernel()
    assert target() == name
    return name


def _both(problem, rows, z_rows=None, grad=True, floor_coef=4 * 2.0**-23):
    z_rows = problem.z[rows[0]:rows[-1] + 1] if z_rows is None else z_rows
    fused = FusedKernel.plan(problem).evaluate(z_rows, rows, grad=grad, floor_coef=floor_coef)
    with np.errstate(invalid="ignore"):
        ref = softmax_rows(problem, z_rows, rows, grad=grad, floor_coef=floor_coef)
    return fused, ref


def _assert_close(fused, ref, scale_of_grad, grad=True, qz_size=0.0):
    """qz_size: sum |q (z - m)| of a row, the size of its dot product (probability targets)."""
    scale = np.abs(ref.loss) + np.abs(ref.total_weight) * (1 + np.abs(ref.lse)) + qz_size
    assert np.all(np.abs(fused.loss - ref.loss) <= 4e-16 * scale + 1e-300)
    # lse = m + log1p(s1) may cancel to near 0: its rounding is relative to |m| + log1p(s1)
    lse_size = np.abs(ref.row_max) + np.abs(ref.log1p_s1)
    assert np.all(np.abs(fused.lse - ref.lse) <= 1e-15 * lse_size + 1e-300)
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
def test_rows_match_numpy_kernel(C, dtype, opt, on_target):
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 6), c=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 30.0, 800.0, 1e4]),
    dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**32 - 1),
    smoothing=st.sampled_from([0.0, 0.05]), weighted=st.booleans(),
)
def test_rows_match_numpy_kernel_property(on_target, n, c, scale, dtype, seed, smoothing, weighted):
    """Any scale: rows whose exp underflows to subnormals and zero take the kernel's careful exp."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * scale).astype(dtype)
    y = rng.integers(0, c, n)
    w = rng.uniform(0.1, 2.0, c) if weighted else None
    problem, _ = build_softmax_ce(z, y, weight=w, label_smoothing=smoothing)
    fused, ref = _both(problem, np.arange(n))
    _assert_close(fused, ref, problem.grad_scale)


@needs_kernel
def test_exp_across_the_whole_range(on_target):
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
def test_confident_row_keeps_relative_precision(on_target):
    """loss = log1p(sum of exp(z - m)) for a row 80 units sure: ~1e-35, not 0."""
    z = np.array([[0.0, -80.0, -81.0, -85.0]])
    problem, _ = build_softmax_ce(z, np.array([0]))
    fused, _ = _both(problem, np.arange(1))
    exact = np.log1p(np.exp(-80.0) + np.exp(-81.0) + np.exp(-85.0))
    assert abs(fused.loss[0] - exact) <= 2e-16 * exact


@needs_kernel
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_masked_rows_match_numpy_kernel(opt, on_target):
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
@pytest.mark.parametrize("C", [1, 7, 8, 9, 15, 16, 17, 127, 128, 129, 1000, 1031])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_scan_matches_numpy(C, dtype, on_target):
    """The input checks' scan: np.sum's bits for the row sums, min and max skipping NaN (a row
    with a NaN and no +inf has a NaN maximum), on every target and row length."""
    rng = np.random.default_rng(C)
    q = (rng.random((7, C)) * 1.5 - 0.25).astype(dtype)
    q[1, -1] = np.nan
    q[2, C // 2], q[2, 0] = np.inf, np.nan
    q[3, -1] = -np.inf
    q[4, C // 3] = -0.0
    q[5] = np.nan
    q64 = q.astype(np.float64)
    with np.errstate(invalid="ignore"):
        want_sums = q64.sum(axis=1)
    has_nan = np.isnan(q64).any(axis=1)
    want_hi = np.fmax.reduce(q64, axis=1, initial=-np.inf)
    want_hi = np.where(has_nan & (want_hi != np.inf), np.nan, want_hi)
    for with_sums in (True, False):
        sums, lo, hi = row_scan(q, sums=with_sums)
        assert np.array_equal(lo, np.fmin.reduce(q64, axis=1, initial=np.inf))
        assert np.array_equal(hi, want_hi, equal_nan=True)
        assert sums is None if not with_sums else np.array_equal(sums, want_sums, equal_nan=True)
    assert row_scan(q.astype(np.float16)) is None and row_scan(np.repeat(q, 2, axis=1)[:, ::2]) is None


def test_nan_and_all_masked_rows_are_handed_back(on_target):
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
def test_streaming_comparison_reports_like_numpy(dtype, monkeypatch, on_target):
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
def test_correct_gradient_passes_both_ways(monkeypatch, on_target):
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
    # probability targets and binary too
    assert check_grad(z, np.full((4, 3), 1 / 3)).options["kernel"] == expected
    from ce_cli.verify.checks import check_binary
    assert check_binary(z, np.zeros((4, 3))).options["kernel"] == expected


@needs_kernel
@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.bool_, ">f4", ">f8"])
def test_other_logit_dtypes_widen_exactly(dtype, monkeypatch, on_target):
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


# ----------------------------------------------------------------------------- targets and threads


def _raw_call(z, g, y, *, w=None, smoothing=0.0, n_threads=1, detail=True, rtol=1e-3,
              stored=True):
    """ce_softmax_rows on the current target with every output requested (without the (R, C)
    allowed errors and ratios unless `detail`, without any (R, C) output unless `stored`):
    (return code, outputs)."""
    R, C = z.shape
    w64 = None if w is None else np.ascontiguousarray(w, dtype=np.float64)
    w_y = np.ones(R) if w is None else w64[y]
    inputs = {"alpha": (1 - smoothing) * w_y, "beta": np.full(R, smoothing / C),
              "ys": np.ascontiguousarray(y, dtype=np.int64), "active": np.ones(R, dtype=np.uint8),
              "work": np.empty(C + 8 + 2 * (C // 128 + 1))}
    out = {name: np.full(R, np.nan) for name in ("loss", "row_max", "log1p_s1", "ratio_max", "max_abs", "max_rel")}
    out.update({name: np.full(R, -1, dtype=np.int64) for name in ("mismatches", "nonfinite")})
    out.update({name: np.full((R, C), np.nan) for name in ("out_ref", "out_floor", "out_tol", "out_ratio")
                if detail or (stored and name in ("out_ref", "out_floor"))})
    args = _Args(n_rows=R, n_cols=C, z=z.ctypes.data, z_is_f32=int(z.dtype == np.float32),
                 g=g.ctypes.data, g_is_f32=int(g.dtype == np.float32),
                 w=None if w64 is None else w64.ctypes.data,
                 w_sum=float(C if w is None else w64.sum()), scale=1.0 / R, rtol=rtol, abs_tol=1e-12,
                 floor_coef=4 * 2.0**-23, n_threads=n_threads,
                 **{k: v.ctypes.data for k, v in {**inputs, **out}.items()})
    rc = kernel()(ctypes.byref(args))
    return rc, out


def _bits(out: dict) -> dict:
    return {k: v.view(np.uint64) if v.dtype == np.float64 else v for k, v in out.items()}


def _cases():
    """Rows of every kind the kernel serves: widths around the lane and block sizes, both
    dtypes, weights and smoothing, -inf masks, rows whose exp underflows, planted errors."""
    rng = np.random.default_rng(2024)
    for C, dtype, scale in [(1, np.float64, 1.0), (3, np.float32, 30.0), (9, np.float64, 1e3),
                            (127, np.float32, 3.0), (129, np.float64, 800.0), (1031, np.float32, 2.0),
                            (4099, np.float64, 40.0)]:
        R = 21
        z = (rng.standard_normal((R, C)) * scale).astype(dtype)
        if C > 8:
            z[rng.random((R, C)) < 0.1] = -np.inf
            z[:, 5] = 0.0
            z[3, 5:] = -np.inf
            z[4] = -np.inf   # a zero maximum of either sign
            z[4, [1, 6]] = [-0.0, 0.0]
        y = rng.integers(0, C, R)
        g = (rng.standard_normal((R, C)) * 1e-3).astype(dtype)
        g[0, 0] = np.nan
        w = rng.uniform(0.0, 2.0, C) if C % 2 else None
        yield f"C{C}-{np.dtype(dtype).name}", z, g, y, w, 0.1 if C % 3 else 0.0


@needs_kernel
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_targets_give_identical_bits(case, monkeypatch):
    """Every target this CPU runs, on the same rows: the same bits in every output."""
    _, z, g, y, w, smoothing = case
    runs = {}
    for name in targets():
        monkeypatch.setenv("CE_CHECK_TARGET", name)
        rc, out = _raw_call(z, g, y, w=w, smoothing=smoothing)
        assert rc == 0
        runs[name] = _bits(out)
    assert len(runs) >= 1
    first, *others = runs
    for name in others:
        for key in runs[first]:
            np.testing.assert_array_equal(runs[name][key], runs[first][key], err_msg=f"{name} vs {first}: {key}")


@needs_kernel
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("rtol", [1e-3, 0.0])
def test_skipped_divisions_change_no_statistic(case, rtol, on_target):
    """The comparison divides only where a quotient can change a row's statistics: the row
    statistics (max ratio, max |error|, max relative error, counts) are the same bits as when
    every entry is divided (which the (R, C) ratio output forces), for gradients near the
    reference (a float32 rounding, a few ulps, exactly equal) and far from it."""
    _, z, g, y, w, smoothing = case
    _, full = _raw_call(z, g.astype(np.float64), y, w=w, smoothing=smoothing, rtol=rtol)
    ref, tol = full["out_ref"], full["out_tol"]
    rng = np.random.default_rng(z.shape[1])
    C = z.shape[1]
    # errors of tol * (0.5 + j 2^-44) and tol * (1 + j 2^-52): every entry a new row maximum
    # by a hair, and mismatches decided in the last bits
    rising = ref + tol * (0.5 + np.arange(C) * 2.0**-44)
    edge = ref + tol * (1.0 + rng.integers(-3, 4, ref.shape) * 2.0**-52)
    near = [ref.astype(np.float32).astype(np.float64), ref.copy(),
            ref * (1 + rng.integers(-4, 5, ref.shape) * 2.0**-52), rising, edge, g]
    for k, got in enumerate(near):
        dt = z.dtype if k in (0, len(near) - 1) else np.float64
        got = np.ascontiguousarray(np.where(np.isfinite(got), got, 0.0) if k < 5 else got,
                                   dtype=dt)
        if k < 3 and got.size > 3:
            got.flat[::7] = got.flat[::7] * 1.5  # some entries far off
        _, every = _raw_call(z, got, y, w=w, smoothing=smoothing, rtol=rtol)
        for stored in (True, False):  # False: the comparison-only loop
            _, skipping = _raw_call(z, got, y, w=w, smoothing=smoothing, rtol=rtol, detail=False,
                                    stored=stored)
            for key in ("ratio_max", "max_abs", "max_rel", "mismatches", "nonfinite", "loss"):
                np.testing.assert_array_equal(_bits(skipping)[key], _bits(every)[key],
                                              err_msg=f"gradient {k}, stored {stored}: {key}")


@needs_kernel
@pytest.mark.parametrize("C", [1, 2, 3, 15, 16, 17, 31, 32, 33, 100, 1031])
def test_float32_rows_give_the_bits_of_their_float64_widening(C, on_target):
    """Float32 rows scan for max, min and the first arg-max in float32 lanes: the same bits as
    the same values in float64, with ties at the maximum (a zero of either sign included),
    -inf masks, rows whose exp underflows; a NaN or +inf anywhere hands the row back."""
    rng = np.random.default_rng(C)
    R = 24
    z = (rng.standard_normal((R, C)) * 3).astype(np.float32)
    z[rng.random((R, C)) < 0.2] = -np.inf
    z[:, -1] = 0.0
    top = np.float32(7.5)
    for r in range(1, 8):  # the maximum repeated at random places, first one anywhere
        z[r, rng.integers(0, C, r)] = top
    z[8] = np.where(rng.random(C) < 0.5, np.float32(-0.0), np.float32(0.0))
    z[9] = z[9] * 1000  # exp(z - m) underflows
    z[10, :-1] = -np.inf  # all masked but one
    z[11, :] = -np.inf  # all masked: handed back, like a NaN
    g = (rng.standard_normal((R, C)) * 1e-3).astype(np.float32)
    y = rng.integers(0, C, R)
    assert _raw_call(z, g, y)[0] == _raw_call(z.astype(np.float64), g, y)[0] == 12
    z[11, -1] = 0.0
    rc32, out32 = _raw_call(z, g, y)
    rc64, out64 = _raw_call(z.astype(np.float64), g, y)
    assert rc32 == rc64 == 0
    for key in out64:
        np.testing.assert_array_equal(_bits(out32)[key], _bits(out64)[key], err_msg=key)
    for bad in (np.nan, np.inf):
        for col in sorted({0, C // 2, C - 1}):
            zb = z.copy()
            zb[5, col] = bad
            assert _raw_call(zb, g, y)[0] == 6, (bad, col)


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_counts_give_identical_bits(dtype, on_target):
    """1, 2, 3 and 8 threads; 400 x 1031: threads claim 63 rows at a time (CLAIM_ENTRIES), seven
    claims shared out in whatever order the threads run."""
    rng = np.random.default_rng(7)
    R, C = 400, 1031
    z = (rng.standard_normal((R, C)) * 5).astype(dtype)
    y = rng.integers(0, C, R)
    g = (rng.standard_normal((R, C)) * 1e-4).astype(dtype)
    w = rng.uniform(0.5, 1.5, C)
    runs = []
    for n in (1, 2, 3, 8):
        rc, out = _raw_call(z, g, y, w=w, smoothing=0.05, n_threads=n)
        assert rc == 0
        runs.append(_bits(out))
    for other in runs[1:]:
        for key in runs[0]:
            np.testing.assert_array_equal(other[key], runs[0][key], err_msg=key)


STEP_CASES = {**OPTIONS, "probs": {}, "probs-f32": {},
              "z_loss+weights": {"weight": "w", "sem": {"z_loss": 1e-3}},
              "scale+sample_weight": {"sem": {"logit_scale": 0.37, "sample_weight": "s"}},
              "softcap+all+smoothing": {"label_smoothing": 0.1,
                                        "sem": {"softcap": 1.5, "logit_scale": 0.3, "z_loss": 0.2,
                                                "sample_weight": "s"}},
              "probs+softcap": {"sem": {"softcap": 30.0}}}


@needs_kernel
@pytest.mark.parametrize("C", [1, 2, 9, 129, 1031])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_losses_are_the_bits_of_the_perturbed_row(C, dtype, case, on_target):
    """The finite differences' steps (`steps`: a row's loss with one entry set, from the row's
    own exps and block sums) give the bits of that row evaluated whole with the entry set
    (`perturb`), and NaN exactly where they are not taken: the arg-max, a value not below the
    row's maximum, column -1. Values down to -inf and past exp's underflow, the target entry,
    masked rows, partial blocks and groups, training-code terms (z = T(x) for a logit scale
    and a soft-cap: both keep the order of x), 1 and 2 threads."""
    rng = np.random.default_rng(C + len(case))
    N = 9
    kw = dict(STEP_CASES[case])
    sem = dict(kw.pop("sem", {}))
    if sem.get("sample_weight") == "s":
        sem["sample_weight"] = rng.uniform(-0.5, 2.5, N)
    if sem:
        kw["semantics"] = Semantics(**sem)
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.5, 3.0, C)
        kw["weight"][0] = 0.0 if C > 2 else 1.0
    # rows 3, 4 and 8 spread past exp's normal range: their exps take the two-step path
    scales = np.array([0.01, 3.0, 40.0, 300.0, 1e3, 0.01, 3.0, 40.0, 300.0])[:, None]
    z = (rng.standard_normal((N, C)) * scales).astype(dtype)
    z[1, ::3] = -np.inf
    z[1, 0] = 0.5
    if case.startswith("probs"):
        q = rng.random((N, C))
        q[2, 1::2] = 0.0
        q = q / q.sum(axis=1, keepdims=True)
        target = q.astype(np.float32) if case == "probs-f32" else q
    else:
        target = rng.integers(0, C, N)
    problem, _ = build_softmax_ce(z, target, **kw)
    kern = FusedKernel.plan(problem)
    rows = np.arange(N)
    zd = z.astype(np.float64)
    am = zd.argmax(axis=1)
    y = problem.target_columns(rows)
    cols = np.stack([am, y, rng.integers(0, C, N), rng.integers(0, C, N), rng.integers(0, C, N),
                     rng.integers(0, C, N), np.full(N, -1), rng.integers(0, C, N)], axis=1)
    m = zd.max(axis=1)
    zc = np.where(cols >= 0, zd[rows[:, None], np.maximum(cols, 0)], 0.0)
    h = 6e-6 * np.maximum(1.0, np.abs(zc))
    with np.errstate(invalid="ignore"):  # -inf +- inf at masked entries: set to 0 below
        vals = np.stack([zc[:, 0] - h[:, 0], zc[:, 1] + h[:, 1], zc[:, 2] - h[:, 2],
                         m - 800.0, np.full(N, -np.inf), m, zc[:, 6], m + 1.0], axis=1)
    vals = np.where(np.isnan(vals), 0.0, vals)
    # taken where the step's z = T(x) is below the row's maximum and not at its (first)
    # arg-max, in z: a soft-cap saturates, tying entries x does not (numpy's tanh, a few ulps
    # from the kernel's: a step within 1e-12 of the maximum may go either way)
    cap, S = sem.get("softcap"), sem.get("logit_scale", 1.0)
    with np.errstate(invalid="ignore"):
        zt, vt = (cap * np.tanh(S * x / cap) if cap else S * x for x in (zd, vals))
    am_t, m_t = zt.argmax(axis=1), zt.max(axis=1)[:, None]
    near = np.abs(vt - m_t) <= (1e-12 * cap if cap else 0.0)
    other = (cols >= 0) & (cols != am_t[:, None])
    taken, either = other & (vt < m_t) & ~near, other & near
    for threads in (1, 2):
        with use_threads(threads):
            ev = kern.evaluate(z, rows, steps=(cols, vals))
        got = ev.step_loss
        assert got is not None
        np.testing.assert_array_equal(np.isnan(got) | either, ~taken)
        r, j = np.nonzero(~np.isnan(got))  # those rows evaluated whole with the entry set
        whole = kern.evaluate(z[r], rows[r], perturb=(cols[r, j], vals[r, j]))
        assert whole is not None
        np.testing.assert_array_equal(got[r, j].view(np.uint64), whole.loss.view(np.uint64))


@needs_kernel
@pytest.mark.parametrize("bad_rows", [[45], [50, 12], [0], [399], [390, 70], [130, 300, 129]])
def test_threads_hand_back_the_first_bad_row(bad_rows):
    """Whichever thread claims which rows (63 a claim here), the first bad row is reported."""
    rng = np.random.default_rng(1)
    R, C = 400, 1031
    z = rng.standard_normal((R, C))
    for r in bad_rows:
        z[r, 17] = np.nan
    y = rng.integers(0, C, R)
    for n in (1, 2, 3, 8):
        rc, _ = _raw_call(z, np.zeros_like(z), y, n_threads=n)
        assert rc == min(bad_rows) + 1


def test_target_selection(monkeypatch):
    monkeypatch.setenv("CE_CHECK_TARGET", "no-such-target")
    assert kernel() is None and target() == "numpy"
    monkeypatch.setenv("CE_CHECK_FUSED", "0")
    monkeypatch.delenv("CE_CHECK_TARGET")
    assert target() == "numpy"
    monkeypatch.delenv("CE_CHECK_FUSED")
    if targets():
        assert target() == targets()[0]  # the best by default
    elif IN_CI:
        pytest.fail("CI needs the compiled kernel: it did not build")


def test_default_threads(monkeypatch):
    from ce_cli.kernels.compiled import cpu_count, default_threads
    monkeypatch.delenv("CE_CHECK_THREADS", raising=False)
    assert 1 <= default_threads() == cpu_count() <= (os.cpu_count() or 1)
    monkeypatch.setenv("CE_CHECK_THREADS", "3")
    assert default_threads() == 3


# ---------------------------------------------------------------- sigmoid BCE, probability targets

def _unit_funcs(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(-|x|) and log1p of it as target `name`'s row kernels compute them."""
    from ce_cli.kernels.compiled import _library
    fn = _library().ce_unit_funcs_on
    fn.argtypes = [ctypes.c_char_p] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    x = np.ascontiguousarray(x, dtype=np.float64)
    e, l1 = np.empty_like(x), np.empty_like(x)
    assert fn(name.encode(), x.ctypes.data, e.ctypes.data, l1.ctypes.data, x.size) == 0
    return e, l1


@needs_kernel
def test_log1p_below_one_ulp(on_target):
    """The kernel's log1p on [0, 1] (fdlibm's algorithm) against log(1 + e) to 40 digits: below
    one ulp (0.77 measured), and within one ulp of numpy's log1p (glibc)."""
    from decimal import Decimal, localcontext
    rng = np.random.default_rng(5)
    x = np.concatenate([np.linspace(0, 40, 4001), rng.uniform(0, 1, 2000),
                        10.0 ** rng.uniform(-300, 0, 1000), [0.34657359027997264, 745.2, np.inf]])
    e, l1 = _unit_funcs(on_target, x)
    np.testing.assert_array_equal(e, np.where(np.isinf(x), 0.0, e))
    with localcontext() as ctx:
        ctx.prec = 40
        exact = [(Decimal(1) + Decimal(float(v))).ln() for v in e]
        ulps = [abs((Decimal(float(a)) - b) / Decimal(np.spacing(float(b)))) if b else abs(a)
                for a, b in zip(l1, exact)]
    assert float(max(ulps)) < 1.0
    assert np.all(np.abs(l1 - np.log1p(e)) <= np.spacing(np.log1p(e)))


@needs_kernel
def test_sigmoids_within_three_ulps(on_target):
    """s(x) and s(-x) as the BCE kernel forms them (r = 1/(1 + e) and e r, e = exp(-|x|)),
    read off the gradient of a sum with labels 0 (g = s(x)) and 1 (g = -s(-x)), against
    1/(1 + exp(-x)) to 40 digits: within 3 ulp (2.6 measured over 10^6 points)."""
    from decimal import Decimal, localcontext
    from ce_cli.models.sigmoid import build_sigmoid_bce
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.uniform(-40, 40, 3000), rng.standard_normal(3000) * 3,
                        np.sign(rng.standard_normal(1000)) * 10.0 ** rng.uniform(-20, 2.8, 1000),
                        [0.0, -0.0, 1e-300, -1e-300, 36.7, -36.7, 700.0, -700.0]])
    x = np.concatenate([x, np.zeros(-x.size % 100)]).reshape(-1, 100)
    got = []
    for label in (0.0, 1.0):
        problem = build_sigmoid_bce(x, np.full_like(x, label), reduction="sum")[0]
        got.append(problem.kernel.evaluate(x, np.arange(x.shape[0]), grad=True).grad.ravel())
    with localcontext() as ctx:
        ctx.prec = 40
        for v, s_pos, s_neg in zip(x.ravel().tolist(), got[0].tolist(), (-got[1]).tolist()):
            for s, arg in ((s_pos, v), (s_neg, -v)):
                exact = 1 / (1 + (-Decimal(arg)).exp())
                assert abs(Decimal(s) - exact) <= 3 * Decimal(np.spacing(float(exact))), (v, s)


def _bce_problem(K: int, dtype, opt: str, seed: int = 0, R: int = 19):
    from ce_cli.models.sigmoid import build_sigmoid_bce
    rng = np.random.default_rng(seed + K)
    x = (rng.standard_normal((R, K)) * rng.choice([0.01, 3.0, 40.0, 800.0], size=(R, 1))).astype(dtype)
    if K > 3:
        x[rng.random((R, K)) < 0.05] = -np.inf
    y = (rng.random((R, K)) < 0.3).astype(np.float64)
    kw: dict = {}
    if "soft" in opt:
        y[::2] = rng.random((len(y[::2]), K))
    if "pw" in opt:
        kw["pos_weight"] = rng.uniform(0.2, 4.0, K)
    if "w" in opt.split("+"):
        kw["weight"] = rng.uniform(-1.0, 2.0, (R, K))
        kw["weight"][:, 0] = 0.0
    if "sum" in opt:
        kw["reduction"] = "sum"
    return build_sigmoid_bce(x, y, **kw)[0]


BCE_OPTIONS = ["plain", "pw", "w+pw", "soft", "soft+w+sum"]


@needs_kernel
@pytest.mark.parametrize("K", [1, 2, 7, 8, 9, 129, 1031])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("opt", BCE_OPTIONS)
def test_binary_rows_match_numpy_kernel(K, dtype, opt, on_target):
    """Per-element losses within 3 ulps of numpy's (exp and log1p each < 1 ulp, no
    cancellation); row sums, gradient and floor within a few ulps of their terms' size."""
    from ce_cli.kernels.numpy_sigmoid import sigmoid_rows
    problem = _bce_problem(K, dtype, opt)
    rows = np.arange(problem.n_rows)
    coef = 4 * 2.0**-23
    fused = problem.kernel.evaluate(problem.z, rows, grad=True, floor_coef=coef)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = sigmoid_rows(problem, problem.z, rows, grad=True, floor_coef=coef)
    np.testing.assert_array_equal(fused.item_weight, ref.item_weight)
    np.testing.assert_array_equal(np.isinf(fused.items), np.isinf(ref.items))
    fin = np.isfinite(ref.items)
    assert np.all(np.abs(fused.items[fin] - ref.items[fin]) <= 3 * np.spacing(np.abs(ref.items[fin])))
    size = np.where(fin, np.abs(ref.items), 0).sum(axis=1)
    finite_rows = np.isfinite(ref.loss)
    assert np.all(np.abs(fused.loss[finite_rows] - ref.loss[finite_rows])
                  <= 1e-15 * size[finite_rows] + 1e-300)
    np.testing.assert_allclose(fused.total_weight, ref.total_weight, rtol=1e-15, atol=0)
    y, w, pw = problem.coefficients(rows)
    pos = np.abs(y if pw is None else pw * y)
    term = (np.abs(1 - y) + pos) * (1.0 if w is None else np.abs(w)) * problem.grad_scale
    assert np.all(np.abs(fused.grad - ref.grad) <= 6e-16 * term + 2.0**-1070)
    np.testing.assert_allclose(fused.floor, ref.floor, rtol=1e-15, atol=1e-300)


PROB_OPTIONS: dict[str, dict] = {k: OPTIONS[k] for k in ("plain", "weights", "smoothing",
                                                          "weights+smoothing+sum")}


def _prob_problem(C: int, dtype, opt: str, seed: int = 0, R: int = 17, masks: bool = False):
    rng = np.random.default_rng(seed + C)
    kw = dict(PROB_OPTIONS[opt])
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.0, 3.0, C)
    z = (rng.standard_normal((R, C)) * rng.choice([0.01, 3.0, 40.0], size=(R, 1))).astype(dtype)
    q = rng.dirichlet(np.full(C, 0.3), R)
    q[rng.random((R, C)) < 0.2] = 0.0
    q[:, 0] += 1e-3
    q /= q.sum(axis=1, keepdims=True)
    if masks and C > 2:
        z[(rng.random((R, C)) < 0.3) & (q == 0)] = -np.inf
    return build_softmax_ce(z, q, **kw)[0]


@needs_kernel
@pytest.mark.parametrize("C", [1, 2, 7, 9, 129, 1031])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("opt", list(PROB_OPTIONS))
@pytest.mark.parametrize("masks", [False, True])
def test_probability_rows_match_numpy_kernel(C, dtype, opt, masks, on_target):
    problem = _prob_problem(C, dtype, opt, masks=masks)
    assert problem.target_kind == "probability" and problem.kernel is not None
    rows = np.arange(problem.n_rows)
    fused, ref = _both(problem, rows)
    # smoothing puts weight on masked (-inf) logits: an infinite loss, in both kernels
    np.testing.assert_array_equal(np.isinf(fused.loss), np.isinf(ref.loss))
    fused, ref = (replace(ev, loss=np.where(np.isinf(ev.loss), 0.0, ev.loss)) for ev in (fused, ref))
    q = problem.targets(rows)[0]
    with np.errstate(invalid="ignore"):
        qz = np.where(q != 0, np.abs(q * (problem.z.astype(np.float64) - ref.row_max[:, None])), 0)
    _assert_close(fused, ref, problem.grad_scale, qz_size=qz.sum(axis=1))


def _bits_of(ev) -> dict:
    return {k: np.asarray(getattr(ev, k)).view(np.uint64)
            for k in ("loss", "grad", "floor", "total_weight", "items", "item_weight", "lse")
            if getattr(ev, k) is not None}


@needs_kernel
@pytest.mark.parametrize("kind", ["binary", "probability"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_and_probability_bits_across_targets_and_threads(kind, dtype, monkeypatch):
    """Every target this CPU runs and 1, 2, 3 threads (60 x 1031: enough for 3): same bits."""
    assert_same_bits(monkeypatch, lambda: (
        _bce_problem(1031, dtype, "soft+w+sum", R=60) if kind == "binary"
        else _prob_problem(1031, dtype, "weights+smoothing+sum", R=60, masks=True)), _bits_of)


def assert_same_bits(monkeypatch, make, bits) -> None:
    """`bits` of the first 60 rows of `make()`'s problem (gradient and floor asked for) are the
    same on every target this CPU runs at 1, 2 and 3 threads."""
    runs = {}
    for name in targets():
        for n in (1, 2, 3):
            monkeypatch.setenv("CE_CHECK_TARGET", name)
            monkeypatch.setenv("CE_CHECK_THREADS", str(n))
            problem = make()
            assert problem.kernel.fn.target == name
            runs[name, n] = bits(problem.kernel.evaluate(
                problem.z, np.arange(60), grad=True, floor_coef=1e-7))
    first, *others = runs
    for key in others:
        for field in runs[first]:
            np.testing.assert_array_equal(runs[key][field], runs[first][field], err_msg=f"{key}: {field}")


@needs_kernel
@pytest.mark.parametrize("K", [9, 100])
def test_binary_nan_and_inf_rows_are_handed_back(K, on_target):
    problem = _bce_problem(K, np.float64, "plain", R=4)
    for col in (3, K - 1):
        for bad in (np.nan, np.inf):
            z = np.array(problem.z)
            z[2, col] = bad
            assert problem.kernel.evaluate(z, np.arange(4), grad=True) is None
            assert problem.kernel.evaluate(z, np.arange(4), grad=False) is None


@needs_kernel
@pytest.mark.parametrize("kind", ["binary", "probability"])
def test_binary_and_probability_comparison_reports_like_numpy(kind, monkeypatch, on_target):
    """The folded comparison of `binary` and probability targets against numpy's: same verdict,
    counts and worst entries, with planted errors."""
    from ce_cli.verify.checks import check_binary
    rng = np.random.default_rng(9)
    N, C = 48, 301
    z = (rng.standard_normal((N, C)) * 4).astype(np.float32)
    if kind == "binary":
        y = (rng.random((N, C)) < 0.2).astype(np.float32)
        g = ((1 / (1 + np.exp(-z.astype(np.float64))) - y) / y.size).astype(np.float32)
    else:
        y = rng.dirichlet(np.ones(C), N)
        g = reference(z.astype(np.float64), y).grad.astype(np.float32)
    g[5, 7] *= 1.5
    g[40, 100] *= 1.2
    g[47, 300] = np.nan
    reports = {}
    for which in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", which)
        check = check_binary if kind == "binary" else check_grad
        reports[which] = check(z, y, grad=g, fd="sample", worst=4)
    a, b = (next(c for c in reports[k].checks if c.name == "grad_vs_reference") for k in ("1", "0"))
    assert reports["1"].options["kernel"] == "compiled" and reports["0"].options["kernel"] == "numpy"
    assert not a.ok and not b.ok
    assert (a.mismatches, a.total, a.note) == (b.mismatches, b.total, b.note)
    assert [e.index for e in a.worst] == [e.index for e in b.worst]
    for ea, eb in zip(a.worst, b.worst):
        assert abs(ea.expected - eb.expected) <= 1e-15 * abs(eb.expected) + 1e-300


def bce_grad_floor(z, e, y, pw, w, scale, floor_coef=1e-7):
    """numpy_sigmoid's gradient and floor formulas, in its order, on a given e = exp(-|z|),
    with e/(1 + e) formed as the kernel does (`w`: element weights or None)."""
    pos = y if pw is None else pw * y
    with np.errstate(invalid="ignore"):
        large = 1.0 / (1.0 + e)
        small = e * large  # the kernel's one division: e/(1 + e) as e r
    s_pos, s_neg = np.where(z >= 0, large, small), np.where(z >= 0, small, large)
    g = ((1.0 - y) * s_pos - pos * s_neg) * (scale if w is None else w * scale)
    c_s = s_pos if pw is None else (1.0 + np.abs(pos)) * s_pos  # 1 + pw y rounds in PyTorch's
    floor = floor_coef * scale * (c_s + np.abs(pos) + np.abs(1.0 - y))  # |1 - y|: 1 - s(-x)
    return g, (floor if w is None else floor * np.abs(w))


@needs_kernel
@pytest.mark.parametrize("opt", ["plain", "pw"])
def test_binary_gradient_bits_from_the_kernels_exp(opt, on_target):
    """The BCE gradient and floor, entry by entry, are numpy's formulas in the same order on
    the kernel's own e = exp(-|x|)."""
    problem = _bce_problem(1031, np.float64, opt, R=23)
    z = np.asarray(problem.z)
    ev = problem.kernel.evaluate(z, np.arange(23), grad=True, floor_coef=1e-7)
    y = np.asarray(problem.targets, dtype=np.float64)
    e = _unit_funcs(on_target, z.ravel())[0].reshape(z.shape)
    g, floor = bce_grad_floor(z, e, y, problem.pos_weight, None, problem.grad_scale)
    np.testing.assert_array_equal(ev.grad.view(np.uint64), g.view(np.uint64))
    np.testing.assert_array_equal(ev.floor.view(np.uint64), floor.view(np.uint64))


@needs_kernel
@pytest.mark.parametrize("label_dtype", [np.float32, np.float64, np.bool_, np.int64, np.float16])
def test_binary_labels_any_dtype_same_bits(label_dtype, on_target):
    """Labels reach the kernel in their own width (float32 stays float32): the same bits as
    float64 labels."""
    from ce_cli.models.sigmoid import build_sigmoid_bce
    rng = np.random.default_rng(4)
    z = rng.standard_normal((19, 301)) * 3
    y = rng.random((19, 301)) < 0.3
    runs = []
    for dt in (np.float64, label_dtype):
        problem = build_sigmoid_bce(z, y.astype(dt))[0]
        runs.append(_bits_of(problem.kernel.evaluate(z, np.arange(19), grad=True, floor_coef=1e-7)))
    for key in runs[0]:
        np.testing.assert_array_equal(runs[1][key], runs[0][key], err_msg=key)


@needs_kernel
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_binary_loss_check_with_gradient_like_numpy(reduction, monkeypatch, on_target):
    """With a gradient, the streaming pass defers the per-element losses (the loss check asks
    for them): the loss check reports as with the numpy kernel, planted errors included."""
    from ce_cli.verify.checks import check_binary
    rng = np.random.default_rng(12)
    z = (rng.standard_normal((37, 211)) * 4).astype(np.float32)
    y = (rng.random((37, 211)) < 0.2).astype(np.float32)
    from ce_cli.models.sigmoid import build_sigmoid_bce
    problem = build_sigmoid_bce(z.astype(np.float64), y, reduction=reduction)[0]
    ev = problem.evaluate(0, 37)
    loss = ev.items if reduction == "none" else problem.reduce(float(ev.loss.sum()))
    g = ev.grad.astype(np.float32)
    if reduction == "none":
        loss = loss.copy()
        loss[3, 5] *= 1.01
    else:
        loss *= 1.01
    reports = {}
    for which in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", which)
        reports[which] = check_binary(z, y, grad=g, loss=loss, reduction=reduction, fd="off", worst=3)
    a, b = (next(c for c in reports[k].checks if c.name == "loss_vs_reference") for k in ("1", "0"))
    assert reports["1"].options["kernel"] == "compiled"
    assert not a.ok and not b.ok
    assert (a.mismatches, a.total) == (b.mismatches, b.total)
    assert a.worst[0].index == b.worst[0].index == ((3, 5) if reduction == "none" else ())


def _kernel_order_sum(v: np.ndarray) -> float:
    """The BCE kernel's row sum: blocks of 128 entries, entry i of a block into accumulator
    i % 8, ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), then ce_pairwise over blocks."""
    blocks = []
    for b0 in range(0, v.size, 128):
        acc = [0.0] * 8
        for i, x in enumerate(v[b0:b0 + 128].tolist()):
            acc[i % 8] += x
        blocks.append(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])))
    n = len(blocks)
    while n > 1:
        h = n // 2
        for i in range(h):
            blocks[i] = blocks[2 * i] + blocks[2 * i + 1]
        if n % 2:
            blocks[h] = blocks[n - 1]
        n -= h
    return blocks[0] if blocks else 0.0


@needs_kernel
@pytest.mark.parametrize("K", [1, 7, 31, 32, 33, 127, 128, 129, 160, 1031, 4100])
def test_binary_row_sums_in_the_documented_order(K, on_target):
    """Row loss and Q are the kernel's own per-element values summed in its documented order,
    to the bit, at every step, tail and block boundary."""
    problem = _bce_problem(K, np.float64, "w+pw", R=3)
    ev = problem.kernel.evaluate(problem.z, np.arange(3), grad=True)
    for r in range(3):
        if np.isfinite(ev.loss[r]):
            assert ev.loss[r] == _kernel_order_sum(ev.items[r])
        assert ev.total_weight[r] == _kernel_order_sum(ev.item_weight[r])


class _RowStats:
    """A RowStats that keeps what the kernel folds into it."""

    extra_atol = 0.0
    flush = None

    def __init__(self, tol) -> None:
        self.tol = tol

    def update_summary(self, row0, n_entries, rowmax, mismatches, nonfinite, max_abs, max_rel,
                       open_rows, got, flushed=None) -> None:
        self.rowmax, self.mismatches = rowmax.copy(), mismatches.copy()


@needs_kernel
@pytest.mark.parametrize("opt", ["plain", "w+pw"])
def test_binary_kernel_writes_only_what_is_asked(opt, on_target):
    """A loss-only call (the finite differences') writes no (R, C) arrays and gives the full
    call's loss and weight bits; per_element() of it fails loudly. The streaming pass writes
    neither gradient nor floor, and its deferred per-element losses are the full call's."""
    from ce_cli.verify.tolerance import resolve_tolerance
    problem = _bce_problem(129, np.float64, opt, R=7)
    rows = np.arange(7)
    full = problem.kernel.evaluate(problem.z, rows, grad=True, floor_coef=1e-7)
    only = problem.kernel.evaluate(problem.z, rows, grad=False)
    assert only.grad is None and only.floor is None and only.items is None
    for key in ("loss", "total_weight"):
        np.testing.assert_array_equal(_bits_of(only)[key], _bits_of(full)[key], err_msg=key)
    with pytest.raises(ValueError, match="per-element losses"):
        only.per_element()
    stats = _RowStats(resolve_tolerance(np.dtype(np.float32)))
    streamed = problem.kernel.evaluate(problem.z, rows, cmp=stats,
                                       g_rows=full.grad.astype(np.float32))
    assert streamed.grad is None and streamed.floor is None and streamed.items is None
    assert stats.mismatches.sum() == 0 and 0 < stats.rowmax.max() <= 1
    items, weight = streamed.per_element()
    np.testing.assert_array_equal(items.view(np.uint64), full.items.view(np.uint64))
    np.testing.assert_array_equal(weight, full.item_weight)


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_probability_rows_read_q_in_their_width_with_numpys_sums(dtype, on_target):
    """Probability targets without smoothing or weights reach the kernel as they are; their
    row sums Q, made by the input check's scan or by the kernel in numpy's pairwise order, are
    q.sum(axis=1)'s bits (every leaf and split size of numpy's algorithm, signed zeros), and
    every output is the bits of the float64 q with numpy's sums."""
    rng = np.random.default_rng(21)
    for C in [1, 5, 7, 8, 9, 16, 127, 128, 129, 136, 255, 256, 257, 1000, 1031, 4099]:
        R = 9
        z = (rng.standard_normal((R, C)) * 3).astype(np.float32)
        q = (rng.standard_normal((R, C)) * 10.0 ** rng.uniform(-4, 4, (R, C))).astype(dtype)
        q[0] = -0.0
        q[1, ::3] = 0.0
        checked = build_softmax_ce(z, q)[0]
        q64 = np.asarray(q, dtype=np.float64)
        for problem, here in ((checked, 0), (replace(checked, q_sums=None), 1)):
            kern = problem.kernel
            rows = np.arange(R)
            params = kern._targets(rows)
            assert params["q_sum_here"] == here
            assert params["q"].dtype == (np.float64 if dtype == np.float64 else np.float32)
            ev = kern.evaluate(z, rows, grad=True, floor_coef=1e-7)
            np.testing.assert_array_equal(ev.total_weight.view(np.uint64),
                                          q64.sum(axis=1).view(np.uint64), err_msg=f"C={C}")
        # the same rows with q as float64 and numpy's sums given
        old = kern._targets
        kern._targets = lambda r: {"q": q64[r], "q_total": q64[r].sum(axis=1),
                                   "active": np.ones(len(r), dtype=np.uint8)}
        try:
            ref = kern.evaluate(z, rows, grad=True, floor_coef=1e-7)
        finally:
            kern._targets = old
        for key, value in _bits_of(ref).items():
            np.testing.assert_array_equal(_bits_of(ev)[key], value, err_msg=f"C={C}: {key}")


@needs_kernel
@pytest.mark.parametrize("C", [2, 9, 129, 1031])
@pytest.mark.parametrize("sem", [{"smoothing_form": "others"}, {"denominator": 7.5},
                                 {"smoothing_form": "others", "denominator": 3.0}],
                         ids=lambda s: "+".join(s))
def test_denominator_and_others_smoothing_run_compiled(C, sem, on_target):
    """`denominator` (only the gradient's scale) and smoothing form 'others' (another alpha and
    beta per row) are the plain formulas: the compiled kernel serves them, within the same
    bounds of the numpy kernel as every plain option."""
    from ce_cli.models.semantics import Semantics
    rng = np.random.default_rng(C)
    N = 23
    z = rng.standard_normal((N, C)) * rng.choice([0.01, 3.0, 40.0], size=(N, 1))
    y = rng.integers(0, C, N)
    problem, _ = build_softmax_ce(z, y, weight=rng.uniform(0.0, 3.0, C), label_smoothing=0.2,
                                  ignore_index=0, reduction="sum", semantics=Semantics(**sem))
    assert problem.kernel is not None
    fused, ref = _both(problem, np.arange(N))
    _assert_close(fused, ref, problem.grad_scale)


@needs_kernel
def test_denominator_and_others_smoothing_report_like_numpy(monkeypatch, on_target):
    rng = np.random.default_rng(8)
    z = (rng.standard_normal((40, 301)) * 3).astype(np.float32)
    y = rng.integers(0, 301, 40)
    kw = dict(label_smoothing=0.1, smoothing_form="others", denominator=50.0, reduction="sum")
    from ce_cli.models.semantics import Semantics
    problem = build_softmax_ce(z.astype(np.float64), y, label_smoothing=0.1, reduction="sum",
                               semantics=Semantics(smoothing_form="others", denominator=50.0))[0]
    g = problem.evaluate(0, 40).grad.astype(np.float32)
    g[7, 11] *= 1.5
    reports = {}
    for which in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", which)
        reports[which] = check_grad(z, y, grad=g, fd="sample", worst=3, **kw)
    a, b = (next(c for c in reports[k].checks if c.name == "grad_vs_reference") for k in ("1", "0"))
    assert reports["1"].options["kernel"] == "compiled" and reports["0"].options["kernel"] == "numpy"
    assert not a.ok and not b.ok
    assert (a.mismatches, a.total) == (b.mismatches, b.total)
    assert a.worst[0].index == b.worst[0].index == (7, 11)


def _in_place_case(case: str):
    """(problem, gradient rows) of one chunk-plan case."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((6, 50)).astype(np.float32)
    y = rng.integers(0, 50, 6)
    g = np.zeros_like(z)
    q = rng.dirichlet(np.ones(50), 6).astype(np.float32)
    if case == "float16 logits":
        return build_softmax_ce(z.astype(np.float16), y)[0], g
    if case == "float16 gradient":
        return build_softmax_ce(z, y)[0], g.astype(np.float16)
    if case == "strided gradient":
        return build_softmax_ce(z, y)[0], np.zeros((6, 100), dtype=np.float32)[:, ::2]
    if case == "no gradient":
        return build_softmax_ce(z, y)[0], None
    if case == "smoothed probabilities":
        return build_softmax_ce(z, q, label_smoothing=0.1)[0], g
    if case == "probabilities":
        return build_softmax_ce(z, q)[0], g
    if case.startswith("binary"):
        from ce_cli.models.sigmoid import build_sigmoid_bce
        weight = np.full(z.shape[1], 0.5) if case == "binary weighted" else None
        return build_sigmoid_bce(z, (q > 0.02).astype(np.float32), weight=weight)[0], g
    return build_softmax_ce(z, y)[0], g


@needs_kernel
@pytest.mark.parametrize("case, in_place", [
    ("index targets", True), ("probabilities", True), ("float16 logits", False),
    ("float16 gradient", False), ("strided gradient", False), ("no gradient", True),
    ("smoothed probabilities", False),
    ("binary", True), ("binary weighted", False), ("binary, per-element losses read", False)])
def test_large_chunks_only_where_the_kernel_copies_nothing(case, in_place):
    """The streaming pass takes 32M-entry chunks only when the kernel reads every row where it
    lies and forms no (R, C) array (a copy of such a chunk, or binary's per-element losses that
    a compared loss reads, would be 128-512 MB); otherwise 2M entries (16 MB)."""
    from ce_cli.verify.pipeline import FUSED_CHUNK_ELEMENTS, IN_PLACE_CHUNK_ELEMENTS, _fused_step
    from ce_cli.verify.stages import UserGrad
    from ce_cli.verify.tolerance import resolve_tolerance

    problem, g = _in_place_case(case)
    assert problem.kernel is not None
    items = case.endswith("losses read")
    assert problem.kernel.in_place(g, items) is in_place
    user = None if g is None else UserGrad(g, resolve_tolerance(g.dtype))
    assert _fused_step(problem.kernel, user, items) == (IN_PLACE_CHUNK_ELEMENTS if in_place
                                                        else FUSED_CHUNK_ELEMENTS)


@needs_kernel
@pytest.mark.parametrize("loss", [False, True])
def test_binary_chunks_are_large_unless_a_loss_reads_their_elements(monkeypatch, loss):
    """`binary` streams 32M-entry chunks, but 2M ones when your loss is compared: its floor
    reads each chunk's per-element losses, two (R, C) float64 arrays."""
    from ce_cli.verify import pipeline
    from ce_cli.verify.checks import check_binary

    seen = []

    def step(fused, user, items):
        seen.append(items)
        return original(fused, user, items)

    original = pipeline._fused_step
    monkeypatch.setattr(pipeline, "_fused_step", step)
    rng = np.random.default_rng(3)
    z = rng.standard_normal((8, 50)).astype(np.float32)
    y = (rng.random((8, 50)) < 0.3).astype(np.float32)
    s = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    value = float(np.mean(np.logaddexp(0.0, z) - y * z))
    report = check_binary(z, y, grad=((s - y) / y.size).astype(np.float32),
                          loss=value if loss else None)
    assert report.ok and seen == [loss]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_rows_widen_on_the_kernels_threads(threads):
    """A `Bfloat16Rows` block reaches the kernel widened by ce_widen_bf16: every bfloat16 bit
    pattern, a chunk split over threads, a strided and a byte-swapped one and a tail of 3 give
    widen_bfloat16's bits (NaN payloads too: a shift)."""
    from ce_cli.io.bfloat16 import Bfloat16Rows, widen_bfloat16
    from ce_cli.kernels import compiled
    every = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    chunk = np.random.default_rng(5).integers(0, 1 << 16, size=(300, 1001), dtype=np.uint16)
    for bits in (every, chunk, chunk[:, ::2], chunk.astype(">u2"), every.reshape(-1)[1:]):
        with use_threads(threads):
            got = compiled._as_kernel_rows(Bfloat16Rows(bits).block(0, len(bits)))
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.uint32), widen_bfloat16(bits).view(np.uint32))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_float16_rows_widen_to_numpys_float32(threads):
    """float16 rows reach the kernel as float32 through ce_widen_f16: every binary16 bit pattern
    (subnormals, -0, infinities, NaN) and a chunk split over threads give numpy's astype(float32)
    bits (NaN: a NaN; numpy may quiet a signalling one)."""
    from ce_cli.kernels import compiled
    every = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    chunk = np.random.default_rng(5).integers(0, 1 << 16, size=(300, 1001), dtype=np.uint16)
    for bits in (every, chunk, chunk[:, ::2], every.reshape(-1)[1:]):  # the last: a tail of 3
        half = bits.view(np.float16)
        with use_threads(threads):
            got = compiled._as_kernel_rows(half)
        want = half.astype(np.float32)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
