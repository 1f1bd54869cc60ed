"""The compiled kernel with z-loss, logit scale, sample weights and softcap against the numpy
kernel's `semantic_rows`, on every target this CPU runs.

The kernel computes `semantic_rows`' formulas with the same row-level values but its own exp,
tanh, row-sum order and grouping of the per-entry products (every gradient term times s scale S
at once), so losses and gradients agree to ~1e-15 of the row's scale, floors to ~1e-15
relative; row_terms (s, Q, max|q|, sum|q|, max|z|) and row maxima are the same bits (with a
softcap, m and max|z| a few ulps apart: its tanh is not numpy's). Vocabulary shards stay on
numpy. With CI set nothing here skips for want of the kernel.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ce_cli.kernels.compiled import _library, targets, use_threads
from ce_cli.kernels.numpy_softmax import semantic_rows
from ce_cli.models.semantics import Semantics
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.checks import check_grad
from tests.test_fused import OPTIONS, compiled_kernel, needs_kernel, on_target  # noqa: F401 (fixtures)

RTOL = 1e-13
COEF = 4 * 2.0**-23

TERMS = {
    "z_loss": dict(z_loss=1e-3),
    "scale": dict(logit_scale=0.37),
    "scale_up": dict(logit_scale=3.0),
    "sample_weight": dict(sample_weight="s"),
    "z_loss+scale": dict(z_loss=0.05, logit_scale=1.7),
    "all": dict(z_loss=0.02, logit_scale=0.6, sample_weight="s"),
    "all+others+denominator": dict(z_loss=1e-4, logit_scale=2.5, sample_weight="s",
                                   smoothing_form="others", denominator=13.0),
    "softcap": dict(softcap=2.5),
    "softcap+scale": dict(softcap=30.0, logit_scale=0.5),
    "softcap+all": dict(softcap=1.5, logit_scale=0.3, z_loss=0.2, sample_weight="s"),
}
TARGETS_KW = {
    **{"index" if k == "plain" else k: v for k, v in OPTIONS.items()},
    "probs": {"probs": True},
    "probs+weights+smoothing": {"probs": True, "weight": "w", "label_smoothing": 0.2},
}


def _problem(rng, N: int, C: int, dtype, term: dict, tkw: dict, *, masks: bool = False,
             spread: float | None = None, confident: bool = False):
    """A problem with the term's semantics; rows of mixed scales (0.01 ... 1e4), some made
    confident (the target 60 units above the rest) and, with `masks`, -inf entries."""
    scales = [spread] if spread is not None else [0.01, 3.0, 40.0, 1e4]
    z = rng.standard_normal((N, C)) * rng.choice(scales, size=(N, 1))
    kw = {k: v for k, v in tkw.items() if k != "probs"}
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.0, 3.0, C)
    if tkw.get("probs"):
        y = rng.random((N, C)) ** 4
        y /= y.sum(axis=1, keepdims=True)
        cols = y.argmax(axis=1)
    else:
        y = rng.integers(0, C, N)
        cols = y
        if kw.get("ignore_index") == 0:
            y[1::4] = 0
    if confident:
        z[::2] *= 0.1
        z[np.arange(0, N, 2), cols[::2]] = z[::2].max(axis=1) + 60.0
    if masks:
        hide = rng.random((N, C)) < 0.3
        hide[np.arange(N), cols] = False  # no row is all -inf
        z[hide] = -np.inf
    sem = dict(term)
    if sem.get("sample_weight") == "s":
        sem["sample_weight"] = rng.uniform(-0.5, 2.5, N)
    if kw.get("reduction") == "none":
        sem.pop("denominator", None)  # it needs a reduced loss
    if tkw.get("probs"):
        sem.pop("smoothing_form", None)  # 'others' is for class-index labels
    problem, _ = build_softmax_ce(z.astype(dtype), y, semantics=Semantics(**sem), **kw)
    return problem


def _both(problem, grad=True, floor_coef=COEF):
    rows = np.arange(problem.n_rows)
    assert problem.kernel is not None
    fused = problem.kernel.evaluate(problem.z, rows, grad=grad, floor_coef=floor_coef)
    assert fused is not None
    with np.errstate(invalid="ignore", over="ignore"):
        ref = semantic_rows(problem, problem.z, rows, grad=grad, floor_coef=floor_coef)
    return fused, ref


def _assert_close(problem, fused, ref, grad=True, floor=True):
    """Loss and gradient to RTOL of the row's scale, the floor to RTOL relative, row terms and
    row maxima equal (softcap: a few ulps apart; its floor's S |Qe a - q| term is a difference
    that may cancel, accurate to RTOL of S (|Qe| + max|q|) k eps |s / D|)."""
    sem = problem.sem
    if sem.softcap is None:
        np.testing.assert_array_equal(fused.row_max, ref.row_max)
        np.testing.assert_array_equal(fused.row_terms, ref.row_terms)
    else:  # the kernel's tanh is not numpy's: m and max|z| a few ulps apart
        np.testing.assert_allclose(fused.row_max, ref.row_max, rtol=1e-14, atol=1e-300)
        np.testing.assert_array_equal(fused.row_terms[:, :4], ref.row_terms[:, :4])
        np.testing.assert_allclose(fused.row_terms[:, 4], ref.row_terms[:, 4], rtol=1e-14)
    s, Q, qabs, qsum, zabs = np.abs(ref.row_terms.T)
    lse = np.abs(ref.lse)
    inf = np.isinf(ref.loss)
    np.testing.assert_array_equal(np.isinf(fused.loss), inf)
    scale = np.abs(ref.loss) + s * (Q * (1 + lse) + qsum * zabs + sem.z_loss * lse * lse)
    err = np.abs(fused.loss[~inf] - ref.loss[~inf])
    assert np.all(err <= RTOL * scale[~inf] + 1e-300)
    lse_size = np.abs(ref.row_max) + np.abs(ref.log1p_s1)
    assert np.all(np.abs(fused.lse - ref.lse) <= 1e-15 * lse_size + 1e-300)
    qe_size = s * (Q + 2 * sem.z_loss * lse_size)
    assert np.all(np.abs(fused.total_weight - ref.total_weight) <= RTOL * qe_size + 1e-300)
    if grad:
        row_scale = (np.abs(ref.grad).max(axis=1) + (qe_size + s * qsum) * abs(problem.grad_scale)
                     * sem.logit_scale)[:, None]
        assert np.all(np.abs(fused.grad - ref.grad) <= RTOL * row_scale + 1e-300)
    if floor:
        # entries whose softmax weight is subnormal: numpy rounds a = e exp(-l1) there
        atol = 1e-290 + np.zeros((len(s), 1))
        if sem.softcap is not None:
            atol = atol + (RTOL * COEF * abs(problem.grad_scale) * sem.logit_scale
                           * (qe_size + s * qabs))[:, None]
        assert np.all(np.abs(fused.floor - ref.floor) <= RTOL * ref.floor + atol)


@needs_kernel
@pytest.mark.parametrize("C", [1, 7, 9, 128, 129, 1031])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tk", list(TARGETS_KW))
@pytest.mark.parametrize("term", list(TERMS))
def test_rows_match_semantic_rows(term, tk, dtype, C, on_target):
    rng = np.random.default_rng(C * 31 + len(term) * 7 + len(tk))
    problem = _problem(rng, 23, C, dtype, TERMS[term], TARGETS_KW[tk], confident=True)
    fused, ref = _both(problem)
    _assert_close(problem, fused, ref)
    fused, ref = _both(problem, grad=False, floor_coef=None)  # the loss-only call
    assert fused.grad is None and fused.floor is None
    _assert_close(problem, fused, ref, grad=False, floor=False)


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tk", ["index", "weights+smoothing+sum", "ignore", "probs"])
@pytest.mark.parametrize("term", list(TERMS))
def test_masked_rows_match_semantic_rows(term, tk, dtype, on_target):
    """-inf logits (masks): exp's careful path, the floor's 0 at a = 0, max|z| over the finite
    entries only."""
    rng = np.random.default_rng(len(term) + 3 * len(tk))
    problem = _problem(rng, 16, 301, dtype, TERMS[term], TARGETS_KW[tk], masks=True)
    fused, ref = _both(problem)
    _assert_close(problem, fused, ref)


@needs_kernel
@pytest.mark.parametrize("term", list(TERMS))
def test_large_logits_and_confident_rows(term, on_target):
    """|x| ~ 1e4: z - m far below exp's range; confident rows take the expm1 arg-max form."""
    rng = np.random.default_rng(5)
    for tk in ("index", "smoothing", "probs"):
        problem = _problem(rng, 12, 257, np.float64, TERMS[term], TARGETS_KW[tk], spread=1e4,
                           confident=True)
        fused, ref = _both(problem)
        _assert_close(problem, fused, ref)


