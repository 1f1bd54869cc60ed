"""Your gradient's row normaliser against your loss's. A factor f on row n's softmax term (a sum
of C exponentials rounded) moves that row's lse by -log(1 + f), and so its loss, in every
implementation whose backward uses its forward's softmax. A factor the loss does not carry is a
term of the backward alone - half the z-loss's 2 zeta lse, its sign flipped - which a float32
vocabulary of tens of thousands of classes would otherwise pass as rounding (the bound is
0.5 eps (C - 1): 1.9e-3 at C = 32,000, 5e-3 at 84,000). Emulated at C = 1,000 with the latter
(`normaliser_rtol`)."""

from __future__ import annotations

import numpy as np
import pytest

import ce_cli

ZETA, N, C, BOUND = 1e-4, 24, 1000, 5e-3


@pytest.fixture(params=["compiled", "numpy"])
def kernel(request, monkeypatch):
    monkeypatch.setenv("CE_CHECK_FUSED", "1" if request.param == "compiled" else "0")
    return request.param


def _problem(seed: int = 0):
    """Logits, labels, the softmax a, lse and the per-sample losses with the z-loss."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, C))
    y = rng.integers(0, C, N)
    m = z.max(axis=1, keepdims=True)
    s = np.exp(z - m).sum(axis=1, keepdims=True)
    a, lse = np.exp(z - m) / s, (m + np.log(s))[:, 0]
    loss = lse - z[np.arange(N), y] + ZETA * lse ** 2
    return z, y, a, lse, loss


def _grad(a, y, lse, coef: float = 2.0, f=0.0):
    """(1 + f) (1 + coef zeta lse) a - onehot, over N: the z-loss's term times coef/2, every
    row's softmax term off by its factor f."""
    g = (1.0 + np.reshape(f, (-1, 1))) * (1.0 + coef * ZETA * lse[:, None]) * a
    g[np.arange(N), y] -= 1.0
    return g / N


def _normaliser(report):
    return next(c for c in report.checks if c.name == "normaliser")


@pytest.mark.parametrize("coef", [1.0, -2.0], ids=["half", "sign"])
def test_a_backward_term_within_the_bound_fails(kernel, coef):
    """Half the z-loss's gradient, or its sign flipped: within the bound, but its factors track
    lse row by row (`missing_z_loss` names the term), with your loss (right) or without it."""
    z, y, a, lse, loss = _problem()
    grad = _grad(a, y, lse, coef).astype(np.float32)
    what = "half the z-loss's term" if coef == 1.0 else "its sign flipped"
    for yours in (np.float32(loss.mean()), None):
        report = ce_cli.check_grad(z, y, grad=grad, loss=yours, z_loss=ZETA,
                                   normaliser_rtol=BOUND, fd="off")
        check = _normaliser(report)
        assert not report.ok and not check.ok and what in check.note
    assert report.options["kernel"] == kernel


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rounding_your_loss_carries_passes(kernel, reduction):
    """Each row's normaliser off by its own factor, of either sign, in the gradient and the
    loss alike (one sum rounded): it passes."""
    z, y, a, lse, loss = _problem()
    f = np.random.default_rng(1).uniform(-1e-3, 1e-3, N)
    moved = loss - (1.0 + 2.0 * ZETA * lse) * np.log1p(f)
    yours = moved.mean() if reduction == "mean" else moved
    grad = _grad(a, y, lse, f=f) * (N if reduction == "none" else 1)
    report = ce_cli.check_grad(z, y, grad=grad.astype(np.float32), loss=yours, z_loss=ZETA,
                               reduction=reduction, normaliser_rtol=BOUND, fd="off")
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]
    assert "rows pass with it" in _normaliser(report).note


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rounding_your_loss_does_not_carry_fails(kernel, reduction):
    """The same factors with the exact loss rounded to float32, your gradient's precision: no
    implementation whose backward uses its forward's softmax makes them."""
    z, y, a, lse, loss = _problem()
    f = np.random.default_rng(1).uniform(5e-4, 1e-3, N)
    grad = _grad(a, y, lse, f=f) * (N if reduction == "none" else 1)
    yours = np.float32(loss.mean()) if reduction == "mean" else loss.astype(np.float32)
    report = ce_cli.check_grad(z, y, grad=grad.astype(np.float32), loss=yours, z_loss=ZETA,
                               reduction=reduction, normaliser_rtol=BOUND, fd="off")
    assert not report.ok and "your loss does not carry it" in _normaliser(report).note


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_float64_loss_beside_a_float32_gradient_is_not_held_to_it(kernel, reduction):
    """The exact loss in float64 beside a float32 gradient whose rows' normalisers are off (a
    float64 reference's loss next to PyTorch's (N, C, d) float32 gradient): a float32 forward
    cannot have made that loss, so its sum is not your backward's and the factors are allowed
    as rounding."""
    z, y, a, lse, loss = _problem()
    f = np.random.default_rng(1).uniform(5e-4, 1e-3, N)
    grad = _grad(a, y, lse, f=f) * (N if reduction == "none" else 1)
    yours = loss.mean() if reduction == "mean" else loss
    report = ce_cli.check_grad(z, y, grad=grad.astype(np.float32), loss=yours, z_loss=ZETA,
                               reduction=reduction, normaliser_rtol=BOUND, fd="off")
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]
    assert "rows pass with it" in _normaliser(report).note


