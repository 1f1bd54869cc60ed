"""Label and probability-target validation, by the compiled kernel's row scan or by numpy
blocks in the targets' own dtype: the same acceptance rule, messages and warnings as a float64
copy of all targets checked at once."""

import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ce_cli.errors import CeCheckError
from ce_cli.models.layout import make_layout
from ce_cli.models.sigmoid import _check_unit_interval
from ce_cli.models.softmax import _check_probs

WIDE = 70_000  # classes: more than one row per validation block, so every row is its own block


def _unit_interval_reference(targets, layout, source):
    """The rule on one float64 copy: the first label outside [0, 1] (or NaN) in row order."""
    block = np.asarray(targets, dtype=np.float64)
    bad = ~((block >= 0.0) & (block <= 1.0))
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        return (f"{source}: shape {layout.shape}: label {float(block[r, c])} at index "
                f"{layout.original_index(r, c)} is outside [0, 1]")
    return None


def _probs_reference(probs, layout, source):
    """The rule on one float64 copy: the first non-finite target, else the two warnings."""
    block = np.asarray(probs, dtype=np.float64)
    finite = np.isfinite(block)
    if not finite.all():
        r, c = (int(v) for v in np.argwhere(~finite)[0])
        return (f"{source}: shape {layout.shape}: non-finite target {block[r, c]} at index "
                f"{layout.original_index(r, c)}"), []
    warnings = []
    if (block < 0).any():
        warnings.append(f"{source}: negative target probabilities (PyTorch accepts them)")
    off = int(np.count_nonzero(np.abs(block.sum(axis=1) - 1.0) > 1e-6))
    if off:
        warnings.append(f"{source}: {off} target rows do not sum to 1 (PyTorch accepts them)")
    return None, warnings


def _outcome(fn, *args):
    try:
        fn(*args)
    except CeCheckError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _kernel(kind: str):
    """The compiled kernel's scan ("compiled": the default) or numpy's blocks ("numpy")."""
    old = os.environ.get("CE_CHECK_FUSED")
    os.environ["CE_CHECK_FUSED"] = "1" if kind == "compiled" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["CE_CHECK_FUSED"]
        else:
            os.environ["CE_CHECK_FUSED"] = old


KERNELS = st.sampled_from(["compiled", "numpy"])
SPECIALS = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0, 2.0, -1e-3, 1.0 + 1e-3, 0.5]


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "float64", "int8", "uint8", "int64", "bool"]),
       n=st.integers(1, 5), c=st.sampled_from([1, 3, 8, WIDE]), seed=st.integers(0, 2**32 - 1),
       n_bad=st.integers(0, 3), kind=KERNELS)
def test_unit_interval_matches_float64_rule(dtype, n, c, seed, n_bad, kind):
    rng = np.random.default_rng(seed)
    x = rng.random((n, c))
    for _ in range(n_bad):
        x[rng.integers(n), rng.integers(c)] = SPECIALS[rng.integers(len(SPECIALS))]
    if np.dtype(dtype).kind != "f":
        x = np.where(np.isfinite(x), np.round(x), 3)
    labels = x.astype(dtype)
    layout = make_layout(labels.shape, -1, "labels.npy")
    expected = _unit_interval_reference(labels, layout, "labels.npy")
    with _kernel(kind):
        assert _outcome(_check_unit_interval, labels, layout, "labels.npy") == expected


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["float16", "float32", "float64"]), n=st.integers(1, 5),
       c=st.sampled_from([1, 3, 8, WIDE]), seed=st.integers(0, 2**32 - 1), n_bad=st.integers(0, 3),
       transposed=st.booleans(), kind=KERNELS)
def test_probs_match_float64_rule(dtype, n, c, seed, n_bad, transposed, kind):
    rng = np.random.default_rng(seed)
    x = rng.random((n, c))
    x /= x.sum(axis=1, keepdims=True)
    for _ in range(n_bad):
        x[rng.integers(n), rng.integers(c)] = SPECIALS[rng.integers(len(SPECIALS))]
    probs = x.astype(dtype)
    if transposed:  # classes on axis 0: the rows are a strided view
        probs = np.ascontiguousarray(probs.T)
        layout = make_layout(probs.shape, 0, "p.npy")
    else:
        layout = make_layout(probs.shape, -1, "p.npy")
    rows = layout.to_rows(probs)
    error, warnings = _probs_reference(rows, layout, "p.npy")
    got: list[str] = []
    with _kernel(kind):
        assert _outcome(_check_probs, rows, layout, "p.npy", got) == error
    if error is None:
        assert got == warnings


@pytest.mark.parametrize("kind", ["compiled", "numpy"])
def test_float64_row_sum_overflow_is_not_a_non_finite_target(kind):
    probs = np.full((2, 4), 1e308)
    layout = make_layout(probs.shape, -1, "p.npy")
    warnings: list[str] = []
    with _kernel(kind):
        _check_probs(probs, layout, "p.npy", warnings)
    assert warnings == ["p.npy: 2 target rows do not sum to 1 (PyTorch accepts them)"]


@pytest.mark.parametrize("kind", ["compiled", "numpy"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_first_bad_label_in_a_later_block_is_named(dtype, kind):
    labels = np.zeros((3, WIDE), dtype=dtype)
    labels[2, 5] = np.nan
    labels[2, 9] = 2.0
    layout = make_layout(labels.shape, -1, "y.npy")
    with _kernel(kind), pytest.raises(CeCheckError,
                                      match=r"label nan at index \(2, 5\) is outside \[0, 1\]"):
        _check_unit_interval(labels, layout, "y.npy")


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, np.nan, np.inf]), max_size=60),
       k=st.integers(1, 12), threshold=st.sampled_from([-1.0, 0.5, 1.0]))
def test_worst_columns_match_a_full_stable_sort(values, k, threshold):
    from ce_cli.verify.compare import _largest

    row = np.array(values, dtype=np.float64)
    cols = np.flatnonzero(row > threshold)
    expected = cols[np.argsort(-row[cols], kind="stable")[:k]] if cols.size > k else cols
    assert _largest(row, cols, k).tolist() == expected.tolist()
