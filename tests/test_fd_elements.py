"""Finite differences of `binary` element by element (finite_diff.fd_entries on SigmoidBCE).

Sigmoid BCE is a sum of independent per-element terms, so the central difference of entry
(r, c) needs only that element's loss at z +- h: `SigmoidBCE.entry_losses` evaluates the
sampled elements alone through the kernel that computes the reference (compiled or numpy), and
`entry_fd_error_bound` bounds the difference without a row sum's rounding. Checked here: the
elements evaluated alone are the bits they have in their rows; the bound holds against the
exact derivative (long double) for correct gradients at extreme logits and every option; it is
tight enough that fd_vs_grad catches a 1e-6 relative error or a sign flip at one entry, which
the row-sum bound could not; and the result does not depend on the thread count.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ce_cli.models.sigmoid import SigmoidBCE, build_sigmoid_bce
from ce_cli.verify import finite_diff
from ce_cli.verify.checks import check_binary
from ce_cli.verify.finite_diff import fd_entries, step_for

pytestmark = pytest.mark.usefixtures("both_kernels")

LD = np.longdouble
LD_EPS = float(np.finfo(LD).eps)  # 2^-63 on x86-64 (80-bit); float64's on some platforms

OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "weight": {"weight": "w"},
    "pos_weight": {"pos_weight": "pw"},
    "negative_pos_weight": {"pos_weight": "npw"},
    "tiny_pos_weight": {"pos_weight": "tpw"},  # 1 + (pw - 1) y rounds to 0 at y = 1
    "smoothing": {"label_smoothing": 0.3},
    "sample_weight": {"sample_weight": "s", "reduction": "sum"},
    "denominator": {"denominator": 7.5, "reduction": "sum"},
    "softcap": {"softcap": 15.0},
    "logit_scale": {"logit_scale": 0.37},
    "all": {"weight": "w", "pos_weight": "pw", "label_smoothing": 0.1, "sample_weight": "s",
            "softcap": 30.0, "logit_scale": 1.5, "reduction": "sum"},
}


def _options(name: str, N: int, K: int, rng) -> dict:
    kw = dict(OPTIONS[name])
    arrays = {"w": lambda: rng.uniform(-2.0, 3.0, (N, K)), "pw": lambda: rng.uniform(0.1, 5.0, K),
              "npw": lambda: rng.uniform(-2.0, 3.0, K), "tpw": lambda: rng.uniform(0.0, 1e-60, K),
              "s": lambda: rng.uniform(-1.0, 2.0, N)}
    for key in ("weight", "pos_weight", "sample_weight"):
        if isinstance(kw.get(key), str):
            kw[key] = arrays[kw[key]]()
    return kw


def _problem(name: str, dtype=np.float64, N: int = 6, K: int = 9, seed: int = 0) -> SigmoidBCE:
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, K)) * rng.choice([0.1, 4.0, 60.0, 1e4], (N, 1))).astype(dtype)
    z[0, :2] = -np.inf
    y = (rng.random((N, K)) < 0.4).astype(np.float32)
    y[1] = rng.random(K)  # soft labels
    y[0, 1] = 1.0  # a -inf logit with a positive label: its row loss is infinite
    return build_sigmoid_bce(z, y, **_options(name, N, K, rng))[0]


def _all_entries(p: SigmoidBCE) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(p.n_rows), p.n_classes), np.tile(np.arange(p.n_classes), p.n_rows)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elements_alone_are_their_bits_in_the_row(name, dtype):
    """Gradient, floor and loss of each element evaluated alone (`entry_values`) equal, bit for
    bit, what the row evaluation gives at that entry: the FD reference is the pass's."""
    p = _problem(name, dtype)
    rows, cols = _all_entries(p)
    rows, cols = rows[::-1].copy(), cols[::-1].copy()  # any order
    ev = p.evaluate_rows(np.asarray(p.z), np.arange(p.n_rows), floor_coef=1e-7)
    one = p.entry_values(rows, cols, np.asarray(p.z)[rows, cols], floor_coef=1e-7)
    assert one.grad is not None and one.floor is not None and ev.grad is not None
    np.testing.assert_array_equal(_bits(one.grad[0]), _bits(ev.grad[rows, cols]))
    np.testing.assert_array_equal(_bits(one.floor[0]), _bits(ev.floor[rows, cols]))
    items = p.per_sample(ev)
    np.testing.assert_array_equal(_bits(p.entry_losses(rows, cols, np.asarray(p.z)[rows, cols])),
                                  _bits(items[rows, cols]))