@needs_kernel
def test_vocabulary_shards_stay_on_numpy():
    """A shard's rows need the rest of the vocabulary's mass (rho): numpy's extended path."""
    z = np.zeros((2, 5))
    lse = np.full(2, np.log(10.0))
    assert build_softmax_ce(z, np.array([0, 1]), semantics=Semantics(softcap=3.0))[0].kernel
    shard = build_softmax_ce(z, np.array([5, 7]), semantics=Semantics(vocab_offset=5),
                             lse=lse)[0]
    assert shard.kernel is None
    assert check_grad(z, np.array([5, 7]), vocab_offset=5, lse=lse).options["kernel"] == "numpy"


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tk", ["weights+smoothing+sum", "probs+weights+smoothing"])
@pytest.mark.parametrize("term", ["z_loss", "all", "softcap+all"])
def test_thread_counts_and_targets_give_identical_bits(term, tk, dtype, monkeypatch):
    """Every target this CPU runs and 1, 2, 3 threads (60 x 1031: enough entries for 3)."""
    runs = {}
    for name in targets():
        monkeypatch.setenv("CE_CHECK_TARGET", name)
        problem = _problem(np.random.default_rng(17), 60, 1031, dtype, TERMS[term],
                           TARGETS_KW[tk], masks=True)
        assert problem.kernel.fn.target == name
        for n in (1, 2, 3):
            with use_threads(n):
                ev = problem.kernel.evaluate(problem.z, np.arange(60), grad=True, floor_coef=1e-7)
            runs[name, n] = {k: np.asarray(getattr(ev, k)).view(np.uint64)
                             for k in ("loss", "grad", "floor", "total_weight", "lse", "row_terms")}
    first, *others = runs
    for key in others:
        for field in runs[first]:
            np.testing.assert_array_equal(runs[key][field], runs[first][field],
                                          err_msg=f"{key}: {field}")


