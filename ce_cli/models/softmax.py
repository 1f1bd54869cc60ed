"""Softmax cross-entropy in float64 with PyTorch `F.cross_entropy` semantics, row chunk by row chunk.

Every variant (index targets, class weights, ignore_index, label smoothing, probability targets)
is one form: row n has target weights q[n, c] and

    loss_n = -sum_c q_c * log a_c = Q * lse(z) - q . z,      Q = sum_c q_c
    dloss_n/dz_c = Q * a_c - q_c

- index target y:        q_c = (1 - eps) * w_y * [c == y] + (eps / C) * w_c   (0 if y == ignore_index)
- probability target t:  q_c = w_c * ((1 - eps) * t_c + eps / C)

The reduced loss is sum_n loss_n / D with D = sum of w_y over non-ignored rows (index targets,
'mean'), N (probability targets, 'mean') or 1 ('sum', and 'none', whose gradient is that of the
sum). Precision: lse = m + log1p(s1), s1 = sum of exp(z - m) over all entries but the arg-max,
so a confident row's loss ~1e-30 keeps full relative precision; at the arg-max entry
a - 1 = -s1 / (1 + s1) is formed without cancellation (the expm1(log a_y) of the brief).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels import compiled
from ce_cli.kernels.base import ChunkEval
from ce_cli.kernels.numpy_softmax import softmax_rows
from ce_cli.models.base import RowMatrix, as_numeric_inputs
from ce_cli.models.layout import Layout, make_layout, match_batch
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX, logistic_third_max



@dataclass(frozen=True)
class SoftmaxCE(RowMatrix):
    """A validated multiclass problem: logits as (N, C) rows plus everything the kernel needs."""

    z: np.ndarray                  # (N, C) user dtype, maybe memory-mapped
    layout: Layout
    labels: np.ndarray | None      # (N,) int64 class indices, or None with probability targets
    probs: np.ndarray | None       # (N, C) probability targets, or None
    weight: np.ndarray | None      # (C,) float64
    ignore_index: int
    smoothing: float
    reduction: str
    denominator: float             # D; 0 when every target is ignored under 'mean' (loss NaN)
    valid: np.ndarray              # (N,) rows that contribute
    source: str = "logits"
    kernel: Any = field(default=None, compare=False, repr=False)  # compiled.FusedKernel or None

    def __post_init__(self) -> None:
        # the kernel is chosen once, for the whole check
        object.__setattr__(self, "kernel", compiled.FusedKernel.plan(self))

    @property
    def kernel_name(self) -> str:
        return "compiled" if self.kernel is not None else "numpy"

    @property
    def target_kind(self) -> str:
        return "probability" if self.probs is not None else "index"

    @property
    def per_sample_shape(self) -> tuple[int, ...]:
        """Shape of the per-sample losses of reduction 'none': the batch shape."""
        return self.layout.batch_shape

    @property
    def per_sample_cols(self) -> tuple[int, ...]:
        """Trailing shape of one row's per-sample losses: none, one loss per row."""
        return ()

    def per_sample_index(self, row: int, _col: int) -> tuple[int, ...]:
        return self.layout.batch_index(row)

    def match_per_sample(self, arr: np.ndarray, source: str) -> np.ndarray:
        return match_batch(arr, self.layout, source, "per-sample losses ('none')")

    @staticmethod
    def per_sample(ev: ChunkEval) -> np.ndarray:
        return ev.loss

    @staticmethod
    def loss_floor(ev: ChunkEval, coef: float) -> np.ndarray:
        """Error of a correct loss_n in a precision with k*eps = coef: the rounded terms of
        Q*lse - q.z, and lse's own magnitude (implementations that form lse = m + log s)."""
        return coef * (np.abs(ev.loss) + np.abs(ev.total_weight) * (1.0 + np.abs(ev.lse)))

    @property
    def grad_scale(self) -> float:
        """d(reduced loss)/d(loss_n): 1/D for 'mean' (0 when D is 0: PyTorch's zero gradient)."""
        if self.reduction != "mean":
            return 1.0
        return 1.0 / self.denominator if self.denominator != 0 else 0.0

    @property
    def max_target_weight(self) -> float:
        """An upper bound of Q_n (1 unweighted): scales the subnormal allowance."""
        return float(np.abs(self.weight).max()) if self.weight is not None else 1.0

    @property
    def nan_gradient(self) -> bool:
        """'mean' with D = 0 but some target not ignored (all weights 0): PyTorch's 0/0 NaN rows."""
        return self.reduction == "mean" and self.denominator == 0 and bool(self.valid.any())

    def reduce(self, row_loss_sum: float) -> float:
        if self.reduction == "mean":
            d = self.denominator
            return row_loss_sum / d if d != 0 else float("nan")
        return row_loss_sum

    def target_columns(self, rows: np.ndarray) -> np.ndarray:
        """The target class of each row: the label, or the largest target probability."""
        if self.probs is not None:
            return np.asarray(self.probs[rows]).argmax(axis=1)
        return np.where(self.valid[rows], self.labels[rows], 0)

    def targets(self, rows: np.ndarray):
        """(alpha, beta, y) for index targets or (q, None, None) for probability targets."""
        if self.probs is not None:
            t = np.asarray(self.probs[rows], dtype=np.float64)
            C = self.n_classes
            if self.smoothing:
                t = t * (1.0 - self.smoothing) + self.smoothing / C
            if self.weight is not None:
                t = t * self.weight
            return t, None, None
        y = self.labels[rows]
        valid = self.valid[rows]
        ys = np.where(valid, y, 0)
        wy = self.weight[ys] if self.weight is not None else 1.0
        alpha = np.where(valid, (1.0 - self.smoothing) * wy, 0.0)
        beta = np.where(valid, self.smoothing / self.n_classes, 0.0)
        return alpha, beta, ys

    def target_weights(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense (R, C) target weights q, and the part of them smoothing spreads over every
        class (alpha * w_c / C; 0 for ignored rows)."""
        C = self.n_classes
        w = self.weight if self.weight is not None else np.ones(C)
        q, beta, ys = self.targets(rows)
        live = self.valid[rows].astype(np.float64)[:, None]
        spread = live * (self.smoothing / C) * w[None, :]
        if beta is None:
            return q, spread
        full = spread.copy()
        full[np.arange(len(rows)), ys] += q
        return full, spread

    def evaluate_rows(self, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                      floor_coef: float | None = None) -> ChunkEval:
        """Rows `rows` of the problem with logits `z_rows` (possibly perturbed): through the
        compiled kernel when it serves them, else the numpy kernel (its reference)."""
        if self.kernel is not None:
            ev = self.kernel.evaluate(z_rows, np.asarray(rows), grad=grad, floor_coef=floor_coef)
            if ev is not None:
                return ev
        return softmax_rows(self, z_rows, rows, grad=grad, floor_coef=floor_coef)

    def fd_error_bound(self, rows, cols, z_entry: np.ndarray, h: np.ndarray, ev: ChunkEval) -> np.ndarray:
        """Bound on |central difference - derivative| of loss_n at entries `z_entry` (row-wise `ev`).

        Rounding: each loss evaluation errs by about 8*eps*(|loss_n| + |Q|*(2 + 2*log2 C))
        (loss_n = Q*l1 + |q.zs| holds every rounded term, H(a) <= log C bounds the shift's);
        it is divided by 2h. Truncation: h^2/6 * |Q| * max|a(1-a)(1-2a)| over the step, the
        third derivative of lse along one coordinate, bounded on [z - h, z + h] exactly.
        """
        Q = np.abs(ev.total_weight)
        rounding = 8.0 * EPS * (np.abs(ev.loss) + Q * (2.0 + 2.0 * np.log2(self.n_classes))) / h
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # from the shifted values: z - lse would lose 1 - a at |z| ~ 1e6
            logp = (z_entry - ev.row_max) - ev.log1p_s1
            logit = logp - np.log(-np.expm1(logp))
        truncation = h * h / 6.0 * Q * logistic_third_max(logit, h)
        return (rounding + truncation) * self.grad_scale

    def directional_error_bound(self, ep: ChunkEval, em: ChunkEval, delta: np.ndarray) -> np.ndarray:
        """Bound on |loss_n(z + u) - loss_n(z - u) - <g_n, delta>| per row (delta = 2u).

        Rounding of the two evaluations, plus the Taylor remainder |D^3 loss_n[u, u, u]| / 3,
        where the third derivative is Q times a third central moment of u under a: at most
        THIRD_MOMENT_MAX * range(u)^3, and range(u) <= max|delta|.
        """
        Q = np.abs(ep.total_weight)
        rounding = 16.0 * EPS * (np.maximum(np.abs(ep.loss), np.abs(em.loss))
                                 + Q * (2.0 + 2.0 * np.log2(self.n_classes)))
        reach = np.abs(delta).max(axis=1)
        truncation = Q * THIRD_MOMENT_MAX * reach**3 / 3.0
        return (rounding + truncation) * self.grad_scale

    def check_row_max(self, zs, m, rows, active):
        """NaN/+inf logits are errors; an all -inf row is legal only when ignored."""
        bad = np.isnan(m) | np.isposinf(m)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row = zs[i]
            col = int(np.flatnonzero(np.isnan(row) | np.isposinf(row))[0])
            what = "NaN" if np.isnan(row[col]) else "+inf"
            idx = self.layout.original_index(int(rows[i]), col)
            raise CeCheckError(
                f"{self.source}: shape {self.layout.shape}: {what} logit at index {idx} "
                "(only -inf is allowed, as a mask)"
            )
        masked = np.isneginf(m)
        if (masked & active).any():
            i = int(np.flatnonzero(masked & active)[0])
            idx = self.layout.batch_index(int(rows[i]))
            raise CeCheckError(
                f"{self.source}: shape {self.layout.shape}: every logit of sample {idx} is -inf "
                "(softmax undefined); ignore that target or unmask a class"
            )
        return np.where(masked, 0.0, m)


def build_softmax_ce(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_axis: int = -1,
    source: str = "logits",
    labels_source: str = "labels",
    weight_source: str = "weight",
) -> tuple[SoftmaxCE, list[str]]:
    """Validate inputs and build the problem. Returns it with a list of warnings."""
    warnings: list[str] = []
    logits, labels = as_numeric_inputs(logits, labels, reduction, source, labels_source)
    if not (np.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise CeCheckError(f"`label_smoothing`: must be in [0, 1], got {label_smoothing}")
    layout = make_layout(logits.shape, class_axis, source)
    C = layout.n_classes
    z = layout.to_rows(logits)
    N = layout.n_rows

    w64 = None
    if weight is not None:
        w64 = np.asarray(weight, dtype=np.float64).reshape(-1) if np.ndim(weight) <= 1 else None
        if w64 is None or w64.shape != (C,):
            raise CeCheckError(
                f"{weight_source}: shape {np.shape(weight)} but the logits have {C} classes; "
                f"expected ({C},)"
            )
        if not np.all(np.isfinite(w64)):
            i = int(np.flatnonzero(~np.isfinite(w64))[0])
            raise CeCheckError(f"{weight_source}: shape ({C},): non-finite weight {w64[i]} at index ({i},)")
        if (w64 < 0).any():
            warnings.append(f"{weight_source}: negative class weights")

    if labels.shape == logits.shape and labels.ndim >= 1 and not (labels.ndim == 1 and C == 1):
        probs = layout.to_rows(labels)
        if ignore_index >= 0:
            raise CeCheckError(
                f"`ignore_index={ignore_index}`: not supported with probability targets "
                f"({labels_source} has the logits' shape {labels.shape}); PyTorch raises too"
            )
        _check_probs(probs, layout, labels_source, warnings)
        valid = np.ones(N, dtype=bool)
        denominator = float(N)
        problem = SoftmaxCE(z, layout, None, probs, w64, ignore_index, float(label_smoothing),
                            reduction, denominator, valid, source)
        return problem, warnings

    y = match_batch(labels, layout, labels_source, "class-index labels")
    if y.dtype.kind == "b":
        warnings.append(f"{labels_source}: bool labels, read as class indices 0 (False) and "
                        "1 (True)")
    y = _as_class_indices(y, layout, labels_source)
    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= C))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CeCheckError(
            f"{labels_source}: shape {labels.shape}: label {int(y[i])} at index "
            f"{layout.batch_index(i)} is out of range [0, {C}) and is not the ignore_index {ignore_index}"
        )
    if w64 is not None:
        denominator = float(np.sum(w64[y[valid]]))
    else:
        denominator = float(np.count_nonzero(valid))
    n_ignored = int(N - np.count_nonzero(valid))
    if reduction == "mean" and denominator == 0:
        if n_ignored == N:
            warnings.append("every target is ignored: the mean loss is NaN (0/0, as PyTorch) "
                            "and the gradient is zero")
        else:
            warnings.append("the non-ignored targets' weights sum to 0: the mean loss and the "
                            "gradient of those rows are NaN (0/0, as PyTorch)")
    problem = SoftmaxCE(z, layout, y, None, w64, ignore_index, float(label_smoothing),
                        reduction, denominator, valid, source)
    return problem, warnings


def _as_class_indices(y: np.ndarray, layout: Layout, source: str) -> np.ndarray:
    if y.dtype.kind in "iub":
        if y.dtype.kind == "u" and y.dtype.itemsize == 8 and y.size and y.max() > np.iinfo(np.int64).max:
            raise CeCheckError(f"{source}: label too large for int64")
        return y.astype(np.int64)
    yf = np.asarray(y, dtype=np.float64)
    bad = ~np.isfinite(yf) | (yf != np.round(yf))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CeCheckError(
            f"{source}: shape {y.shape}: label {float(yf[i])} at index {layout.batch_index(i)} is not a "
            "whole number (class indices must be integers; probability targets need the logits' shape)"
        )
    if yf.size and np.abs(yf).max() > 2.0**53:
        raise CeCheckError(f"{source}: label magnitude beyond 2**53")
    return yf.astype(np.int64)


def _check_probs(probs: np.ndarray, layout: Layout, source: str, warnings: list[str]) -> None:
    """Probability targets must be finite; PyTorch accepts any values, so others only warn."""
    step = max(1, (1 << 22) // max(1, layout.n_classes))
    negative = False
    off_simplex = 0
    for start in range(0, layout.n_rows, step):
        block = np.asarray(probs[start:start + step], dtype=np.float64)
        finite = np.isfinite(block)
        if not finite.all():
            r, c = (int(v) for v in np.argwhere(~finite)[0])
            raise CeCheckError(
                f"{source}: shape {layout.shape}: non-finite target {block[r, c]} at index "
                f"{layout.original_index(start + r, c)}"
            )
        negative |= bool((block < 0).any())
        off_simplex += int(np.count_nonzero(np.abs(block.sum(axis=1) - 1.0) > 1e-6))
    if negative:
        warnings.append(f"{source}: negative target probabilities (PyTorch accepts them)")
    if off_simplex:
        warnings.append(f"{source}: {off_simplex} target rows do not sum to 1 (PyTorch accepts them)")
