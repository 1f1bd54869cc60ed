"""The row allowances' refit of failing rows (verify/allowance.py, verify/compare.py): its exact
median, and the compiled kernel reopening failing rows in batches - the report is the same bits
whatever the batch and the thread count, and the same verdicts and counts as the numpy kernel."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ce_cli.kernels.compiled import kernel
from ce_cli.verify import compare
from ce_cli.verify.allowance import MEDIAN_SAMPLE, median
from ce_cli.verify.checks import check_binary, check_grad


def _same(a: float, b: float) -> bool:
    return a == b or (np.isnan(a) and np.isnan(b))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 6000), kind=st.sampled_from(["normal", "sorted", "ties", "split", "wide"]),
       seed=st.integers(0, 2**31))
def test_median_is_numpys_bits(n, kind, seed):
    """Every size (the window path from 4 * MEDIAN_SAMPLE entries), sorted input, heavy ties,
    two clusters whose middle falls between them, and values near the overflow threshold."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    if kind == "sorted":
        x.sort()
    elif kind == "ties":
        x = rng.integers(0, 3, n).astype(np.float64)
    elif kind == "split":
        x[: n // 2] = 5.0 + x[: n // 2] * 1e-12
    elif kind == "wide":
        x *= 1e307
    assert _same(median(x), float(np.median(x)))


def test_median_falls_back_when_the_sample_misleads():
    """A strided sample that sees only one cluster: the window misses the middle, and the whole
    array is partitioned (still numpy's bits)."""
    n = 64 * MEDIAN_SAMPLE
    x = np.zeros(n)
    x[np.arange(n) % (n // MEDIAN_SAMPLE) != 0] = 1.0  # the sample holds only zeros
    assert median(x) == float(np.median(x)) == 1.0


def _wrong_rows(dtype, n: int = 40, c: int = 3000, seed: int = 0):
    """A gradient (of the mean) with several kinds of failing row: a normaliser factor within the
    bound (passes after the fit), twice the reference (a factor far over it), a NaN entry, and
    half a row off."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * 3).astype(dtype)
    y = rng.integers(0, c, n)
    e = np.exp(z.astype(np.float64) - z.astype(np.float64).max(axis=1, keepdims=True))
    a = e / e.sum(axis=1, keepdims=True)
    eps = float(np.finfo(dtype).eps)
    a[0::5] *= 1.0 + 200 * eps          # a normaliser within the bound: fitted, then passes
    g = a.copy()
    g[np.arange(n), y] -= 1.0
    g /= n
    g[1::5] *= 2.0                      # far over it
    g[2::5, 7] = np.nan                 # non-finite entries
    g[3::5, : c // 2] *= 1.0 + 1e-3     # half a row off
    return z, y, g.astype(dtype)


def _needs_kernel() -> None:
    """Skip without the compiled kernel; fail in CI, where it must have built."""
    if kernel() is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs the compiled kernel")
        pytest.skip("the compiled kernel is not built here")


def _exact(report) -> dict:
    def walk(v):
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items() if k not in ("seconds", "kernel")}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return float(v).hex()
        return v
    return walk(dataclasses.asdict(report))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_failing_rows_reopened_in_batches_give_the_same_report(dtype, monkeypatch):
    """One row per kernel call, three, or all of them at once, on 1 or 2 threads: the same bits."""
    _needs_kernel()
    z, y, g = _wrong_rows(dtype)
    reports = []
    for batch_rows, threads in ((1, 1), (3, 2), (10**6, 2)):
        monkeypatch.setattr(compare, "OPEN_ENTRIES", batch_rows * z.shape[1])
        rep = check_grad(z, y, grad=g, fd="off", threads=threads)
        assert rep.options["kernel"] != "numpy"
        reports.append(_exact(rep))
    assert reports[0] == reports[1] == reports[2]
    assert not check_grad(z, y, grad=g, fd="off").ok


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_failing_rows_counted_alike_on_both_kernels(dtype, monkeypatch):
    """The refit's counts (mismatches, normaliser rows over the bound, rows fitted) agree."""
    z, y, g = _wrong_rows(dtype)
    counts = []
    for fused in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", fused)
        rep = check_grad(z, y, grad=g, fd="off")
        counts.append([(c.name, c.ok, c.mismatches, c.total) for c in rep.checks])
    assert counts[0] == counts[1]
    names = [name for name, *_ in counts[0]]
    assert "normaliser" in names


def _binary_wrong(dtype, n: int = 30, k: int = 400, seed: int = 3):
    """Sigmoid BCE rows twice the reference, a NaN row, and rows whose tiny entries came back 0
    (within the floor: no flush rule needed)."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, k)) * 40).astype(dtype)
    y = (rng.random((n, k)) < 0.3).astype(dtype)
    s = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    g = (s - y) / (n * k)
    g[0::3] *= 2.0
    g[1] = np.nan
    g[2::3][np.abs(g[2::3]) < 1e-30] = 0.0
    g[2::3, :5] *= 1.5
    return z, y, g.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_rows_keep_the_entry_wise_statistics(dtype, monkeypatch):
    """A failing sigmoid row is never refitted (it has no row factors; flushed entries pass
    with the entry-wise rule): the compiled kernel's verdicts, counts and worst entries are the
    numpy kernel's."""
    z, y, g = _binary_wrong(dtype)
    summaries = []
    for fused in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", fused)
        rep = check_binary(z, y, grad=g, fd="off")
        (c,) = [c for c in rep.checks if c.name == "grad_vs_reference"]
        summaries.append((c.ok, c.mismatches, c.total, float(c.max_abs_err).hex(),
                          float(c.max_rel_err).hex(), [e.index for e in c.worst], c.note))
    assert summaries[0] == summaries[1]
    assert not summaries[0][0] and "flushed to zero" not in summaries[0][6]


def _flushed_softmax(dtype, n: int = 48, c: int = 3000, seed: int = 11, below: float | None = None):
    """A mean-reduced softmax gradient with every result below `below` (default: what a
    correct kernel may return as 0: float32's smallest normal, float16's smallest subnormal)
    returned as 0, at logit spreads that put many entries there."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * (4.0 if dtype == np.float16 else 40.0)).astype(np.float32)
    y = rng.integers(0, c, n)
    a = np.exp(z - z.max(axis=1, keepdims=True), dtype=np.float64)
    a /= a.sum(axis=1, keepdims=True)
    a[np.arange(n), y] -= 1.0
    ref = a / n
    if below is None:
        below = 2.0**-24 if dtype == np.float16 else float(np.finfo(dtype).tiny)
    g = np.where(np.abs(ref) < below, 0.0, ref).astype(dtype)
    return z, y, g


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_flushed_entries_pass_entry_by_entry(dtype, monkeypatch):
    """Flush-to-zero is a rule of single entries applied with the entry-wise rule: no row of a
    flushed gradient is refitted, and the compiled kernel (1 and 2 threads) reports the numpy
    kernel's bits: counts, errors, worst entries and the note's count of flushed entries."""
    _needs_kernel()
    z, y, g = _flushed_softmax(dtype)
    refits = []
    original = compare.RowAllowance.refine
    monkeypatch.setattr(compare.RowAllowance, "refine",
                        lambda self, *a: refits.append(a[0]) or original(self, *a))
    reports = []
    for fused, threads in (("1", 1), ("1", 2), ("0", 1)):
        monkeypatch.setenv("CE_CHECK_FUSED", fused)
        rep = check_grad(z, y, grad=g, fd="off", threads=threads)
        assert (rep.options["kernel"] == "numpy") == (fused == "0")
        (c,) = [c for c in rep.checks if c.name == "grad_vs_reference"]
        reports.append(_exact(dataclasses.replace(rep, options={})))
        # float16: a 0 below its smallest subnormal is within the entry-wise rule itself
        flushed = dtype == np.float32
        assert rep.ok and ("flushed to zero beyond the entry-wise rule" in c.note) == flushed, c
    assert refits == []
    if dtype == np.float16:  # nothing flushed: its worst entries carry each kernel's exp (1 ulp)
        return
    assert reports[0] == reports[1] == reports[2]
    assert not check_grad(z, y, grad=g, fd="off", strict_subnormals=True).ok


@pytest.mark.parametrize("fused", ["1", "0"])
def test_float16_zeros_in_its_subnormal_range_fail(fused, monkeypatch):
    """float16 kernels keep float16's subnormals (every one measured): a 0 where the reference
    lies between its smallest subnormal and its smallest normal (6.1e-5) is a wrong entry -
    a clamped logit, or the zero gradient of a mean over 16,384+ elements - not a flush."""
    monkeypatch.setenv("CE_CHECK_FUSED", fused)
    z, y, g = _flushed_softmax(np.float16, below=float(np.finfo(np.float16).tiny))
    rep = check_grad(z, y, grad=g, fd="off")
    (c,) = [c for c in rep.checks if c.name == "grad_vs_reference"]
    assert not rep.ok and c.mismatches > 0 and "flushed" not in c.note
    zero = np.zeros_like(g)
    assert not check_grad(z, y, grad=zero, fd="off").ok
    # sigmoid BCE, a mean over 32,768 elements: every entry of the gradient is a subnormal
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, 4096)) * 30).astype(np.float16)
    t = (rng.random((8, 4096)) < 0.5).astype(np.float16)
    right = ((1 / (1 + np.exp(-x.astype(np.float64))) - t) / t.size).astype(np.float16)
    assert check_binary(x, t, grad=right, fd="off").ok
    assert not check_binary(x, t, grad=np.zeros_like(right), fd="off").ok