def _report_pair(monkeypatch, z, y, g, **kw):
    reports = {}
    for which in ("1", "0"):
        monkeypatch.setenv("CE_CHECK_FUSED", which)
        reports[which] = check_grad(z, y, grad=g, fd="sample", worst=4, **kw)
    assert reports["1"].options["kernel"] == "compiled"
    assert reports["0"].options["kernel"] == "numpy"
    return reports["1"], reports["0"]


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("term", ["z_loss", "scale", "sample_weight", "all", "softcap+all"])
def test_check_grad_reports_like_numpy(term, dtype, monkeypatch, on_target):
    """The whole report on both kernels, for a correct gradient and one with planted bugs: the
    same verdicts and counts for every check, the same worst entries of the gradient check."""
    rng = np.random.default_rng(9)
    N, C = 48, 333
    sem = dict(TERMS[term])
    kw = dict(label_smoothing=0.1, ignore_index=3)
    if sem.get("sample_weight") == "s":
        kw["sample_weight"] = sem["sample_weight"] = rng.uniform(0.2, 2.0, N)
    z = (rng.standard_normal((N, C)) * 4).astype(dtype)
    y = rng.integers(0, C, N)
    y[5] = 3
    problem = build_softmax_ce(z.astype(np.float64), y, label_smoothing=0.1, ignore_index=3,
                               semantics=Semantics(**sem))[0]
    with np.errstate(invalid="ignore"):
        good = semantic_rows(problem, problem.z, np.arange(N)).grad.astype(dtype)
    bad = good.copy()
    bad[7, 11] *= 1.5
    bad[30, y[30]] *= 1.01
    bad[40] *= 1.0 + 1e-3
    opts = {k: v for k, v in sem.items() if k != "sample_weight"}
    for g, ok in ((good, True), (bad, False)):
        a, b = _report_pair(monkeypatch, z, y, g, **kw, **opts)
        assert a.ok is b.ok is ok
        for ca, cb in zip(a.checks, b.checks, strict=True):
            assert (ca.name, ca.ok, ca.mismatches) == (cb.name, cb.ok, cb.mismatches)
        ga, gb = (next(c for c in r.checks if c.name == "grad_vs_reference") for r in (a, b))
        assert ga.total == gb.total
        # a correct gradient's worst entries are rounding noise (they seed the sampled finite
        # differences, so those checks' entry counts may differ too); planted bugs are not
        if not ok:
            assert [e.index for e in ga.worst] == [e.index for e in gb.worst]
            assert {(7, 11), (30, y[30])} <= {e.index for e in ga.worst}
            for ea, eb in zip(ga.worst, gb.worst):
                assert ea.got == eb.got
                assert abs(ea.expected - eb.expected) <= 1e-14 * abs(eb.expected) + 1e-300


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), c=st.integers(1, 300),
       spread=st.sampled_from([1e-3, 1.0, 30.0, 800.0, 1e4]),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**32 - 1),
       z_loss=st.sampled_from([0.0, 1e-4, 0.3]), logit_scale=st.sampled_from([1.0, 0.25, 0.7, 5.0]),
       weighted_rows=st.booleans(), tk=st.sampled_from(list(TARGETS_KW)), masks=st.booleans(),
       softcap=st.sampled_from([None, 0.3, 3.0, 50.0]))
