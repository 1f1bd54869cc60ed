"""A z-loss left out of the backward scales row n's softmax term by -2 zeta lse_n / Qe_n, which
float32 rows of 42,000+ classes allow as a normaliser factor (0.5 eps (C - 1)); the factor that
tracks lse row by row is reported as what it is. Emulated at C = 1,000 with the bound such a
vocabulary gives (`normaliser_rtol` 0.015, float32 at C = 256,000)."""

from __future__ import annotations

import numpy as np
import pytest

import ce_cli

ZETA, N, C = 1e-4, 24, 1000


def _grads(seed: int = 0):
    """Logits, labels, the correct float64 gradient and the one without the z-loss term."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, C)) * 3.0
    y = rng.integers(0, C, N)
    m = z.max(axis=1, keepdims=True)
    s = np.exp(z - m).sum(axis=1, keepdims=True)
    a = np.exp(z - m) / s
    lse = m + np.log(s)
    plain = a.copy()
    plain[np.arange(N), y] -= 1.0
    return z, y, (plain + 2.0 * ZETA * lse * a) / N, plain / N


@pytest.fixture(params=["compiled", "numpy"])
def kernel(request, monkeypatch):
    monkeypatch.setenv("CE_CHECK_FUSED", "1" if request.param == "compiled" else "0")
    return request.param


def _normaliser(report):
    return next(c for c in report.checks if c.name == "normaliser")


def test_z_loss_left_out_of_the_gradient_is_named(kernel):
    z, y, _good, without = _grads()
    report = ce_cli.check_grad(z, y, grad=without.astype(np.float32), z_loss=ZETA,
                               normaliser_rtol=0.015, fd="off")
    assert not report.ok
    check = _normaliser(report)
    assert not check.ok and "z-loss left out of your gradient" in check.note
    assert report.options["kernel"] == kernel


def test_z_loss_left_out_beyond_the_bound_is_named(kernel):
    """The same omission at the default bound (float32 at C = 1,000: 6e-5, the factor ~2e-3):
    the rows fail with a factor over it, and the factor still tracks lse row by row."""
    z, y, _good, without = _grads()
    report = ce_cli.check_grad(z, y, grad=without.astype(np.float32), z_loss=ZETA, fd="off")
    check = _normaliser(report)
    assert not report.ok and not check.ok and "z-loss left out of your gradient" in check.note
    assert check.mismatches == N  # every row fails once, not once more for the signature
    soft = without.copy()
    soft[np.arange(N), y] += 1.0 / N  # a / N
    other = without + 2e-3 * soft  # every row's normaliser off by one factor: not a z-loss
    assert "z-loss" not in _normaliser(ce_cli.check_grad(
        z, y, grad=other.astype(np.float32), z_loss=ZETA, fd="off")).note


def test_rounding_factors_of_either_sign_pass(kernel):
    """Each row's softmax term off by its own factor, |f| <= 5e-4 of either sign (PyTorch's
    largest at 256,000 classes): the allowance passes them, nothing is named."""
    z, y, good, _without = _grads()
    rng = np.random.default_rng(1)
    f = rng.uniform(-5e-4, 5e-4, (N, 1))
    m = z.max(axis=1, keepdims=True)
    a = np.exp(z - m) / np.exp(z - m).sum(axis=1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    soft = (1.0 + 2.0 * ZETA * lse) * a / N  # Qe a, the term a normaliser error scales
    report = ce_cli.check_grad(z, y, grad=(good + f * soft).astype(np.float32), z_loss=ZETA,
                               normaliser_rtol=0.015, fd="off")
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]
    assert "rows pass with it" in _normaliser(report).note


def test_half_the_z_loss_is_not_named_left_out(kernel):
    """zeta instead of 2 zeta: half the factor, not within a quarter of the left-out term's;
    it is named as halved (`test_the_z_loss_term_at_a_wrong_coefficient_is_named`)."""
    z, y, good, without = _grads()
    half = (good + without) / 2.0
    report = ce_cli.check_grad(z, y, grad=half.astype(np.float32), z_loss=ZETA,
                               normaliser_rtol=0.015, fd="off")
    assert "z-loss left out" not in _normaliser(report).note


@pytest.mark.parametrize("m, what", [(0.5, "half the z-loss's term"),
                                     (-1.0, "its sign flipped"), (2.0, "twice")])
def test_the_z_loss_term_at_a_wrong_coefficient_is_named(kernel, m, what):
    """2 m zeta lse for 2 zeta lse in the backward (halved, its sign flipped, doubled): row
    factors (m - 1) 2 zeta lse / Qe, within the bound given, tracking lse row by row."""
    z, y, good, without = _grads()
    grad = without + m * (good - without)
    report = ce_cli.check_grad(z, y, grad=grad.astype(np.float32), z_loss=ZETA,
                               normaliser_rtol=0.015, fd="off")
    check = _normaliser(report)
    assert not report.ok and not check.ok and what in check.note
