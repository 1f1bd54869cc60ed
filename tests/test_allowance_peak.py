"""The row max's path (verify/allowance.py): an implementation that differentiates through
z - max(z) adds (1 - sum a) Q at each row's arg-max, zero in exact arithmetic, its own sum's
rounding in finite precision (MindSpore's float16 cross_entropy: 0, +-1/2 or -1 ulp of 1). Those
rows pass, with a note; an error at the arg-max beyond that allowance, or anywhere else, fails."""

from __future__ import annotations

import numpy as np
import pytest

import ce_cli
from ce_cli.verify.allowance import path_allowance
from ce_cli.verify.tolerance import resolve_tolerance


def _through_max(dtype, N: int = 16, C: int = 1000, seed: int = 0):
    """Logits, labels and the gradient of the per-row losses (reduction none) as a composed
    implementation forms it in `dtype`: softmax - onehot, plus (1 - sum a) at the arg-max (the
    sum a running one in float32, rounded to `dtype`: a 16-bit sum is a bug, MLX #4379)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, C)).astype(dtype)
    y = rng.integers(0, C, N)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    a = (e / e.sum(axis=1, keepdims=True, dtype=np.float32).astype(dtype)).astype(dtype)
    g = a.copy()
    g[np.arange(N), y] -= dtype(1.0)
    am = z.argmax(axis=1)
    path = (dtype(1.0) - np.cumsum(a, axis=1, dtype=np.float32)[:, -1].astype(dtype)).astype(dtype)
    g[np.arange(N), am] += path
    return z, y, g, am, path


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gradient_through_the_row_max_passes(dtype):
    z, y, g, _am, path = _through_max(dtype)
    assert np.any(path != 0)  # the path carries a rounding in some rows
    report = ce_cli.check_grad(z, y, grad=g, reduction="none", fd="off")
    grad = report.checks[0]
    assert report.ok, grad
    assert "differentiates through max(z)" in grad.note


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sampled_finite_differences_allow_the_path_where_the_rows_needed_it(dtype):
    """fd_vs_grad at the arg-max entries the rows needed the path at (the sample takes the
    worst entries): the same allowance as grad_vs_reference (PyTorch 16-bit autograd through
    a logsumexp written with an undetached max failed only there)."""
    z, y, g, _am, _path = _through_max(dtype)
    report = ce_cli.check_grad(z, y, grad=g, reduction="none", fd="sample")
    assert report.ok, [(c.name, c.worst[:2]) for c in report.checks if not c.ok]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_an_error_at_the_arg_max_beyond_the_path_fails(dtype):
    z, y, g, am, _path = _through_max(dtype)
    allowed = path_allowance(resolve_tolerance(dtype), z.shape[1])
    bad = g.copy()
    bad[3, am[3]] += dtype(4 * allowed)
    assert not ce_cli.check_grad(z, y, grad=bad, reduction="none", fd="off").ok


def test_the_path_is_allowed_at_the_arg_max_only():
    z, y, g, am, _path = _through_max(np.float16)
    col = (am[5] + 1) % z.shape[1]
    if col == y[5]:
        col = (col + 1) % z.shape[1]
    bad = g.copy()
    bad[5, col] += np.float16(2.0 ** -10)  # an ulp of 1 where the path does not reach
    report = ce_cli.check_grad(z, y, grad=bad, reduction="none", fd="off")
    assert not report.ok
    assert any(e.index == (5, int(col)) for e in report.checks[0].worst)
