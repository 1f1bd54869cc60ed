"""The `row_scale` diagnosis: each row's gradient scaled as a whole by a factor of its own - the
signature of a mean taken per chunk of rows and summed (NVIDIA-NeMo/Automodel #3803: about x4
with four chunks) or of one row's weight applied to every row (ROCm TransformerEngine #336) -
named as such, not as a normaliser error; one factor for every row stays `scale`."""

from __future__ import annotations

import numpy as np
import pytest

import ce_cli
from tests.conftest import softmax

N, C, CHUNKS = 64, 300, 4


def _batch(seed: int = 2):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, C)) * 2.0
    y = rng.integers(0, C, N)
    y[rng.random(N) < 0.2] = -100
    return z, y


def _rows_grad(z, y):
    """d loss_n / dz for each row (0 where ignored), unscaled."""
    g = softmax(z)
    valid = y != -100
    g[np.arange(N)[valid], y[valid]] -= 1.0
    g[~valid] = 0.0
    return g, valid


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_mean_per_chunk_summed_is_named(dtype):
    z, y = _batch()
    g, valid = _rows_grad(z, y)
    right = g / valid.sum()
    bug = g.copy()
    for rows in np.array_split(np.arange(N), CHUNKS):  # each chunk's own mean, then summed
        bug[rows] /= max(1, valid[rows].sum())
    report = ce_cli.check_grad(z.astype(dtype), y, grad=bug.astype(dtype), fd="off")
    assert [d.code for d in report.diagnosis] == ["row_scale"], report.diagnosis
    assert ce_cli.check_grad(z.astype(dtype), y, grad=right.astype(dtype), fd="off").ok


def test_one_factor_for_every_row_stays_a_scale():
    z, y = _batch()
    g, valid = _rows_grad(z, y)
    report = ce_cli.check_grad(z, y, grad=g / N, fd="off")  # the mean over every row
    assert [d.code for d in report.diagnosis] == ["scale"]