def test_kernel_follows_the_problem():
    """The elements go through the problem's own kernel: none when it has none."""
    p = _problem("plain")
    numpy_only = replace(p)
    object.__setattr__(numpy_only, "kernel", None)
    rows, cols = _all_entries(p)
    assert numpy_only.at_entries(rows, cols).kernel is None
    assert (p.at_entries(rows, cols).kernel is None) == (p.kernel is None)
    assert p.at_entries(rows, cols).grad_scale == p.grad_scale


@pytest.mark.parametrize("name", list(OPTIONS))
def test_fd_entries_on_elements(name):
    """fd_entries of a binary problem: the reference and floor are the row evaluation's, each
    difference is its element's (2 loss evaluations an entry), -inf logits are skipped, and an
    entry in a row with an infinite loss elsewhere is checked (its own loss is finite)."""
    p = _problem(name)
    rows, cols = _all_entries(p)
    res = fd_entries(p, rows, cols, 1e-7)
    ev = p.evaluate_rows(np.asarray(p.z), np.arange(p.n_rows), floor_coef=1e-7)
    np.testing.assert_array_equal(_bits(res.reference), _bits(ev.grad[rows, cols]))
    np.testing.assert_array_equal(_bits(res.floor), _bits(ev.floor[rows, cols]))
    assert res.evaluations == 2 * rows.size
    masked = np.isneginf(np.asarray(p.z)[rows, cols])
    assert res.skipped == masked.sum() == 2
    assert np.isnan(res.fd[masked]).all()
    assert np.isfinite(res.fd[~masked]).all() and np.isfinite(res.bound[~masked]).all()
    # row 0's loss is infinite (a softcap maps -inf to -cap), its finite entries are checked
    assert np.isinf(ev.loss[0]) == (p.sem.softcap is None)
    assert np.isfinite(res.fd[(rows == 0) & ~masked]).all()


def test_same_bits_at_every_thread_count(monkeypatch):
    p = _problem("all", N=40, K=300, seed=3)
    rows, cols = finite_diff.sample_entries(p, 64, 1, [(5, 7)])
    runs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("CE_CHECK_THREADS", threads)
        res = fd_entries(p, rows, cols, 1e-7)
        runs.append(np.concatenate([_bits(res.fd), _bits(res.bound), _bits(res.reference)]))
    for run in runs[1:]:
        np.testing.assert_array_equal(run, runs[0])


# --- the bound against the exact derivative ---------------------------------------------------

def _exact_derivative(p: SigmoidBCE, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """d/dx of scale * l(T(x)) at the entries in long double, for the coefficients the kernels
    use (y' = smoothed y, pw y' and 1 - y' and w s formed in float64, as `coefficients`)."""
    y, w, pw = p.coefficients(rows)
    k = np.arange(rows.size)
    y = y[k, cols]
    pos = y if pw is None else pw[cols] * y
    omy = 1.0 - y
    x = LD(1) * np.asarray(p.z, dtype=np.float64)[rows, cols]
    S = LD(p.sem.logit_scale)
    if p.sem.softcap is None:
        z, dz = x * S, S + 0 * x
    else:
        cap = LD(p.sem.softcap)
        z, dz = cap * np.tanh(S * x / cap), S / np.cosh(S * x / cap) ** 2
    e = np.exp(-np.abs(z))
    s_pos = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    s_neg = np.where(z >= 0, e / (1 + e), 1 / (1 + e))
    g = (LD(1) * omy) * s_pos - (LD(1) * pos) * s_neg
    if w is not None:
        g = g * (LD(1) * w[k, cols])
    return g * dz * LD(p.grad_scale)


def _assert_bound_holds(p: SigmoidBCE) -> None:
    rows, cols = _all_entries(p)
    res = fd_entries(p, rows, cols)
    with np.errstate(invalid="ignore", over="ignore"):
        exact = _exact_derivative(p, rows, cols)
    ok = np.isfinite(res.fd)
    err = np.abs(LD(1) * res.fd[ok] - exact[ok])
    # the long double's own rounding, and subnormal results (the comparisons' `tiny` allowance)
    slack = 64 * LD_EPS * np.abs(exact[ok]) + np.finfo(float).tiny
    worst = np.max(err / (LD(1) * res.bound[ok] + slack), initial=0.0)
    assert worst <= 1.0, f"|fd - exact| / bound = {float(worst):.3g}"


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bound_holds_for_the_options(name, dtype):
    _assert_bound_holds(_problem(name, dtype, N=8, K=40, seed=11))


LOGITS = st.one_of(
    st.floats(-40.0, 40.0), st.floats(-1e4, 1e4),
    st.sampled_from([0.0, 1e-300, -1e-300, 1e4, -1e4, 708.0, -745.0, 36.7, -36.7, 1.0]))


@st.composite
def cases(draw):
    N, K = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    z = np.array(draw(st.lists(LOGITS, min_size=N * K, max_size=N * K))).reshape(N, K)
    y = np.array(draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
                               min_size=N * K, max_size=N * K))).reshape(N, K)
    weights = st.floats(-3.0, 3.0)
    kw: dict = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    if draw(st.booleans()):
        kw["weight"] = np.array(draw(st.lists(weights, min_size=N * K, max_size=N * K))).reshape(N, K)
    if draw(st.booleans()):
        kw["pos_weight"] = np.array(draw(st.lists(st.floats(-2.0, 20.0), min_size=K, max_size=K)))
    if draw(st.booleans()):
        kw["sample_weight"] = np.array(draw(st.lists(st.floats(0.01, 3.0), min_size=N, max_size=N)))
    kw["label_smoothing"] = draw(st.sampled_from([0.0, 0.05, 1.0]) | st.floats(0.0, 1.0))
    kw["softcap"] = draw(st.none() | st.floats(0.5, 60.0))
    kw["logit_scale"] = draw(st.sampled_from([1.0]) | st.floats(0.05, 4.0))
    return z.astype(dtype), y, kw