def test_smoothing_is_not_held_to_the_loss(kernel):
    """With label smoothing the backward sums C target terms of its own (PyTorch: the log-softmax
    backward's sum of the upstream gradient), a factor the loss need not carry: not checked."""
    z, y, a, lse, _loss = _problem()
    eps = 0.1
    q = np.full((N, C), eps / C)
    q[np.arange(N), y] += 1.0 - eps
    loss = (q * (lse[:, None] - z)).sum(axis=1)
    grad = ((1.0 + 1e-3) * a - q) / N
    report = ce_cli.check_grad(z, y, grad=grad.astype(np.float32), loss=loss.mean(),
                               label_smoothing=eps, normaliser_rtol=BOUND, fd="off")
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]



def test_per_sample_losses_are_held_row_by_row(kernel):
    """Per-sample losses: a few rows whose forward sum rounded wide (gradient and loss off by
    the same factor, so the loss passes only with the normaliser allowance) do not excuse the
    other rows, whose gradient has half the z-loss's term and whose losses are exact."""
    z, y, a, lse, loss = _problem()
    f = np.zeros(N)
    f[:4] = 3e-3  # rounding the loss carries: these rows need the allowance
    moved = loss - (1.0 + 2.0 * ZETA * lse) * np.log1p(f)
    coef = np.where(f > 0, 2.0, 1.0)  # the other rows: half the z-loss's term
    g = (1.0 + f[:, None]) * (1.0 + coef[:, None] * ZETA * lse[:, None]) * a
    g[np.arange(N), y] -= 1.0
    kw = dict(loss=moved.astype(np.float32), z_loss=ZETA, reduction="none",
              normaliser_rtol=BOUND, fd="off")
    report = ce_cli.check_grad(z, y, grad=g.astype(np.float32), **kw)
    assert not report.ok and "your loss does not carry it" in _normaliser(report).note
    g_ok = (1.0 + f[:, None]) * (1.0 + 2.0 * ZETA * lse[:, None]) * a
    g_ok[np.arange(N), y] -= 1.0
    report = ce_cli.check_grad(z, y, grad=g_ok.astype(np.float32), **kw)
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]


def test_a_scalar_loss_that_needs_the_allowance_is_held_to_the_factors(kernel):
    """open_lm's z-loss, zeta (mean lse)^2 for zeta mean(lse^2), in its loss and (autodiff) its
    gradient: the loss is off by -zeta var(lse), within the normaliser allowance, while the
    gradient's factors 2 zeta (mean lse - lse_n) move it by far less. The loss must match the
    reference moved by the factors its gradient shows: it fails; the right pair passes."""
    rng = np.random.default_rng(2)
    z = rng.standard_normal((N, C)) * rng.uniform(0.5, 6.0, (N, 1))
    y = rng.integers(0, C, N)
    m = z.max(axis=1, keepdims=True)
    s = np.exp(z - m).sum(axis=1, keepdims=True)
    a, lse = np.exp(z - m) / s, (m + np.log(s))[:, 0]
    ce = lse - z[np.arange(N), y]
    kw = dict(z_loss=ZETA, normaliser_rtol=BOUND, fd="off")
    for zl, ok in ((ZETA * lse.mean() ** 2, False), (ZETA * np.mean(lse ** 2), True)):
        scale = 2.0 * ZETA * (lse.mean() if not ok else lse)
        g = (1.0 + np.reshape(scale, (-1, 1))) * a
        g[np.arange(N), y] -= 1.0
        report = ce_cli.check_grad(z, y, grad=(g / N).astype(np.float32),
                                   loss=np.float32(ce.mean() + zl), **kw)
        assert report.ok == ok, [(c.name, c.note) for c in report.checks if not c.ok]
        if not ok:
            assert "your loss does not carry it" in _normaliser(report).note


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_another_computations_sum_passes_with_a_note(kernel, reduction):
    """Your loss from another computation than your gradient (PyTorch's eager (N, C, d)
    gradient beside torch.compile's or logsumexp's loss): each sum rounds on its own, within
    32 eps sqrt(C) measured. Row factors that small, not carried, pass with a note; the
    half z-loss term (factors ~7e-4 here) beyond it still fails."""
    z, y, a, lse, loss = _problem()
    f = np.random.default_rng(1).uniform(2e-5, 4e-5, N)  # 32 eps sqrt(1000) = 6e-5
    grad = _grad(a, y, lse, f=f) * (N if reduction == "none" else 1)
    yours = np.float32(loss.mean()) if reduction == "mean" else loss.astype(np.float32)
    report = ce_cli.check_grad(z, y, grad=grad.astype(np.float32), loss=yours, z_loss=ZETA,
                               reduction=reduction, normaliser_rtol=BOUND, fd="off")
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]
    if reduction == "none":  # a mean's own floor holds these factors already
        assert "within what another computation's sum" in _normaliser(report).note
    half = _grad(a, y, lse, coef=1.0) * (N if reduction == "none" else 1)
    report = ce_cli.check_grad(z, y, grad=half.astype(np.float32), loss=yours, z_loss=ZETA,
                               reduction=reduction, normaliser_rtol=BOUND, fd="off")
    assert not report.ok and "half the z-loss's term" in _normaliser(report).note
