"""`binary --label-smoothing`, `--sample-weight` and `--denominator` on the compiled kernel.

Smoothed labels y' = y (1 - A) + A/2 are other labels, a sample weight s_n broadcast over the
last axis is an element weight multiplied into PyTorch's `weight`, a denominator is another
gradient scale: the kernel reads them as the numpy kernel forms them (SigmoidBCE.coefficients,
the same float64 bits) and computes the plain formulas. So the gradient and floor are the bits
of numpy's formulas on the kernel's own exp, the per-element losses are within 3 ulps of
numpy's (exp and log1p each < 1 ulp), and the reports (verdict, counts, worst entries, the
tolerances from the same floors and finite-difference bounds) are those of CE_CHECK_FUSED=0.
Softcap and logit scale (z = T(x)) run on the kernel too: tests/test_fused_binary_transform.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ce_cli.kernels.numpy_sigmoid import sigmoid_rows
from ce_cli.models.sigmoid import build_sigmoid_bce
from ce_cli.verify.checks import check_binary
from tests.test_fused import (  # noqa: F401 (fixtures)
    _unit_funcs, bce_grad_floor, compiled_kernel, needs_kernel, on_target)

OPTIONS = {
    "smoothing": {"label_smoothing": 0.2},
    "sample": {"sample_weight": "s"},
    "denominator": {"denominator": 37.5, "reduction": "sum"},
    "sample+mean+pw": {"sample_weight": "s", "pos_weight": "pw"},
    "all": {"label_smoothing": 0.1, "sample_weight": "s", "weight": "w", "pos_weight": "pw",
            "denominator": 12.0},
}


def _settings(opt: str, R: int, K: int, rng) -> dict:
    kw = dict(OPTIONS[opt])
    if kw.get("sample_weight") == "s":
        s = rng.uniform(-0.5, 3.0, R)
        s[::5] = 0.0  # masked samples
        kw["sample_weight"] = s
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(-1.0, 2.0, (R, K))
    if kw.get("pos_weight") == "pw":
        kw["pos_weight"] = rng.uniform(0.2, 4.0, K)
    return kw


def _problem(K: int, dtype, opt: str, R: int = 23, seed: int = 0, masks: bool = True):
    rng = np.random.default_rng(seed + K)
    x = (rng.standard_normal((R, K)) * rng.choice([0.01, 3.0, 40.0, 800.0], size=(R, 1))).astype(dtype)
    if K > 3 and masks:
        x[rng.random((R, K)) < 0.05] = -np.inf
    y = (rng.random((R, K)) < 0.3).astype(np.float32)
    y[::3] = rng.random((len(y[::3]), K))  # soft labels
    return build_sigmoid_bce(x, y, **_settings(opt, R, K, rng))[0]


def test_kernel_selection():
    """Every option reaches the compiled kernel (when built), softcap and logit scale too."""
    from ce_cli.kernels.compiled import kernel
    x, y = np.zeros((3, 4)), np.ones((3, 4))
    built = "compiled" if kernel() is not None else "numpy"
    for kw in ({"label_smoothing": 0.3}, {"sample_weight": np.ones(3)}, {"denominator": 2.0},
               {"label_smoothing": 0.3, "sample_weight": np.ones(3), "denominator": 2.0},
               {"softcap": 3.0}, {"logit_scale": 0.5}, {"softcap": 3.0, "label_smoothing": 0.1}):
        assert build_sigmoid_bce(x, y, **kw)[0].kernel_name == built, kw


@needs_kernel
@pytest.mark.parametrize("K", [1, 7, 9, 129, 1031])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_rows_match_numpy_kernel(K, dtype, opt, on_target):
    """Per-element losses within 6 eps of their terms' size, |pos| (max(-x, 0) + t) +
    |1 - y'| (max(x, 0) + t) times |w s| (each kernel: t = log1p(exp(-|x|)) within one ulp,
    eps t, then a sum, two products and the weight, u = eps/2 each: 3 eps; 2.7 eps measured
    over 200 problems; smoothed labels are soft, so the terms may cancel against nothing but
    ulps of the item itself are no bound); row sums and the gradient within a few ulps of their
    terms' size, the floor's and the magnitudes |coef w s| the same (the floor to the
    kernel's exp)."""
    problem = _problem(K, dtype, opt)
    assert problem.kernel_name == "compiled"
    rows = np.arange(problem.n_rows)
    fused = problem.kernel.evaluate(problem.z, rows, grad=True, floor_coef=4 * 2.0**-23)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = sigmoid_rows(problem, problem.z, rows, grad=True, floor_coef=4 * 2.0**-23)
    np.testing.assert_array_equal(fused.item_weight, ref.item_weight)
    np.testing.assert_array_equal(np.isinf(fused.items), np.isinf(ref.items))
    fin = np.isfinite(ref.items)
    y, w, pw = problem.coefficients(rows)
    pos = np.abs(y if pw is None else pw * y)
    x = np.asarray(problem.z, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.log1p(np.exp(-np.abs(x)))
        terms = (pos * (np.maximum(-x, 0) + t) + np.abs(1 - y) * (np.maximum(x, 0) + t)
                 ) * (1.0 if w is None else np.abs(w))
    terms = np.where(np.isnan(terms), 0.0, terms)  # 0 * inf at -inf logits: an exact 0 item
    assert np.all(np.abs(fused.items[fin] - ref.items[fin]) <= 6 * 2.0**-52 * terms[fin] + 1e-300)
    size = np.where(fin, np.abs(ref.items), 0).sum(axis=1)
    ok = np.isfinite(ref.loss)
    assert np.all(np.abs(fused.loss[ok] - ref.loss[ok]) <= 1e-15 * size[ok] + 1e-300)
    np.testing.assert_allclose(fused.total_weight, ref.total_weight, rtol=1e-15, atol=0)
    term = (np.abs(1 - y) + pos) * (1.0 if w is None else np.abs(w)) * abs(problem.grad_scale)
    assert np.all(np.abs(fused.grad - ref.grad) <= 6e-16 * term + 2.0**-1070)
    np.testing.assert_allclose(fused.floor, ref.floor, rtol=1e-15, atol=1e-300)


@needs_kernel
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_gradient_and_floor_bits_are_numpys_formulas(opt, on_target):
    """Entry by entry, the gradient and floor are numpy_sigmoid's formulas in its order, with
    the smoothed labels and the weights times the sample weights, on the kernel's own
    e = exp(-|x|): bit-identical."""
    problem = _problem(1031, np.float64, opt)
    z = np.asarray(problem.z)
    rows = np.arange(problem.n_rows)
    ev = problem.kernel.evaluate(z, rows, grad=True, floor_coef=1e-7)
    y, w, pw = problem.coefficients(rows)
    e = _unit_funcs(on_target, z.ravel())[0].reshape(z.shape)
    g, floor = bce_grad_floor(z, e, y, pw, np.ones_like(y) if w is None else w, problem.grad_scale)
    np.testing.assert_array_equal(ev.grad.view(np.uint64), g.view(np.uint64))
    np.testing.assert_array_equal(ev.floor.view(np.uint64), floor.view(np.uint64))


@needs_kernel
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_error_bounds_from_either_kernel(opt, on_target):
    """The finite-difference bounds of these options are the model's (SigmoidBCE.fd_error_bound,
    directional_error_bound) on either kernel's row values: equal to 1e-15 relative, so the
    compiled path is neither looser nor stricter."""
    from dataclasses import replace
    problem = _problem(129, np.float64, opt, masks=False)  # finite losses: finite bounds
    numpy_problem = replace(problem)
    object.__setattr__(numpy_problem, "kernel", None)
    rows = np.arange(problem.n_rows)
    cols = np.arange(problem.n_rows) % problem.n_classes
    z = np.asarray(problem.z)
    entry = z[rows, cols]
    h = np.full(len(rows), 1e-3)
    delta = np.random.default_rng(1).standard_normal(z.shape) * 1e-3
    bounds = []
    for p in (problem, numpy_problem):
        with np.errstate(invalid="ignore", over="ignore"):
            ev = p.evaluate_rows(z, rows)
            ep, em = p.evaluate_rows(z + delta / 2, rows), p.evaluate_rows(z - delta / 2, rows)
        bounds.append((p.fd_error_bound(rows, cols, entry, h, ev),
                       p.directional_error_bound(ep, em, delta)))
    assert problem.kernel is not None
    for a, b in zip(*bounds):
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(a, b, rtol=1e-15, atol=0)


def _reports(monkeypatch, *args, **kw):
    out = {}
    for which in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", which)
        out[which] = check_binary(*args, **kw)
    assert out["1"].options["kernel"] == "compiled" and out["0"].options["kernel"] == "numpy"
    return out["1"], out["0"]


def _same_report(a, b, terms: float = 0.0) -> None:
    """Same verdict, loss to ~1 ulp of its size, every check's outcome and counts, and the
    failing entries among its worst (indices; for the comparisons with the reference also the
    expected values and tolerances, to 1e-14 relative, or 4 eps of `terms`, the size of the
    terms a gradient entry is the difference of: s(x) - y' cancels near x = 0, y' = 1/2).
    Passing entries may rank rounding noise of the size of the kernels' difference (a loss made
    by one kernel matches its bits exactly, finite differences of either differ in their last
    bits)."""
    assert (a.ok, a.verdict) == (b.ok, b.verdict)
    assert a.loss == pytest.approx(b.loss, rel=1e-14, abs=1e-300)
    assert [c.name for c in a.checks] == [c.name for c in b.checks]
    for ca, cb in zip(a.checks, b.checks):
        assert (ca.name, ca.ok, ca.mismatches, ca.total) == (cb.name, cb.ok, cb.mismatches, cb.total)
        fa, fb = ([e for e in c.worst if not e.abs_err <= e.allowed] for c in (ca, cb))
        assert [e.index for e in fa] == [e.index for e in fb], ca.name
        if ca.name in ("grad_vs_reference", "loss_vs_reference"):
            slack = max(1e-300, 4 * 2.0**-52 * terms)
            for ea, eb in zip(fa, fb):
                assert ea.expected == pytest.approx(eb.expected, rel=1e-14, abs=slack)
                assert ea.allowed == pytest.approx(eb.allowed, rel=1e-14, abs=slack)


def _case(opt: str, seed: int = 3, N: int = 48, K: int = 301):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, K)) * 4).astype(np.float32)
    y = (rng.random((N, K)) < 0.2).astype(np.float32)
    kw = _settings(opt, N, K, rng)
    problem = build_sigmoid_bce(x.astype(np.float64), y, **kw)[0]
    ev = problem.evaluate(0, N)
    return x, y, kw, problem, ev