@settings(max_examples=300, deadline=None)
@given(case=cases())
def test_bound_holds_at_extreme_logits(case):
    """|fd - d/dx| <= bound (without FD_SAFETY) for |z| up to 1e4, every option combined, on
    the kernel of the module's run: the bound is not below what the rounding produces."""
    z, y, kw = case
    _assert_bound_holds(build_sigmoid_bce(z, y, **kw)[0])


# --- bugs of realistic size are caught --------------------------------------------------------

def _batch(N: int = 16, K: int = 2000, seed: int = 5):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, K)) * 3.0
    y = (rng.random((N, K)) < 0.05).astype(np.float64)
    p = build_sigmoid_bce(z, y)[0]
    g = np.asarray(p.evaluate_rows(z, np.arange(N)).grad)
    return z, y, g, p


def _fd_checks(report) -> dict:
    return {c.name: c for c in report.checks if c.name.startswith("fd_")}


@pytest.mark.parametrize("bug", ["relative_1e-6", "sign"])
def test_realistic_bug_at_one_entry_is_caught(bug):
    """A float64 gradient off by 1e-6 relative (or with its sign flipped) at one entry fails
    fd_vs_grad at that entry, while the correct gradient passes. The row-sum bound at that
    entry allows more than the bug: only the element bound catches it."""
    z, y, g, p = _batch()
    r, c = 3, 17
    ok = check_binary(z, y, grad=g, fd="sample", samples=64)
    assert ok.ok, ok.verdict
    bad = g.copy()
    bad[r, c] = g[r, c] * (1.0 + 1e-6) if bug != "sign" else -g[r, c]
    report = check_binary(z, y, grad=bad, fd="sample", samples=64)
    check = _fd_checks(report)["fd_vs_grad"]
    assert not check.ok and check.mismatches == 1
    assert tuple(check.worst[0].index) == (r, c)
    assert _fd_checks(report)["fd_vs_reference"].ok
    ev = p.evaluate_rows(z[r:r + 1], np.array([r]))
    h = step_for(z[r:r + 1, c])
    row_bound = p.fd_error_bound(np.array([r]), np.array([c]), z[r:r + 1, c], h, ev)[0]
    assert row_bound > abs(bad[r, c] - g[r, c]) * (1.0 if bug != "sign" else 0.0)


def test_float32_gradient_sign_bug_is_caught():
    z, y, g, _ = _batch(N=8, K=500, seed=2)
    bad = g.astype(np.float32)
    bad[2, 9] = -bad[2, 9]
    check = _fd_checks(check_binary(z.astype(np.float32), y, grad=bad, fd="sample"))["fd_vs_grad"]
    assert not check.ok and tuple(check.worst[0].index) == (2, 9)


def test_target_columns_over_blocks_of_rows():
    """The sampled rows' largest labels, read ~1 MB of rows at a time: the argmax of all rows
    at once, ties to the first."""
    rng = np.random.default_rng(4)
    K = 100_000  # 2 rows a block
    y = (rng.random((9, K)) < 0.001).astype(np.float32)
    y[3] = 0.0  # no positive: column 0
    y[5] = 0.0
    y[5, [10, 20]] = 1.0  # a tie: the first
    p = build_sigmoid_bce(np.zeros((9, K), dtype=np.float32), y)[0]
    rows = np.array([8, 0, 3, 5, 5, 2, 7])
    got = p.target_columns(rows)
    np.testing.assert_array_equal(got, y[rows].argmax(axis=1))
    assert got[2] == 0 and got[3] == 10


