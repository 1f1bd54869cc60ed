"""Sampled finite differences of softmax rows (finite_diff.fd_entries): blocks of rows perturbed
in one reused float64 row buffer give, bit for bit, what each entry's own fresh row copy gives,
for any block size, thread count and entry layout (several entries in a row, a block with more
entries than the buffer held so far)."""

from __future__ import annotations

import numpy as np
import pytest

from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify import finite_diff
from ce_cli.verify.finite_diff import central_differences, fd_entries, sample_entries

pytestmark = pytest.mark.usefixtures("both_kernels")


def _problem(kind: str, dtype, N: int = 30, C: int = 257, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, C)) * 4.0).astype(dtype)
    z[2, :7] = -np.inf  # masked logits: skipped entries
    if kind == "index":
        y = rng.integers(0, C, N)
        y[2] = 50
        return build_softmax_ce(z, y, label_smoothing=0.1)[0]
    q = rng.random((N, C))
    q[2, :7] = 0.0
    return build_softmax_ce(z, q / q.sum(axis=1, keepdims=True))[0]


def _entries(problem) -> tuple[np.ndarray, np.ndarray]:
    """Sampled entries plus a crowded row (6 entries: its block needs a larger buffer)."""
    extra = [(7, c) for c in (0, 3, 9, 100, 200, 256)] + [(2, 3), (2, 60)]
    return sample_entries(problem, 40, 4, extra)


def _fresh_copies(problem, rows: np.ndarray, cols: np.ndarray, per: int, floor_coef: float):
    """The definition: rows evaluated `per` distinct rows at a time, each entry perturbed in a
    fresh float64 copy of its row (fd, bound, reference, floor in the order of the entries)."""
    uniq = np.unique(rows)
    out = np.empty((4, rows.size))
    for a in range(0, uniq.size, per):
        block = uniq[a:a + per]
        ev = problem.evaluate_rows(np.asarray(problem.z[block]), block, floor_coef=floor_coef)
        sel = np.flatnonzero(np.isin(rows, block))
        local = np.searchsorted(block, rows[sel])
        base = np.array(np.asarray(problem.z[block])[local], dtype=np.float64)
        f, b, _ = central_differences(problem, base, rows[sel], cols[sel],
                                      base[np.arange(sel.size), cols[sel]], ev.take_rows(local))
        out[:, sel] = f, b, ev.grad[local, cols[sel]], ev.floor[local, cols[sel]]
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_rows", [1, 3, None])
def test_blocks_in_one_buffer_are_each_row_alone(kind, dtype, block_rows, monkeypatch):
    """On the compiled kernel every row is computed alone: the bits of each entry on its own row
    copy, for any block. The numpy kernel's rows depend on their block-mates (it picks a masked
    sum for a whole block holding a -inf logit): the bits of fresh copies in the same blocks."""
    problem = _problem(kind, dtype)
    rows, cols = _entries(problem)
    alone = problem.kernel is not None
    if block_rows is not None:  # before the definition: its row losses go in the same blocks
        for name in ("FD_BLOCK_ENTRIES", "BLOCK_ENTRIES"):
            monkeypatch.setattr(finite_diff, name, block_rows * problem.n_classes)
    want = _fresh_copies(problem, rows, cols, 1 if alone else block_rows or rows.size, 1e-7)
    for threads in ("1", "2"):
        monkeypatch.setenv("CE_CHECK_THREADS", threads)
        res = fd_entries(problem, rows, cols, 1e-7)
        assert res.floor is not None and res.reference is not None
        for got, expected in zip((res.fd, res.bound, res.reference, res.floor), want):
            np.testing.assert_array_equal(_bits(got), _bits(expected))
        assert res.skipped == np.isnan(want[0]).sum() >= 1  # at -inf logits, infinite losses
        assert res.evaluations == np.unique(rows).size + 2 * rows.size


def test_buffer_outlives_no_block(monkeypatch):
    """A later block with fewer entries than the buffer holds reads none of the earlier rows:
    perturbing and restoring leaves each block's rows as loaded."""
    problem = _problem("index", np.float32, N=12)
    monkeypatch.setattr(finite_diff, "FD_BLOCK_ENTRIES", problem.n_classes)
    monkeypatch.setattr(finite_diff, "BLOCK_ENTRIES", problem.n_classes)
    rows = np.array([1, 1, 1, 1, 4, 9, 9])
    cols = np.array([0, 5, 6, 7, 3, 2, 8])
    res = fd_entries(problem, rows, cols)
    want = _fresh_copies(problem, rows, cols, 1, 1e-7)
    np.testing.assert_array_equal(_bits(res.fd), _bits(want[0]))
    np.testing.assert_array_equal(_bits(res.bound), _bits(want[1]))

