"""The reduced loss's allowance for its sum (tolerance.reduction_floor): a running float32 sum
(MLX's CPU sum, tinygrad's) of up to 2^18 terms passes, as a pairwise one does; a sum
accumulated in 16 bits (MLX #4379) still fails."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ce_cli
from ce_cli.verify.tolerance import reduction_floor, resolve_tolerance


def _terms(n: int, kind: str, dtype, top: float = 8.0) -> np.ndarray:
    rng = np.random.default_rng(n)
    if kind == "flat":  # per-token losses of similar size
        return rng.uniform(top / 16, top, n).astype(dtype)
    return np.exp(rng.normal(0.0, 2.0, n)).astype(dtype)  # spanning orders of magnitude


@pytest.mark.parametrize("n", [1 << 6, 1 << 10, 1 << 14, 1 << 18])
@pytest.mark.parametrize("kind", ["flat", "spread"])
def test_running_and_pairwise_float32_sums_pass(n, kind):
    terms = _terms(n, kind, np.float32)
    exact = math.fsum(terms.astype(np.float64).tolist())
    allowed = reduction_floor(resolve_tolerance(np.float32), n, exact)
    for got in (np.cumsum(terms, dtype=np.float32)[-1], np.sum(terms, dtype=np.float32)):
        assert abs(float(got) - exact) <= allowed


@pytest.mark.parametrize("dtype", [np.float16])
def test_a_sum_accumulated_in_16_bits_fails(dtype):
    n = 1 << 14
    terms = _terms(n, "flat", dtype, top=0.5)  # a total within float16's range
    exact = math.fsum(terms.astype(np.float64).tolist())
    allowed = reduction_floor(resolve_tolerance(dtype), n, exact)
    running = float(np.cumsum(terms, dtype=dtype)[-1])  # stalls once the total outgrows a term
    assert abs(running - exact) > 3 * allowed
    pairwise32 = float(np.float16(np.sum(terms, dtype=np.float32)))  # float32 accumulation passes
    assert abs(pairwise32 - exact) <= allowed + float(np.spacing(np.float16(exact)))


def test_loss_of_a_running_float32_mean_passes_and_a_wrong_one_fails():
    """End to end: 2^18 rows' float32 losses averaged by a running sum, as MLX does."""
    rng = np.random.default_rng(3)
    N, C = 1 << 18, 4
    z = rng.standard_normal((N, C)).astype(np.float32)
    y = rng.integers(0, C, N)
    z64 = z.astype(np.float64)
    lse = np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1)) + z64.max(1)
    rows = (lse - z64[np.arange(N), y]).astype(np.float32)
    mean = np.float32(np.cumsum(rows, dtype=np.float32)[-1] / np.float32(N))
    report = ce_cli.check_grad(z, y, loss=mean, fd="off")
    assert report.ok, report.checks
    assert not ce_cli.check_grad(z, y, loss=mean * np.float32(1.001), fd="off").ok


def test_binary_mean_of_many_elements_in_a_running_float32_sum_passes():
    """A few rows of many elements (tinygrad's and MLX's BCE means over 2^18 elements): the sum
    runs over the elements, not the rows."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 1 << 15)) * 3).astype(np.float32)
    t = (rng.random(x.shape) < 0.3).astype(np.float32)
    x64 = x.astype(np.float64)
    items = (np.maximum(x64, 0) - x64 * t + np.log1p(np.exp(-np.abs(x64)))).astype(np.float32)
    mean = np.float32(np.cumsum(items.reshape(-1), dtype=np.float32)[-1] / np.float32(x.size))
    assert ce_cli.check_binary(x, t, loss=mean, fd="off").ok
    assert not ce_cli.check_binary(x, t, loss=mean * np.float32(1.001), fd="off").ok