def test_no_entries():
    p = _problem("all")
    none = np.zeros(0, dtype=np.int64)
    res = fd_entries(p, none, none, 1e-7)
    assert res.fd.shape == res.bound.shape == res.reference.shape == (0,)
    assert res.floor is not None and res.floor.shape == (0,)
    assert (res.evaluations, res.skipped) == (0, 0)


# --- `--fd full`: every element's own difference, 2 evaluations per element ------------------

@pytest.mark.parametrize("name", list(OPTIONS))
def test_full_sweep_is_every_elements_own_difference(name):
    """fd_full on a sigmoid problem is fd_entries at every entry of the chunk: the same bits,
    bounds and skipped entries (-inf logits), in row-major order."""
    p = _problem(name)
    rows, cols = _all_entries(p)
    each = fd_entries(p, rows, cols)
    for start, stop in ((0, p.n_rows), (2, 5)):
        fd, bound, skipped = finite_diff.fd_full(p, start, stop)
        part = slice(start * p.n_classes, stop * p.n_classes)
        assert fd.shape == bound.shape == (stop - start, p.n_classes)
        np.testing.assert_array_equal(_bits(fd.ravel()), _bits(each.fd[part]))
        np.testing.assert_array_equal(_bits(bound.ravel()), _bits(each.bound[part]))
        assert skipped == int(np.count_nonzero(np.isnan(each.fd[part])))


@pytest.mark.parametrize("bug", ["relative_1e-6", "sign"])
def test_full_sweep_catches_a_bug_at_one_entry(bug):
    """`fd=full` proves every entry: a 1e-6 relative error at one entry of a 16x2000 gradient
    fails fd_vs_grad there and nowhere else, at 2 evaluations per element."""
    z, y, g, _ = _batch()
    ok = check_binary(z, y, grad=g, fd="full")
    assert ok.ok, ok.verdict
    assert (ok.fd_mode, ok.fd_evaluations) == ("full", 2 * z.size)
    bad = g.copy()
    bad[9, 1234] = g[9, 1234] * (1.0 + 1e-6) if bug != "sign" else -g[9, 1234]
    checks = _fd_checks(check_binary(z, y, grad=bad, fd="full"))
    assert checks["fd_vs_reference"].ok
    assert checks["fd_vs_grad"].mismatches == 1
    assert tuple(checks["fd_vs_grad"].worst[0].index) == (9, 1234)


def test_auto_mode_and_limits_count_elements():
    """`auto` picks `full` for a sigmoid wherever it would check every row (it costs what
    `directional` costs), `sample` beyond; `full` is refused only past 2 * N * C element
    evaluations over the limit, and the refusal says so."""
    from ce_cli.io import limits

    choose = finite_diff.choose_mode
    big = int(finite_diff.DIRECTIONAL_BUDGET)
    assert choose("auto", big // 2000, 2000, elementwise=True) == "full"
    assert choose("auto", big // 2000 + 1, 2000, elementwise=True) == "sample"
    assert choose("auto", 4096, 1000) == "directional"  # a softmax: unchanged
    assert choose("full", 1, 40_000, elementwise=True) == "full"
    with pytest.raises(Exception, match="2\\*N\\*C\\^2"):
        choose("full", 1, 40_000)
    n = int(limits.FD_FULL_BUDGET // 2) + 1
    message = limits.fd_full_refusal((n, 1), elementwise=True)
    assert message is not None and "2*N*C;" in message and "`fd=sample`" in message
    assert limits.fd_full_refusal((n - 1, 1), elementwise=True) is None


def test_cli_full_sweep_on_a_row_too_wide_for_softmax(tmp_path, invoke):
    """`binary --fd full` on 1 x 40,000 runs (80,000 element evaluations) where `grad --fd
    full` is refused up front (3.2e9 row-entry evaluations)."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((1, 40_000))
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", (rng.random((1, 40_000)) < 0.5).astype(np.float64))
    result = invoke(["binary", tmp_path / "z.npy", tmp_path / "y.npy", "--fd", "full", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fd"] == {"mode": "full", "evaluations": 80_000}
    np.save(tmp_path / "i.npy", np.array([0]))
    refused = invoke(["grad", tmp_path / "z.npy", tmp_path / "i.npy", "--fd", "full"])
    assert refused.exit_code == 2
    over = invoke(["binary", tmp_path / "z.npy", tmp_path / "y.npy", "--fd", "full",
                   "--fd-budget", "1e-6"])  # the budget, from a calibration of binary's own sweep
    assert over.exit_code == 2 and "80,000 element loss evaluations" in over.stderr
    assert "or use --fd sample" in over.stderr
