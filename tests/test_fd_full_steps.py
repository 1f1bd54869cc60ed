"""Finite differences whose steps the compiled kernel takes from each row's own sums: `--fd
full` (finite_diff._full_by_steps: each row evaluated once, every column's z + h and z - h)
gives the bits of the column sweeps (every row evaluated whole with column j set) on every
target this CPU runs, and sampled entries the bits of fresh row copies; the cost guard
calibrates on the kernel that runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ce_cli.kernels.compiled import use_threads
from ce_cli.models.semantics import Semantics
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify import finite_diff
from tests.test_fused import compiled_kernel, on_target  # noqa: F401 (fixtures)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


FULL_CASES = {
    "index+smoothing": dict(kind="index"),
    "probs": dict(kind="probs"),
    "weights+ignore": dict(kind="index", weight=True, ignore_index=3),
    "z_loss+softcap": dict(kind="index", semantics=dict(z_loss=1e-3, softcap=5.0)),
    "scale+sample_weight": dict(kind="index", semantics=dict(logit_scale=0.4, sample_weight=True)),
}


@pytest.mark.parametrize("case", list(FULL_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 9, 257])
def test_full_sweeps_by_steps_are_the_column_sweeps(case, dtype, C, on_target, monkeypatch):
    """`--fd full` on the compiled kernel takes each column's steps from the rows' own sums
    (`_full_by_steps`): the bits of the column sweeps (every row evaluated whole with column j
    at z + h, then z - h), with masked entries, an infinite-loss row, every training-code term,
    a step per call (rows split over blocks), 1 and 2 threads."""
    spec = dict(FULL_CASES[case])
    rng = np.random.default_rng(C)
    N = 11
    z = (rng.standard_normal((N, C)) * np.array([0.01, 3.0, 30.0, 800.0] * 3)[:N, None]).astype(dtype)
    if C > 3:
        z[2, :3] = -np.inf  # masked logits (skipped)
    kw: dict = {}
    sem = dict(spec.get("semantics", {}))
    if sem.pop("sample_weight", False):
        sem["sample_weight"] = rng.uniform(0.0, 2.0, N)
    if sem:
        kw["semantics"] = Semantics(**sem)
    if spec.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, C)
    if spec["kind"] == "probs":
        q = rng.random((N, C))
        problem = build_softmax_ce(z, q / q.sum(axis=1, keepdims=True), **kw)[0]
    else:
        y = rng.integers(0, C, N)
        y[4] = 0
        if C > 3:
            y[2] = 1  # its target masked: an infinite loss, every entry skipped
        kw.setdefault("label_smoothing", 0.05 if case == "index+smoothing" else 0.0)
        if "ignore_index" in spec:
            y[5] = spec["ignore_index"]
            kw["ignore_index"] = spec["ignore_index"]
        problem = build_softmax_ce(z, y, **kw)[0]
    assert problem.kernel is not None
    calls = []
    original = finite_diff._full_by_steps
    monkeypatch.setattr(finite_diff, "_full_by_steps",
                        lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(finite_diff, "FULL_STEPS", 2 * C * 4)  # 4 rows a call
    got = {}
    for threads in (1, 2):
        with use_threads(threads):
            got[threads] = finite_diff.fd_full(problem, 0, N)
    assert calls
    monkeypatch.setattr(finite_diff, "_full_by_steps", lambda *a: None)  # the column sweeps
    want = finite_diff.fd_full(problem, 0, N)
    for res in got.values():
        for g, w in zip(res[:2], want[:2]):
            np.testing.assert_array_equal(_bits(g), _bits(w))
        assert res[2] == want[2]


@pytest.mark.parametrize("fused", ["1", "0"])
def test_full_sweep_estimate_calibrates_on_the_kernel_that_runs(fused, monkeypatch, compiled_kernel):
    """`grad --fd full`'s time estimate: on the compiled kernel a calibration of its own sweep
    (`fd_full` on rows of C classes, whose steps cost far less than whole rows), on the numpy
    kernel the log-sum-exp of a block; a budget below it refuses the run (exit 2)."""
    from ce_cli.cli import app

    monkeypatch.setenv("CE_CHECK_FUSED", fused)
    swept = []
    original = finite_diff.fd_full
    monkeypatch.setattr(finite_diff, "fd_full", lambda *a: swept.append(a[2]) or original(*a))
    assert app.fd_rate(700) > 0
    assert (len(swept) == 3 and swept[0] == (1 << 14) // 700) if fused == "1" else not swept
    with pytest.raises(Exception, match="over the budget of 1e-06 s"):
        app.fd_cost_guard((64, 700), -1, 1e-6, quiet=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), c=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 30.0, 800.0]),
       dtype=st.sampled_from(["float32", "float64"]), smoothing=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2**32 - 1), k=st.integers(1, 12))
def test_sampled_steps_are_fresh_row_copies_property(compiled_kernel, n, c, scale, dtype,
                                                     smoothing, seed, k):
    """Sampled entries at any layout (several in a row, the arg-max, the target, rows whose
    exps underflow): `fd_entries` on the compiled kernel, whose steps come from each row's own
    sums, gives the bits of each entry differenced on a fresh float64 copy of its row."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * scale).astype(dtype)
    y = rng.integers(0, c, n)
    problem = build_softmax_ce(z, y, label_smoothing=smoothing)[0]
    rows = rng.integers(0, n, k)
    cols = np.where(rng.random(k) < 0.3, np.asarray(z).argmax(axis=1)[rows], rng.integers(0, c, k))
    pairs = np.unique(np.stack([rows, cols], axis=1), axis=0)
    rows, cols = pairs[:, 0], pairs[:, 1]
    res = finite_diff.fd_entries(problem, rows, cols)
    base = np.asarray(problem.z, dtype=np.float64)[rows]
    ev = problem.evaluate_rows(np.asarray(problem.z), np.arange(n), grad=False).take_rows(rows)
    fd, bound, _ = finite_diff.central_differences(problem, base, rows, cols,
                                                   base[np.arange(rows.size), cols], ev)
    np.testing.assert_array_equal(_bits(res.fd), _bits(fd))
    np.testing.assert_array_equal(_bits(res.bound), _bits(bound))
