"""Sigmoid binary cross-entropy in float64 with PyTorch `BCEWithLogitsLoss` semantics.

Per element, with weight w (broadcast to the input) and pos_weight pw (along the last axis):

    l = w * [pw * y * softplus(-x) + (1 - y) * softplus(x)]
    dl/dx = w * [(1 - y) * s(x) - pw * y * s(-x)]  =  w * [(1 + (pw - 1) y) s(x) - pw y]

(-log s(x) = softplus(-x), -log(1 - s(x)) = softplus(x)). Both terms are non-negative, so nothing
cancels: no log(0), no s(x) rounded to 1 where it matters, for |x| up to the float64 range.
'mean' divides by the number of elements (not the weights), 'none' gives the gradient of the sum.
Rows are the flattened leading axes; the last axis is the row (multi-label (N, K): K labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels import compiled
from ce_cli.kernels.base import ChunkEval, required
from ce_cli.kernels.numpy_sigmoid import sigmoid_rows
from ce_cli.models.base import RowMatrix, as_numeric_inputs
from ce_cli.models.layout import Layout, make_layout
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX, logistic_third_max


@dataclass(frozen=True)
class SigmoidBCE(RowMatrix):
    """A validated binary problem as (N, K) rows."""

    z: np.ndarray                 # (N, K) user dtype, maybe memory-mapped
    layout: Layout
    targets: np.ndarray           # (N, K) labels in [0, 1]
    weight: np.ndarray | None     # (N, K) float64 view (broadcast), or None
    pos_weight: np.ndarray | None  # (K,) float64, or None
    reduction: str
    source: str = "logits"
    kernel: Any = field(default=None, compare=False, repr=False)  # compiled.SigmoidKernel or None

    def __post_init__(self) -> None:
        # the kernel is chosen once, for the whole check
        object.__setattr__(self, "kernel", compiled.SigmoidKernel.plan(self))

    @property
    def kernel_name(self) -> str:
        return "compiled" if self.kernel is not None else "numpy"

    @property
    def valid(self) -> np.ndarray:
        return np.ones(self.n_rows, dtype=bool)

    @property
    def denominator(self) -> float:
        return float(self.n_rows * self.n_classes)

    @property
    def grad_scale(self) -> float:
        return 1.0 / self.denominator if self.reduction == "mean" else 1.0

    def reduce(self, total: float) -> float:
        return total / self.denominator if self.reduction == "mean" else total

    target_kind = "binary"

    @property
    def max_target_weight(self) -> float:
        """An upper bound of |w * (1 + (pw - 1) y)|: scales the subnormal allowance."""
        w = float(np.abs(self.weight).max()) if self.weight is not None else 1.0
        return w * (max(1.0, float(np.abs(self.pos_weight).max())) if self.pos_weight is not None else 1.0)

    @property
    def per_sample_shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def per_sample_cols(self) -> tuple[int, ...]:
        return (self.n_classes,)

    def per_sample_index(self, row: int, col: int) -> tuple[int, ...]:
        return self.layout.original_index(row, col)

    def match_per_sample(self, arr: np.ndarray, source: str) -> np.ndarray:
        if arr.shape != self.layout.shape:
            raise CeCheckError(f"{source}: shape {arr.shape}; reduction 'none' gives one loss per "
                               f"element, shape {self.layout.shape}")
        return self.layout.to_rows(arr)

    @staticmethod
    def per_sample(ev: ChunkEval) -> np.ndarray:
        return required(ev.items, "per-element losses")

    @staticmethod
    def loss_floor(ev: ChunkEval, coef: float) -> np.ndarray:
        """Error of a correct per-element loss: softplus rounds at eps*|l|, plus eps*|w*coef|."""
        return coef * (np.abs(required(ev.items, "per-element losses"))
                       + required(ev.item_weight, "per-element weights"))

    def target_columns(self, rows: np.ndarray) -> np.ndarray:
        """The entry with the largest label (a positive) in each row."""
        return np.asarray(self.targets[rows]).argmax(axis=1)

    def coefficients(self, rows: np.ndarray):
        """(y, w, pw) for the rows, float64, broadcast to (R, K)."""
        y = np.asarray(self.targets[rows], dtype=np.float64)
        w = np.asarray(self.weight[rows], dtype=np.float64) if self.weight is not None else None
        return y, w, self.pos_weight

    def evaluate_rows(self, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                      floor_coef: float | None = None) -> ChunkEval:
        """Rows `rows` with logits `z_rows` (possibly perturbed): through the compiled kernel
        when it serves them, else the numpy kernel (its reference)."""
        if self.kernel is not None:
            ev = self.kernel.evaluate(z_rows, np.asarray(rows), grad=grad, floor_coef=floor_coef)
            if ev is not None:
                return ev
        return sigmoid_rows(self, z_rows, rows, grad=grad, floor_coef=floor_coef)

    def report_bad_logit(self, x: np.ndarray, rows: np.ndarray) -> None:
        bad = np.isnan(x) | np.isposinf(x)
        r, c = (int(v) for v in np.argwhere(bad)[0])
        what = "NaN" if np.isnan(x[r, c]) else "+inf"
        idx = self.layout.original_index(int(rows[r]), c)
        raise CeCheckError(f"{self.source}: shape {self.layout.shape}: {what} logit at index {idx} "
                           "(only -inf is allowed)")

    def _entry_coef(self, rows, cols) -> np.ndarray:
        y = np.asarray(self.targets[rows, cols], dtype=np.float64)
        c = np.ones_like(y) if self.pos_weight is None else 1.0 + (self.pos_weight[cols] - 1.0) * y
        if self.weight is not None:
            c = c * np.asarray(self.weight[rows, cols], dtype=np.float64)
        return np.abs(c)

    def fd_error_bound(self, rows, cols, z_entry: np.ndarray, h: np.ndarray, ev: ChunkEval) -> np.ndarray:
        """Rounding of the row sum, 8*eps*(1 + log2 K)*(|loss_n| + sum_k c_k)/h, plus truncation
        h^2/6 * c * max|s(1-s)(1-2s)| on [x - h, x + h] (c = w*(1 + (pw-1)y) at the entry)."""
        K = self.n_classes
        rounding = 8.0 * EPS * (1.0 + np.log2(K)) * (np.abs(ev.loss) + ev.total_weight) / h
        truncation = h * h / 6.0 * self._entry_coef(rows, cols) * logistic_third_max(z_entry, h)
        return (rounding + truncation) * self.grad_scale

    def directional_error_bound(self, ep: ChunkEval, em: ChunkEval, delta: np.ndarray) -> np.ndarray:
        """Rounding of both row sums plus sum_k c_k * THIRD_MOMENT_MAX * |delta_k|^3 / 24."""
        K = self.n_classes
        rounding = 16.0 * EPS * (1.0 + np.log2(K)) * (
            np.maximum(np.abs(ep.loss), np.abs(em.loss)) + ep.total_weight)
        reach = np.abs(delta).max(axis=1)
        truncation = ep.total_weight * THIRD_MOMENT_MAX * reach**3 / 24.0
        return (rounding + truncation) * self.grad_scale


def build_sigmoid_bce(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    pos_weight: np.ndarray | float | None = None,
    reduction: str = "mean",
    source: str = "logits",
    labels_source: str = "labels",
    weight_source: str = "weight",
    pos_weight_source: str = "pos_weight",
) -> tuple[SigmoidBCE, list[str]]:
    """Validate inputs (labels in [0, 1], shapes, broadcasts) and build the problem."""
    warnings: list[str] = []
    logits, labels = as_numeric_inputs(logits, labels, reduction, source, labels_source)
    layout = make_layout(logits.shape, -1, source)  # rows: the last axis
    if labels.shape != logits.shape:
        if _squeezed(labels.shape) == _squeezed(logits.shape):  # (N, 1) CSV column for (N,) logits
            labels = labels.reshape(logits.shape)
        else:
            raise CeCheckError(f"{labels_source}: shape {labels.shape} does not match the logits "
                               f"{logits.shape}: binary labels need the logits' shape")
    targets = layout.to_rows(labels)
    _check_unit_interval(targets, layout, labels_source)

    w_rows = None
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        try:
            w_full = np.broadcast_to(w, logits.shape)
        except ValueError:
            raise CeCheckError(f"{weight_source}: shape {w.shape} does not broadcast to the logits "
                               f"{logits.shape}") from None
        if not np.all(np.isfinite(w)):
            i = tuple(int(v) for v in np.argwhere(~np.isfinite(w))[0])
            raise CeCheckError(f"{weight_source}: shape {w.shape}: non-finite weight at index {i}")
        w_rows = layout.to_rows(w_full)
    pw = None
    if pos_weight is not None:
        pw = np.asarray(pos_weight, dtype=np.float64)
        K = layout.n_classes
        if pw.ndim > 1 or pw.size not in (1, K):
            raise CeCheckError(f"{pos_weight_source}: shape {pw.shape}; pos_weight broadcasts along "
                               f"the last axis of the logits: expected ({K},) or a scalar")
        if not np.all(np.isfinite(pw)):
            raise CeCheckError(f"{pos_weight_source}: non-finite pos_weight")
        pw = np.broadcast_to(pw.reshape(-1), (K,)).copy()
    problem = SigmoidBCE(layout.to_rows(logits), layout, targets, w_rows, pw, reduction, source)
    return problem, warnings


def _check_unit_interval(targets: np.ndarray, layout: Layout, source: str) -> None:
    step = max(1, (1 << 20) // max(1, layout.n_classes))
    for start in range(0, layout.n_rows, step):
        block = np.asarray(targets[start:start + step], dtype=np.float64)
        bad = ~((block >= 0.0) & (block <= 1.0))  # NaN fails too
        if bad.any():
            r, c = (int(v) for v in np.argwhere(bad)[0])
            raise CeCheckError(
                f"{source}: shape {layout.shape}: label {float(block[r, c])} at index "
                f"{layout.original_index(start + r, c)} is outside [0, 1]"
            )


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)