def test_rows_match_semantic_rows_property(on_target, n, c, spread, dtype, seed, z_loss,
                                           logit_scale, weighted_rows, tk, masks, softcap):
    rng = np.random.default_rng(seed)
    term = dict(z_loss=z_loss, logit_scale=logit_scale, softcap=softcap,
                sample_weight="s" if weighted_rows else None)
    if not (z_loss or logit_scale != 1.0 or weighted_rows or softcap):
        term["z_loss"] = 1e-6  # an extended problem
    problem = _problem(rng, n, c, np.dtype(dtype), term, TARGETS_KW[tk], spread=spread,
                       masks=masks and c > 1, confident=bool(seed % 2))
    fused, ref = _both(problem)
    _assert_close(problem, fused, ref)


TANH_ULPS, SECH2_ULPS = 4.0, 6.0  # measured over 1e6 points: 3.9 and 5.5 (numpy: 1.2 and 4.2)


@needs_kernel
def test_softcap_tanh_and_sech2_ulps(on_target):
    """The kernel's cap tanh(x / cap) and sech^2 against long double tanh and 1/cosh^2, from
    |u| ~ 1e-300 through ~1 to 1e300: within TANH_ULPS and SECH2_ULPS ulps (sech^2 where it
    is a normal number); -inf gives -cap and 0."""
    fn = _library().ce_cap_funcs_on
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64]
    rng = np.random.default_rng(0)
    k = 20000
    u = np.concatenate([10.0 ** rng.uniform(-300, -1, k), rng.uniform(0, 2, k),
                        rng.uniform(2, 25, k), 10.0 ** rng.uniform(1.3, 300, k), [0.0, 1.0]])
    u *= rng.choice([-1.0, 1.0], u.size)
    cap = 2.0
    x = u * cap  # exact: u = x / cap
    z, dz = np.empty_like(x), np.empty_like(x)
    assert fn(on_target.encode(), x.ctypes.data, cap, z.ctypes.data, dz.ctypes.data, x.size) == 0
    ul = u.astype(np.longdouble)
    with np.errstate(over="ignore"):
        th, s2 = np.tanh(ul), 1 / np.cosh(ul) ** 2

    def ulps(got, want):
        err = np.abs(got.astype(np.longdouble) - want).astype(np.float64)
        return err / np.spacing(np.abs(want.astype(np.float64)))

    assert ulps(z / cap, th).max() <= TANH_ULPS
    normal = s2.astype(np.float64) > np.finfo(np.float64).tiny
    assert ulps(dz[normal], s2[normal]).max() <= SECH2_ULPS
    x = np.array([-np.inf, np.inf])
    assert fn(on_target.encode(), x.ctypes.data, cap, z.ctypes.data, dz.ctypes.data, 2) == 0
    assert list(z[:2]) == [-cap, cap] and list(dz[:2]) == [0.0, 0.0]
