"""`binary --softcap` and `--logit-scale` on the compiled kernel against the numpy kernel's
`sigmoid_rows` (model.transformed), on every target this CPU runs.

The kernel computes z = T(x) with its own tanh and sech^2 (the softmax path's, a few ulps from
numpy's) and x (S / cap) for numpy's (S x) / cap, then numpy_sigmoid's formulas on z in the same
order, with its own exp, log1p and row-sum order. So a logit scale alone gives z and dz = S with
numpy's bits, and everything agrees to ~1e-15 of its size; with a softcap z and dz differ by a
few ulps of u = S x / cap: the gradient, whose sech^2 = 4 exp(-2|u|) / (1 + exp(-2|u|))^2 turns
an ulp of u into 2 |u| ulps, agrees to eps (64 + 4 |u|) of its terms' size, everything else to
RTOL. With CI set nothing here skips for want of the kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ce_cli.kernels.numpy_sigmoid import sigmoid_rows
from ce_cli.models.sigmoid import build_sigmoid_bce
from tests.test_binary_options_kernel import _reports, _same_report
from tests.test_fused import (assert_same_bits, compiled_kernel, needs_kernel,  # noqa: F401
                              on_target)

RTOL = 1e-13
EPS = 2.0**-52
COEF = 4 * 2.0**-23

TRANSFORMS: dict[str, dict[str, Any]] = {
    "softcap": {"softcap": 30.0},
    "scale": {"logit_scale": 0.5},
    "softcap+scale": {"softcap": 5.0, "logit_scale": 1.7},
}
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "w+pw": {"weight": "w", "pos_weight": "pw"},
    "smoothing+sample": {"label_smoothing": 0.1, "sample_weight": "s"},
    "all+sum": {"label_smoothing": 0.2, "sample_weight": "s", "weight": "w", "pos_weight": "pw",
                "reduction": "sum"},
}


def _problem(K: int, dtype, transform: str, opt: str, R: int = 23, seed: int = 0,
             masks: bool = True):
    """Rows of mixed scales (|x| from 0.01 through ~4e4), soft labels in every third row and,
    with `masks`, -inf logits (one row all -inf)."""
    rng = np.random.default_rng(seed + K)
    x = rng.standard_normal((R, K)) * rng.choice([0.01, 3.0, 40.0, 1e4], size=(R, 1))
    if masks:
        x[rng.random((R, K)) < 0.05] = -np.inf
        x[R // 2] = -np.inf
    y = (rng.random((R, K)) < 0.3).astype(np.float64)
    y[::3] = rng.random((len(y[::3]), K))
    kw = dict(OPTIONS[opt])
    if kw.get("sample_weight") == "s":
        kw["sample_weight"] = rng.uniform(-0.5, 3.0, R)
        kw["sample_weight"][::5] = 0.0
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(-1.0, 2.0, (R, K))
    if kw.get("pos_weight") == "pw":
        kw["pos_weight"] = rng.uniform(0.2, 4.0, K)
    return build_sigmoid_bce(x.astype(dtype), y, **kw, **TRANSFORMS[transform])[0]


def _both(problem, grad=True, floor_coef=COEF):
    rows = np.arange(problem.n_rows)
    assert problem.kernel is not None and problem.transformed
    fused = problem.kernel.evaluate(problem.z, rows, grad=grad, floor_coef=floor_coef)
    assert fused is not None
    with np.errstate(invalid="ignore", over="ignore"):
        ref = sigmoid_rows(problem, problem.z, rows, grad=grad, floor_coef=floor_coef)
    return fused, ref


def _assert_close(problem, fused, ref) -> None:
    """Items to RTOL of their size (|item| + its weight |coef w| + g1 |z|), row sums to RTOL
    of theirs, the gradient to eps (64 + 4 |u|) of |w| (|1 - y'| + |pw y'|) |scale T'|, the
    floor to RTOL relative (and, with a softcap, of its S |dl/dz| term's size)."""
    rows = np.arange(problem.n_rows)
    x = np.asarray(problem.z, dtype=np.float64)
    sem = problem.sem
    np.testing.assert_array_equal(np.isinf(fused.items), np.isinf(ref.items))
    fin = np.isfinite(ref.items)
    size = np.abs(ref.items) + ref.item_weight
    assert np.all(np.abs(fused.items[fin] - ref.items[fin]) <= RTOL * size[fin])
    np.testing.assert_allclose(fused.item_weight, ref.item_weight, rtol=RTOL, atol=0)
    ok = np.isfinite(ref.loss)
    np.testing.assert_array_equal(np.isfinite(fused.loss), ok)
    row_size = np.where(fin, size, 0.0).sum(axis=1)
    assert np.all(np.abs(fused.loss[ok] - ref.loss[ok]) <= RTOL * row_size[ok])
    np.testing.assert_allclose(fused.total_weight, ref.total_weight, rtol=RTOL, atol=0)
    np.testing.assert_allclose(fused.row_terms, ref.row_terms, rtol=RTOL, atol=0)
    y, w, pw = problem.coefficients(rows)
    term = (np.abs(1 - y) + np.abs(y if pw is None else pw * y)) * abs(problem.grad_scale)
    if w is not None:
        term = term * np.abs(w)
    with np.errstate(invalid="ignore", over="ignore"):
        u = np.abs(x * sem.logit_scale / sem.softcap) if sem.softcap else np.zeros_like(x)
        dz = sem.logit_scale / np.cosh(u) ** 2 if sem.softcap else sem.logit_scale
    u = np.where(np.isfinite(u), u, 0.0)
    assert np.all(np.abs(fused.grad - ref.grad) <= EPS * (64 + 4 * u) * term * dz + 1e-300)
    # with a softcap the floor's S |dl/dz| is a difference that may cancel (soft labels):
    # accurate to RTOL of S |w| (|1 - y'| + |pw y'|) k eps |scale|
    atol = 1e-300 + (RTOL * COEF * sem.logit_scale * term if sem.softcap else 0.0)
    assert np.all(np.abs(fused.floor - ref.floor) <= RTOL * ref.floor + atol)


@needs_kernel
@pytest.mark.parametrize("K", [1, 7, 9, 129, 1031])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_rows_match_numpy_kernel(transform, opt, dtype, K, on_target):
    """Loss, gradient, floor, items, item weights, total weights and row_terms."""
    problem = _problem(K, dtype, transform, opt)
    fused, ref = _both(problem)
    _assert_close(problem, fused, ref)


@needs_kernel
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_loss_only_and_streaming_calls(transform, on_target):
    """A loss-only call writes no per-element values but the same row sums; the streaming
    pass's deferred per-element losses and weights are those of a full call."""
    problem = _problem(129, np.float32, transform, "all+sum")
    rows = np.arange(problem.n_rows)
    full = problem.kernel.evaluate(problem.z, rows, grad=True, floor_coef=COEF)
    only = problem.kernel.evaluate(problem.z, rows, grad=False)
    assert only.items is None and only.grad is None
    for field in ("loss", "total_weight", "row_terms"):
        np.testing.assert_array_equal(getattr(only, field), getattr(full, field), err_msg=field)
    streamed = problem.kernel.evaluate(problem.z, rows, grad=False, stream=True)
    items, weight = streamed.per_element()
    np.testing.assert_array_equal(items, full.items)
    np.testing.assert_array_equal(weight, full.item_weight)


@needs_kernel
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_large_logits(transform, on_target):
    """|x| up to 1e4 in every row, float32 and float64."""
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(3)
        x = rng.uniform(-1e4, 1e4, (9, 300)).astype(dtype)
        y = (rng.random((9, 300)) < 0.5).astype(np.float64)
        problem = build_sigmoid_bce(x, y, pos_weight=rng.uniform(0.2, 4.0, 300),
                                    **TRANSFORMS[transform])[0]
        fused, ref = _both(problem)
        _assert_close(problem, fused, ref)


@needs_kernel
@pytest.mark.parametrize("K", [9, 100])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_nan_and_inf_rows_are_handed_back(transform, K, on_target):
    """NaN or +inf raw logits hand the rows back (the numpy kernel reports them); a row of
    -inf only is served."""
    problem = _problem(K, np.float64, transform, "plain", R=4, masks=False)
    rows = np.arange(4)
    for col in (3, K - 1):
        for bad in (np.nan, np.inf):
            z = np.array(problem.z)
            z[2, col] = bad
            assert problem.kernel.evaluate(z, rows, grad=True) is None
            assert problem.kernel.evaluate(z, rows, grad=False) is None
    z = np.array(problem.z)
    z[1] = -np.inf
    assert problem.kernel.evaluate(z, rows, grad=True) is not None


def _bits_of(ev) -> dict:
    return {k: np.asarray(getattr(ev, k)).view(np.uint64)
            for k in ("loss", "grad", "floor", "total_weight", "items", "item_weight", "row_terms")}


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_bits_across_targets_and_threads(transform, dtype, monkeypatch):
    """Every target this CPU runs and 1, 2, 3 threads (60 x 1031: enough for 3): same bits."""
    assert_same_bits(monkeypatch, lambda: _problem(1031, dtype, transform, "all+sum", R=60),
                     _bits_of)


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fd", ["sample", "directional"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_check_binary_reports_like_numpy(transform, fd, dtype, monkeypatch, on_target):
    """The folded comparison on both kernels: a correct gradient passes on both, a planted bug
    fails on both with the same counts and worst entries."""
    rng = np.random.default_rng(11)
    N, K = 48, 301
    x = (rng.standard_normal((N, K)) * 8).astype(dtype)
    x[3, :5] = -np.inf
    y = (rng.random((N, K)) < 0.2).astype(np.float32)
    kw = {"weight": rng.uniform(0.1, 2.0, (N, K)), "pos_weight": rng.uniform(0.2, 4.0, K),
          "label_smoothing": 0.05, **TRANSFORMS[transform]}
    problem = build_sigmoid_bce(x.astype(np.float64), y, **kw)[0]
    good = problem.evaluate(0, N).grad.astype(dtype)
    a, b = _reports(monkeypatch, x, y, grad=good, fd=fd, worst=4, **kw)
    assert a.ok and b.ok
    _same_report(a, b)
    bad = good.copy()
    bad[6, 7] = bad[6, 7] * 1.5 + 1e-3 * abs(problem.grad_scale)
    bad[40, 100] = bad[40, 100] * 1.2 + 1e-3 * abs(problem.grad_scale)
    bad[47, 300] = np.nan
    a, b = _reports(monkeypatch, x, y, grad=bad, fd=fd, worst=3, **kw)
    assert not a.ok and not b.ok
    _same_report(a, b)
    check = next(c for c in a.checks if c.name == "grad_vs_reference")
    assert {(6, 7), (40, 100), (47, 300)} <= {e.index for e in check.worst}


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), k=st.integers(1, 300), spread=st.sampled_from([0.01, 1.0, 30.0, 1e4]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31),
       softcap=st.sampled_from([None, 0.5, 30.0]), scale=st.sampled_from([1.0, 0.3, 2.5]),
       smoothing=st.sampled_from([0.0, 0.1]), weighted=st.booleans())
