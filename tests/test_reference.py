"""The float64 reference itself: exact values, invariances, precision at any logit scale."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ce_cli
from ce_cli.verify.checks import check_grad, reference
from tests.conftest import softmax

# every test runs through the compiled kernel and through the numpy kernel
pytestmark = pytest.mark.usefixtures("both_kernels")


def naive(z, y):
    """Textbook mean CE and gradient, fine at moderate scale."""
    p = softmax(z)
    n = z.shape[0]
    loss = -np.mean(np.log(p[np.arange(n), y]))
    g = p.copy()
    g[np.arange(n), y] -= 1
    return loss, g / n


def test_matches_textbook_at_moderate_scale():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((16, 7))
    y = rng.integers(0, 7, 16)
    ref = reference(z, y)
    loss, g = naive(z, y)
    assert ref.loss == pytest.approx(loss, rel=1e-14)
    np.testing.assert_allclose(ref.grad, g, rtol=1e-13, atol=1e-17)


def test_known_value_uniform_logits():
    # every class equally likely: loss = log C, gradient = (1/C - onehot) / N
    z = np.zeros((3, 4))
    y = np.array([0, 1, 3])
    ref = reference(z, y)
    assert ref.loss == pytest.approx(math.log(4), rel=1e-15)
    expected = np.full((3, 4), 0.25)
    expected[[0, 1, 2], y] -= 1
    np.testing.assert_allclose(ref.grad, expected / 3, rtol=1e-15)


def test_confident_row_keeps_relative_precision():
    # margin 50: p_y - 1 = -(C-1) e^-50 ~ -3.9e-22, cancels to 0 in float64 naively
    z = np.array([[50.0, 0.0, 0.0]])
    ref = reference(z, np.array([0]), reduction="sum")
    tiny = 2 * math.exp(-50)
    assert ref.loss == pytest.approx(math.log1p(tiny), rel=1e-14)
    assert ref.grad[0, 0] == pytest.approx(-tiny / (1 + tiny), rel=1e-14)
    assert ref.grad[0, 1] == pytest.approx(math.exp(-50) / (1 + tiny), rel=1e-14)


def test_huge_logits_do_not_overflow():
    z = np.array([[1e6, 1e6 - 1.0, -1e6]])
    ref = reference(z, np.array([1]), reduction="sum")
    assert ref.loss == pytest.approx(math.log1p(math.e), rel=1e-13)
    assert np.all(np.isfinite(ref.grad))


def test_neg_inf_is_a_mask():
    z = np.array([[0.0, -np.inf, 0.0]])
    ref = reference(z, np.array([0]), reduction="sum")
    assert ref.loss == pytest.approx(math.log(2), rel=1e-15)
    np.testing.assert_allclose(ref.grad, [[-0.5, 0.0, 0.5]], rtol=1e-15)


def test_all_ignored_mean_is_nan_with_zero_gradient():
    report = check_grad(np.zeros((2, 3)), np.array([-100, -100]))
    assert math.isnan(report.loss)
    ref = reference(np.zeros((2, 3)), np.array([-100, -100]))
    assert np.all(ref.grad == 0)
    assert any("NaN" in w for w in report.warnings)


def test_public_api_is_exported():
    assert ce_cli.check_grad is check_grad
    assert ce_cli.reference is reference
    assert isinstance(ce_cli.__version__, str)


rows = st.integers(1, 12)
classes = st.integers(2, 40)
scales = st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e5])


@settings(max_examples=60, deadline=None)
@given(n=rows, c=classes, scale=scales, seed=st.integers(0, 2**32 - 1),
       smoothing=st.sampled_from([0.0, 0.1]), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_invariances(n, c, scale, seed, smoothing, reduction):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * scale
    y = rng.integers(0, c, n)
    ref = reference(z, y, reduction=reduction, label_smoothing=smoothing)
    # rows of the gradient sum to zero: sum_c (Q a_c - q_c) = Q - Q
    row_sums = ref.grad.sum(axis=1)
    assert np.all(np.abs(row_sums) <= 1e-12 * np.abs(ref.grad).sum(axis=1) + 1e-300)
    # shifting a row by a constant changes nothing (softmax is shift invariant)
    shift = rng.uniform(-50, 50, size=(n, 1)).round()
    moved = reference(z + shift, y, reduction=reduction, label_smoothing=smoothing)
    tol = 1e-12 * max(1.0, scale)
    np.testing.assert_allclose(moved.grad, ref.grad, rtol=tol, atol=tol * np.abs(ref.grad).max())
    assert moved.loss == pytest.approx(ref.loss, rel=tol, abs=tol)
    # the reference always passes its own checks
    assert check_grad(z, y, grad=ref.grad, reduction=reduction, label_smoothing=smoothing,
                      fd="sample", samples=32).ok


def test_finite_difference_bound_at_huge_confident_logits():
    """Regression: the truncation bound rebuilt a's logit from z - lse, which at |z| ~ 1e6 has
    already lost 1 - a; the bound fell to 0 and a correct reference failed fd_vs_reference."""
    z = np.array([[1000052.2353878955, 1000019.6608460348]])
    for mode in ("full", "sample", "directional"):
        report = check_grad(z, np.array([1]), fd=mode)
        assert report.ok, (mode, [c for c in report.checks if not c.ok])
