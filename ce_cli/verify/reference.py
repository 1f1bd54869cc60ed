"""The float64 reference of softmax cross-entropy, whole arrays in memory (no checks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ce_cli.io.arrays import api_array
from ce_cli.kernels.numerics import loss_sum
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.pipeline import row_chunks


@dataclass(frozen=True)
class Reference:
    """The float64 reference: reduced loss, per-sample losses (batch shape), gradient (logits' shape)."""

    loss: float
    per_sample: np.ndarray
    grad: np.ndarray


def softmax_reference(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_axis: int = -1,
) -> Reference:
    """Loss and gradient of `F.cross_entropy(logits, labels, ...)` in float64, in memory.

    For reduction 'none' the gradient is that of the sum of per-sample losses.
    """
    logits, labels, weight = map(api_array, (logits, labels, weight))
    problem, _ = build_softmax_ce(
        np.asarray(logits), np.asarray(labels),
        weight=None if weight is None else np.asarray(weight), reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, class_axis=class_axis)
    N, C = problem.n_rows, problem.n_classes
    grad = np.empty((N, C))
    per_sample = np.empty(N)
    for start, stop in row_chunks(N, C):
        ev = problem.evaluate(start, stop)
        grad[start:stop] = ev.grad
        per_sample[start:stop] = ev.loss
    layout = problem.layout
    return Reference(
        loss=problem.reduce(loss_sum(per_sample)),
        per_sample=per_sample.reshape(layout.batch_shape),
        grad=layout.from_rows(grad),
    )