def test_rows_match_numpy_kernel_property(on_target, n, k, spread, dtype, seed, softcap, scale,
                                          smoothing, weighted):
    if softcap is None and scale == 1.0:
        softcap = 3.0
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * spread).astype(dtype)
    y = rng.random((n, k))
    kw = {"weight": rng.uniform(-1.0, 2.0, (n, k))} if weighted else {}
    problem = build_sigmoid_bce(x, y, softcap=softcap, logit_scale=scale,
                                label_smoothing=smoothing, **kw)[0]
    fused, ref = _both(problem)
    _assert_close(problem, fused, ref)


@needs_kernel
@pytest.mark.parametrize("flags", [["--softcap", "30"], ["--logit-scale", "0.5"]])
def test_command_line_runs_the_compiled_kernel(flags, invoke, tmp_path, monkeypatch):
    """`ce-check binary --softcap / --logit-scale --json`: the compiled kernel, the same verdict
    and worst entry as CE_CHECK_FUSED=0, a planted error found by both."""
    import json
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 200)) * 6).astype(np.float32)
    y = (rng.random((16, 200)) < 0.1).astype(np.float32)
    kw = {"softcap": 30.0} if flags[0] == "--softcap" else {"logit_scale": 0.5}
    g = build_sigmoid_bce(x.astype(np.float64), y, **kw)[0].evaluate(0, 16).grad.astype(np.float32)
    g[4, 9] *= 1.3
    for name, arr in (("x", x), ("y", y), ("g", g)):
        np.save(tmp_path / f"{name}.npy", arr)
    args = ["binary", tmp_path / "x.npy", tmp_path / "y.npy", "--grad", tmp_path / "g.npy",
            *flags, "--json"]
    out = {}
    for which in ("1", "0"):
        result = invoke(args, env={"CE_CHECK_FUSED": which})
        assert result.exit_code == 1, result.output
        out[which] = json.loads(result.stdout)
    assert (out["1"]["options"]["kernel"], out["0"]["options"]["kernel"]) == ("compiled", "numpy")
    worst = [next(c for c in out[k]["checks"] if c["name"] == "grad_vs_reference")["worst"][0]
             for k in ("1", "0")]
    assert worst[0]["index"] == worst[1]["index"] == [4, 9]
