"""The sampled finite differences draw their entries from SplitMix64 (`uniform_draws`): the
same entries for a seed on every platform, and no numpy.random import (~10 ms) in a run."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.checks import check_grad
from ce_cli.verify.finite_diff import sample_entries, uniform_draws

SCRIPT = """
import sys
import numpy as np
from ce_cli.verify.checks import check_grad
z = np.linspace(-3.0, 3.0, 40).reshape(8, 5)
report = check_grad(z, np.arange(8) % 5, fd="sample", samples=6)
assert report.ok and "fd_vs_reference" in {c.name for c in report.checks}
print("numpy.random" in sys.modules)
"""


def test_sampled_check_imports_no_numpy_random():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_splitmix64_reference_outputs():
    # SplitMix64 seeded with 0 (the published reference sequence), read as draw(2**64)
    draw = uniform_draws(0)
    assert [draw(1 << 64) for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                0x06C45D188009454F]


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 2**40 + 3])
def test_draws_stay_in_range_and_cover_it(n):
    draw = uniform_draws(12345)
    values = [draw(n) for _ in range(3000)]
    assert all(0 <= v < n for v in values)
    if n <= 7:  # every value, each near 1/n of the draws
        counts = Counter(values)
        assert set(counts) == set(range(n))
        assert all(abs(c / 3000 - 1 / n) < 0.05 for c in counts.values())


@pytest.mark.parametrize("n_rows, k", [(1, 4), (5, 10), (5, 64), (300, 20), (4096, 256)])
def test_sampled_rows_are_distinct_and_seeded(n_rows, k):
    rng = np.random.default_rng(1)
    C = 6
    problem = build_softmax_ce(rng.standard_normal((n_rows, C)), rng.integers(0, C, n_rows))[0]
    rows, cols = sample_entries(problem, k, 7, [])
    assert rows.size == min(k, 2 * n_rows)  # K distinct entries while the rows last
    assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.size
    picked = np.unique(rows)
    assert picked.size == min(n_rows, (k + 1) // 2)
    assert ((cols >= 0) & (cols < C)).all()
    targets = problem.target_columns(picked)
    assert set(zip(picked.tolist(), targets.tolist())) <= set(zip(rows.tolist(), cols.tolist()))
    again = sample_entries(problem, k, 7, [])
    assert np.array_equal(rows, again[0]) and np.array_equal(cols, again[1])
    if n_rows > k:
        other = sample_entries(problem, k, 8, [])
        assert not np.array_equal(rows, other[0])  # another seed, other rows


def test_worst_entries_come_first_and_stay():
    rng = np.random.default_rng(2)
    problem = build_softmax_ce(rng.standard_normal((50, 9)), rng.integers(0, 9, 50))[0]
    worst = [(3, 4), (40, 8), (3, int(problem.target_columns(np.array([3]))[0]))]
    for seed in range(20):  # sampled rows meeting the worst entries still make up K
        rows, cols = sample_entries(problem, 8, seed, worst)
        assert set(worst) <= set(zip(rows.tolist(), cols.tolist()))
        assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.size == 8
    rows, _ = sample_entries(problem, 2, 0, worst)
    assert rows.size == 3  # every worst entry, however few were asked for


def test_sampled_check_passes_a_correct_gradient():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    g = e / e.sum(axis=1, keepdims=True)
    g[np.arange(6), y] -= 1.0
    report = check_grad(z, y, grad=g / 6, fd="sample", samples=6)
    assert report.ok and {"fd_vs_reference", "fd_vs_grad"} <= {c.name for c in report.checks}