@needs_kernel
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("fd", ["sample", "directional"])
def test_reports_like_numpy_with_planted_errors(opt, fd, monkeypatch, on_target):
    """The folded comparison (streaming pass) against numpy's, planted errors included, and a
    correct gradient passes on both."""
    x, y, kw, problem, ev = _case(opt)
    good = ev.grad.astype(np.float32)
    a, b = _reports(monkeypatch, x, y, grad=good, fd=fd, worst=4, **kw)
    assert a.ok and b.ok
    _same_report(a, b)
    bad = good.copy()
    bad[6, 7] = bad[6, 7] * 1.5 + 1e-3 * abs(problem.grad_scale)  # s_6 = 0 in some cases: not 0
    bad[40, 100] *= 1.2 if bad[40, 100] != 0 else 0.0
    bad[40, 100] += 1e-3 * abs(problem.grad_scale)
    bad[47, 300] = np.nan
    a, b = _reports(monkeypatch, x, y, grad=bad, fd=fd, worst=3, **kw)
    assert not a.ok and not b.ok
    _same_report(a, b)
    check = next(c for c in a.checks if c.name == "grad_vs_reference")
    flagged = {e.index for e in check.worst}
    assert {(6, 7), (40, 100), (47, 300)} <= flagged


@needs_kernel
@pytest.mark.parametrize("opt", ["smoothing", "sample", "all"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_check_like_numpy_with_planted_errors(opt, reduction, monkeypatch, on_target):
    """The loss check (per-element losses deferred by the streaming pass) as with numpy."""
    rng = np.random.default_rng(5)
    N, K = 37, 211
    x = (rng.standard_normal((N, K)) * 4).astype(np.float32)
    y = (rng.random((N, K)) < 0.2).astype(np.float32)
    kw = {**_settings(opt, N, K, rng), "reduction": reduction}
    if reduction == "none":
        kw.pop("denominator", None)  # refused with reduction none; the other options still run
    problem = build_sigmoid_bce(x.astype(np.float64), y, **kw)[0]
    ev = problem.evaluate(0, N)
    g = ev.grad.astype(np.float32)
    loss = ev.items.copy() if reduction == "none" else problem.reduce(float(ev.loss.sum()))
    a, b = _reports(monkeypatch, x, y, grad=g, loss=loss, fd="off", worst=3, **kw)
    assert a.ok and b.ok
    _same_report(a, b)
    if reduction == "none":
        loss[3, 5] = loss[3, 5] * 1.01 + 1e-3
    else:
        loss = loss * 1.01 + 1e-3
    a, b = _reports(monkeypatch, x, y, grad=g, loss=loss, fd="off", worst=3, **kw)
    assert not a.ok and not b.ok
    _same_report(a, b)
    check = next(c for c in a.checks if c.name == "loss_vs_reference")
    assert check.worst[0].index == ((3, 5) if reduction == "none" else ())


@needs_kernel
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 12), k=st.integers(1, 40), smoothing=st.sampled_from([0.0, 0.05, 1.0]),
       sample=st.booleans(), denominator=st.sampled_from([None, 0.5, 1e4]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_reports_like_numpy_property(monkeypatch, n, k, smoothing, sample, denominator, dtype, seed):
    """Random option sets, a gradient from the float64 reference with one entry off by 1%: the
    same report on both kernels."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * rng.choice([0.1, 5.0, 60.0])).astype(dtype)
    y = rng.random((n, k)).astype(dtype)
    kw: dict = {"label_smoothing": smoothing, "denominator": denominator}
    if sample:
        kw["sample_weight"] = rng.uniform(0.1, 2.0, n)
    kw = {key: v for key, v in kw.items() if v is not None}
    problem = build_sigmoid_bce(x.astype(np.float64), y, **kw)[0]
    g = problem.evaluate(0, n).grad.astype(dtype)
    i, j = rng.integers(n), rng.integers(k)
    g[i, j] = g[i, j] * 1.01 + 1e-2 * abs(problem.grad_scale)
    # worst=1: the sampled finite differences take the worst entry of the comparison, the
    # planted one on both kernels (a passing runner-up would be rounding noise)
    a, b = _reports(monkeypatch, x, y, grad=g, fd="sample", worst=1, **kw)
    assert not a.ok
    # a gradient entry is w (s(x) - y') scaled: terms up to 1 times the scale and weight
    _same_report(a, b, terms=abs(problem.grad_scale) * float(np.max(kw.get("sample_weight", 1.0))))
