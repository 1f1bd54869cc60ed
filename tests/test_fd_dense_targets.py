"""Finite differences at the arg-max of rows with dense (smoothed) probability targets and wide
logits, on both kernels: the loss's q . (z - m) sums C products, and perturbing the arg-max moves
m, so every product changes between the two evaluations. Summed by einsum (a running sum) the
numpy kernel's row loss erred by 6e-13 relative at C = 32,000 (3,000 ulps), beyond the
differences' bound, and the check failed its own finite differences on correct JAX (optax
smooth_labels) gradients: 48 of 80 cases in a sweep, ratios up to 205. Summed pairwise they
stay within it. The same for smoothing over class weights (index targets: z . w)."""

from __future__ import annotations

import numpy as np
import pytest

from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.finite_diff import fd_entries

pytestmark = pytest.mark.usefixtures("both_kernels")


def _logits(N: int, C: int, std: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, C)) * std).astype(np.float32)


@pytest.mark.parametrize("C,std", [(1000, 3.0), (32_000, 50.0)])
def test_dense_targets_arg_max_differences_are_within_their_bound(C, std):
    N = 10
    z = _logits(N, C, std, 334)
    y = np.random.default_rng(1).integers(0, C, N)
    q = np.full((N, C), 0.1 / C, np.float32)
    q[np.arange(N), y] += 0.9
    problem = build_softmax_ce(z, q)[0]
    am = z.argmax(axis=1)
    rows = np.repeat(np.arange(N), 2)  # each row twice: its arg-max and one more entry
    cols = np.stack([am, (am + 1) % C], axis=1).reshape(-1)
    res = fd_entries(problem, rows, cols)
    assert np.all(np.abs(res.fd - res.reference) <= res.bound), np.max(
        np.abs(res.fd - res.reference) / res.bound)


def test_smoothing_over_class_weights_arg_max_differences_are_within_their_bound():
    N, C = 10, 32_000
    z = _logits(N, C, 50.0, 7)
    y = np.random.default_rng(2).integers(0, C, N)
    w = np.random.default_rng(3).random(C) + 0.5
    problem = build_softmax_ce(z, y, weight=w, label_smoothing=0.1)[0]
    am = z.argmax(axis=1)
    res = fd_entries(problem, np.repeat(np.arange(N), 2),
                     np.stack([am, (am + 1) % C], axis=1).reshape(-1))
    assert np.all(np.abs(res.fd - res.reference) <= res.bound), np.max(
        np.abs(res.fd - res.reference) / res.bound)
