"""Probability targets whose rows do not sum to 1 (a 16-bit teacher's softmax: 1 +- 3e-3; here
+- 1e-2) with
TensorFlow's and Keras's gradient, softmax - targets computed in float32 and stored as float16:
not the derivative of -sum q log softmax (that is Q softmax - q), so the check fails, and the
diagnosis names the targets' sum (TF 2.21 / Keras 3.15 `CategoricalCrossentropy(from_logits=True)`
under mixed_float16: 22 cases named isolated entries, a wrong target term or nothing)."""

from __future__ import annotations

import numpy as np

import ce_cli


def _teacher_case(seed: int = 0, N: int = 64, C: int = 1000):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, C)) * 3).astype(np.float16)
    t = rng.standard_normal((N, C)) * 2
    q = np.exp(t - t.max(axis=1, keepdims=True))
    q *= (1 + rng.uniform(-1e-2, 1e-2, (N, 1))) / q.sum(axis=1, keepdims=True)
    q = q.astype(np.float16).astype(np.float64)
    z64 = z.astype(np.float64)
    a = np.exp(z64 - z64.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    return z, q, a


def test_softmax_minus_unnormalised_targets_is_named():
    z, q, a = _teacher_case()
    assert np.abs(q.sum(axis=1) - 1).max() > 1e-4
    tf_grad = ((a - q) / len(q)).astype(np.float32).astype(np.float16)
    report = ce_cli.check_grad(z, q.astype(np.float32), grad=tf_grad, precision="f32")
    assert not report.ok
    assert [d.code for d in report.diagnosis] == ["targets_sum"]
    assert "do not sum to 1" in report.diagnosis[0].message


def test_the_derivative_passes_and_another_bug_is_not_named_so():
    z, q, a = _teacher_case(1)
    exact = (a * q.sum(axis=1, keepdims=True) - q) / len(q)
    assert ce_cli.check_grad(z, q.astype(np.float32), grad=exact.astype(np.float32),
                             precision="f32").ok
    bad = exact.copy()
    bad[3] *= 1.05
    report = ce_cli.check_grad(z, q.astype(np.float32), grad=bad.astype(np.float32),
                               precision="f32")
    assert not report.ok and "targets_sum" not in [d.code for d in report.diagnosis]
