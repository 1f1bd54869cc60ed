"""The row allowances when the storage is coarser than the computing precision (`--precision
f32` on a bf16 gradient): the normaliser factor is fitted by intervals, since bf16's final
rounding swamps a median fit (verify/allowance.py, `_interval_fit`)."""

from __future__ import annotations

import numpy as np
import pytest

import ce_cli
from tests.conftest import softmax
from tests.test_api_bfloat16 import as_float, as_void, to_bf16_bits

C, N, EPS = 1000, 48, 0.1


def smoothed_rows(seed: int = 0, factor=None, bug: str = "", eps: float = EPS) -> tuple:
    """Logits, labels and a bf16 gradient of the summed, smoothed CE computed in float32 with a
    row normaliser factor (PyTorch's and Inductor's float32 row sums: ~2e-5 at this size)."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, C)) * (1.0 + 9.0 * (np.arange(N) % 2))[:, None]).astype(np.float32)
    y = rng.integers(0, C, N)
    y[1::2] = z[1::2].argmax(axis=1)  # the wide rows confident and right, as a trained model's
    f = rng.uniform(-3e-5, 3e-5, N) if factor is None else np.full(N, factor)
    p = softmax(z.astype(np.float64)) * (1.0 + f)[:, None]
    if bug == "p_y_bf16":  # Liger 0.8.1's Ascend path: p_y rounded to bf16 before 1 is taken off
        rows = np.arange(N)
        p[rows, y] = as_float(to_bf16_bits(p[rows, y].astype(np.float32)))
    q = np.full((N, C), eps / C)
    q[np.arange(N), y] += 1.0 - eps
    g32 = p.astype(np.float32) - q.astype(np.float32)  # one float32 subtraction
    return z, y, as_void(to_bf16_bits(g32))


def check(z, y, g, eps: float = EPS, **kw):
    return ce_cli.check_grad(z, y, grad=g, reduction="sum", label_smoothing=eps, **kw)


@pytest.mark.parametrize("seed", range(3))
def test_f32_normaliser_factor_stored_bf16_passes(seed):
    report = check(*smoothed_rows(seed), precision="f32")
    assert report.ok, [(c.name, c.mismatches) for c in report.checks if not c.ok]
    assert check(*smoothed_rows(seed)).ok  # and as a bf16 computation


def test_factor_beyond_the_f32_bound_fails():
    # 0.5 eps (C - 1) + 4 eps = 6.0e-5 at C = 1,000 in float32; 2e-3 is a bug there
    report = check(*smoothed_rows(factor=2e-3), precision="f32")
    assert not report.ok
    assert not next(c for c in report.checks if c.name == "grad_vs_reference").ok


def test_true_class_rounded_to_bf16_fails_as_computed_in_f32():
    z, y, g = smoothed_rows(bug="p_y_bf16", eps=0.0)  # confident rows: p_y - 1 is small
    assert check(z, y, g, eps=0.0).ok  # a bf16 computation may round p_y
    grad = next(c for c in check(z, y, g, eps=0.0, precision="f32").checks
                if c.name == "grad_vs_reference")
    assert not grad.ok and all(e.index[1] == y[e.index[0]] for e in grad.worst)


def test_interval_fit():
    from ce_cli.verify.allowance import _interval_fit
    term = np.array([1.0, 2.0, -4.0])
    d = 1e-3 * term + np.array([1e-4, -1e-4, 0.0])
    f, half = _interval_fit(d, term, np.full(3, 2e-4))
    assert abs(f - 1e-3) <= half and half <= 2e-4
    assert _interval_fit(np.array([0.0, 1.0]), np.ones(2), np.full(2, 0.1)) is None


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_bf16_computation_sums_in_float32(factor):
    """A bf16 computation sums its 1,000 exponentials in float32 (16-bit sums are a bug, MLX
    #4379): the row factor it may have is 0.5 eps_f32 (C - 1) + 4 eps_bf16 = 0.031, not
    0.5 eps_bf16 (C - 1) = 3.9, which passed a softmax twice too large. (Smaller factors hide
    in bf16's own per-entry rule: z - lse rounded to bf16 moves a by ~eps |log a|.)"""
    assert check(*smoothed_rows(factor=2e-3)).ok
    report = check(*smoothed_rows(factor=factor))
    normaliser = next(c for c in report.checks if c.name == "normaliser")
    assert not report.ok and not normaliser.ok and "allowed 0.031" in normaliser.note
