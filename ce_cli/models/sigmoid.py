"""Sigmoid binary cross-entropy in float64 with PyTorch `BCEWithLogitsLoss` semantics.

Per element, with weight w (broadcast to the input) and pos_weight pw (along the last axis):

    l = w * [pw * y * softplus(-x) + (1 - y) * softplus(x)]
    dl/dx = w * [(1 - y) * s(x) - pw * y * s(-x)]  =  w * [(1 + (pw - 1) y) s(x) - pw y]

(-log s(x) = softplus(-x), -log(1 - s(x)) = softplus(x)). Both terms are non-negative, so nothing
cancels: no log(0), no s(x) rounded to 1 where it matters, for |x| up to the float64 range.
'mean' divides by the number of elements (not the weights), 'none' gives the gradient of the sum.
Rows are the flattened leading axes; the last axis is the row (multi-label (N, K): K labels).

Training-code semantics (`sem`, models/semantics.py): on raw logits x the loss sees
z = T(x) = cap * tanh(S x / cap) (`softcap`; z = S x without it, `logit_scale` S), labels
smoothed toward 1/2 as y' = y (1 - A) + A/2 (Keras' `label_smoothing`), and sample weights s
(the batch's shape, broadcast over the last axis) multiply w. Then

    l = s * w * [pw * y' * softplus(-z) + (1 - y') * softplus(z)]
    dl/dx = s * w * [(1 + (pw - 1) y') s(z) - pw y'] * T'(x)

and the reduced loss divides the sum by the `denominator` given, else for 'mean' by the number
of elements (PyTorch) or, with sample weights, by their sum over the elements (K sum_n s_n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels import compiled
from ce_cli.kernels.base import ChunkEval, required
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX, logistic_third_max, loss_sum
from ce_cli.kernels.numpy_sigmoid import sigmoid_rows
from ce_cli.kernels.numpy_softmax import transform
from ce_cli.models.base import RowMatrix, as_numeric_inputs
from ce_cli.models.layout import Layout, make_layout, match_batch
from ce_cli.models.semantics import Semantics, chain_bounds, check_sample_weights, validate_scalars


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(frozen=True, eq=False)
class SigmoidBCE(RowMatrix):
    """A validated binary problem as (N, K) rows."""

    z: np.ndarray                 # (N, K) user dtype, maybe memory-mapped
    layout: Layout
    targets: np.ndarray           # (N, K) labels in [0, 1]
    weight: np.ndarray | None     # (N, K) float64 view (broadcast), or None
    pos_weight: np.ndarray | None  # (K,), (N, 1) or (N, K) float64 (`_pos_weights`), or None
    reduction: str
    source: str = "logits"
    smoothing: float = 0.0        # A: labels y' = y (1 - A) + A/2
    sem: Semantics = field(default_factory=Semantics)  # softcap, scale, sample weights, denominator
    weighted_count: float | None = None  # the sample weights' sum over the elements
    kernel: Any = field(default=None, compare=False, repr=False)  # compiled.SigmoidKernel or None

    def __post_init__(self) -> None:
        # the kernel is chosen once, for the whole check. Smoothed labels are other labels,
        # sample weights other element weights, a denominator another gradient scale: the
        # compiled kernel serves them, softcap and logit scale (z = T(x)) too
        plan = compiled.SigmoidKernel.plan(self)
        object.__setattr__(self, "kernel", plan)

    @property
    def kernel_name(self) -> str:
        return "compiled" if self.kernel is not None else "numpy"

    @property
    def plain(self) -> bool:
        """True with no training-code option: PyTorch's BCEWithLogitsLoss exactly."""
        return self.sem.plain and not self.smoothing

    def without_options(self) -> SigmoidBCE:
        """The same logits and labels under PyTorch's plain BCEWithLogitsLoss ('mean', no
        weight, pos_weight or training-code option), as `build_sigmoid_bce(z, y)` makes it but
        without validating the labels again (the two-class bridge's problem)."""
        return replace(self, weight=None, pos_weight=None, reduction="mean", smoothing=0.0,
                       sem=Semantics(), weighted_count=None)

    @property
    def transformed(self) -> bool:
        """True when the loss sees T(x), not the raw logits (softcap, logit scale)."""
        return self.sem.softcap is not None or self.sem.logit_scale != 1.0

    @property
    def valid(self) -> np.ndarray:
        return np.ones(self.n_rows, dtype=bool)

    @property
    def denominator(self) -> float:
        """'mean''s D: the number of elements, or the sample weights' sum over them."""
        if self.weighted_count is not None:
            return self.weighted_count
        return float(self.n_rows * self.n_classes)

    @property
    def grad_scale(self) -> float:
        if self.sem.denominator is not None:
            return 1.0 / self.sem.denominator
        return 1.0 / self.denominator if self.reduction == "mean" else 1.0

    def reduce(self, total: float) -> float:
        if self.sem.denominator is not None:
            return total / self.sem.denominator
        return total / self.denominator if self.reduction == "mean" else total

    target_kind = "binary"

    @property
    def max_target_weight(self) -> float:
        """An upper bound of |w * (1 + (pw - 1) y) * T'|: scales the subnormal allowance."""
        w = float(np.abs(self.weight).max()) if self.weight is not None else 1.0
        sw = self.sem.sample_weight
        if sw is not None:  # one column of the broadcast, not N*K temporaries
            w *= float(np.abs(sw[:, :1] if sw.strides[1] == 0 else sw).max())
        if self.transformed:
            w *= abs(self.sem.logit_scale)  # |T'| <= S
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
        return ev.per_element()[0]

    def loss_floor(self, ev: ChunkEval, coef: float, rows: np.ndarray) -> np.ndarray:
        """Error of a correct per-element loss of `rows` (evaluated in `ev`): softplus rounds at
        eps*|l|, plus eps*|w*coef|, plus eps*|x| |w| (|1 - y'| + 1 + |(pw - 1) y'|): PyTorch's
        (1 - y) x - c logsigmoid(x), c = (pw - 1) y + 1, cancels terms of ~|x| at x << 0, and
        c's own steps round there too (through T, `item_weight` holds the rounded z's share)."""
        items, weight = ev.per_element()
        floor = np.abs(items)
        floor += weight
        if not self.transformed:
            y, w, pw = self.coefficients(rows)
            g = 2.0 - y  # |1 - y'| + 1: labels lie in [0, 1]
            if pw is not None:
                g += np.abs(pw - 1.0) * y
            if w is not None:
                g *= np.abs(w)
            ax = np.abs(self.z[rows], dtype=np.float64)
            if not np.isfinite(ax.max()):  # -inf logits (masks): no term of ~|x|
                ax[np.isinf(ax)] = 0.0
            g *= ax
            floor += g
        floor *= coef
        return floor

    def target_columns(self, rows: np.ndarray) -> np.ndarray:
        """The entry with the largest label (a positive) in each row, over blocks of rows of
        ~1 MB (no copy of every sampled row at once: 16 MB of fresh pages at 129 x 32000)."""
        rows = np.asarray(rows)
        step = max(1, (1 << 18) // max(1, self.n_classes))
        out = np.empty(rows.size, dtype=np.intp)
        for a in range(0, rows.size, step):
            out[a:a + step] = np.asarray(self.targets[rows[a:a + step]]).argmax(axis=1)
        return out

    def smoothed(self, y: np.ndarray) -> np.ndarray:
        """Labels smoothed toward 1/2: y (1 - A) + A/2 (Keras' form)."""
        return y * (1.0 - self.smoothing) + 0.5 * self.smoothing if self.smoothing else y

    def coefficients(self, rows: np.ndarray):
        """(y', w, pw) for the rows, float64, broadcast to (R, K): the smoothed labels, and the
        element weights times the sample weights."""
        y = self.smoothed(np.asarray(self.targets[rows], dtype=np.float64))
        w = np.asarray(self.weight[rows], dtype=np.float64) if self.weight is not None else None
        sw = self.sem.sample_weight
        if sw is not None:
            w = np.asarray(sw[rows]) if w is None else w * sw[rows]
        pw = self.pos_weight
        return y, w, pw if pw is None or pw.ndim == 1 else pw[rows]

    def pos_weight_at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
        """pos_weight at elements (rows[k], cols[k])."""
        pw = self.pos_weight
        if pw is None or pw.ndim == 1:
            return None if pw is None else pw[cols]
        return pw[rows, cols if pw.shape[1] > 1 else 0]

    def evaluate_rows(self, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                      floor_coef: float | None = None, lse_weight: float = 1.0) -> ChunkEval:
        """Rows `rows` with logits `z_rows` (possibly perturbed): through the compiled kernel
        when it serves them, else the numpy kernel (its reference). `grad=False` is a loss-only
        evaluation (loss, total_weight, row_terms): the compiled kernel then writes no
        per-element losses (ChunkEval.per_element raises), which no loss-only caller reads.
        (`lse_weight`: the softmax floor's; a sigmoid has no lse.)"""
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

    def _entry_terms(self, rows, cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """|w c|, |w| (|1 - y'| + |pw y'|) and |w| max(-pw, 0) y' at entries (rows, cols),
        c = (1 - y') + pw y' = 1 + (pw - 1) y': 4 max|d2l/dz2|, max|dl/dz| and the weight of
        a term that a negative pos_weight makes cancel (w with the sample weights)."""
        y = self.smoothed(np.asarray(self.targets[rows, cols], dtype=np.float64))
        at = self.pos_weight_at(rows, cols)
        pw = np.ones_like(y) if at is None else at
        g1 = np.abs(1.0 - y) + np.abs(pw * y)
        c = np.ones_like(y)
        if self.pos_weight is not None:
            # c = (1 - y') + pw y', not 1 + (pw - 1) y' (0 at y' = 1 once pw < eps/2), rounded up
            c = np.abs((1.0 - y) + pw * y) + 2.0 * EPS * g1
        neg = np.maximum(-pw, 0.0) * y
        for w in (self.weight, self.sem.sample_weight):
            if w is not None:
                w_abs = np.abs(np.asarray(w[rows, cols], dtype=np.float64))
                c, g1, neg = c * w_abs, g1 * w_abs, neg * w_abs
        return np.abs(c), g1, neg

    def _truncation(self, z_entry: np.ndarray, h: np.ndarray, cw: np.ndarray,
                    g1w: np.ndarray) -> np.ndarray:
        """h^2/6 max|d3l/dx3| of the element's loss on [x - h, x + h] (see `fd_error_bound`),
        from |w c| and g1 = |w| (|1 - y'| + |pw y'|) there (`_entry_terms`)."""
        if not self.transformed:
            return h * h / 6.0 * cw * logistic_third_max(z_entry, h)
        T1, T2, T3 = chain_bounds(self.sem)
        with np.errstate(over="ignore", invalid="ignore"):
            z_c, _ = transform(z_entry, self.sem.logit_scale, self.sem.softcap)
        third = logistic_third_max(z_c, T1 * h)
        f3 = cw * (third * T1**3 + 0.75 * T1 * T2) + g1w * T3
        return h * h / 6.0 * f3

    def fd_error_bound(self, rows, cols, z_entry: np.ndarray, h: np.ndarray, ev: ChunkEval) -> np.ndarray:
        """Rounding of the row sum, 8*eps*(1 + log2 K)*(|loss_n| + sum_k c_k)/h, plus truncation
        h^2/6 * c * max|s(1-s)(1-2s)| on [x - h, x + h] (c = w*(1 + (pw-1)y) at the entry).

        Through z = T(x) (softcap, scale) the chain rule's f3 = g3 T'^3 + 3 g2 T' T'' + g1 T'''
        bounds the truncation, with |g3| <= c max|s(1-s)(1-2s)| over [z - S h, z + S h],
        |g2| <= c/4, |g1| <= |w| (|1 - y'| + |pw y'|) and |T^(k)| from semantics.chain_bounds;
        the row sum's rounding then holds the rounded z's share (`total_weight`)."""
        K = self.n_classes
        rounding = 8.0 * EPS * (1.0 + np.log2(K)) * (np.abs(ev.loss) + ev.total_weight) / h
        cw, g1w, _ = self._entry_terms(rows, cols)
        return (rounding + self._truncation(z_entry, h, cw, g1w)) * self.grad_scale

    # --- finite differences of single elements: the loss is a sum of independent terms ---

    def at_entries(self, rows: np.ndarray, cols: np.ndarray) -> SigmoidBCE:
        """Elements (rows[k], cols[k]) as a problem of one row of M elements: their logits,
        labels, weights, sample weights and pos_weight, the same options, gradient scale and
        kernel. Every option acts per element, so each element's loss, gradient and floor
        are the ones it has in its own row (the same formulas, elementwise)."""
        rows, cols = np.asarray(rows), np.asarray(cols)
        M = rows.size

        def pick(a):
            return None if a is None else np.asarray(a[rows, cols]).reshape(1, M)

        part = SigmoidBCE(
            pick(self.z), Layout((1, M), 1), pick(self.targets),
            pick(self.weight), self.pos_weight_at(rows, cols),
            self.reduction, self.source, self.smoothing,
            replace(self.sem, sample_weight=pick(self.sem.sample_weight)),
            weighted_count=self.denominator)  # the divisor of 'mean': the same grad_scale
        if self.kernel is None:
            object.__setattr__(part, "kernel", None)
        return part

    def entry_values(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, *,
                     floor_coef: float | None = None) -> ChunkEval:
        """Elements (rows[k], cols[k]) at logits values[k] through this problem's kernel
        (compiled, else numpy): one row of M elements with the per-element losses
        (`per_element`), the gradient and, given `floor_coef`, the floor."""
        x = np.asarray(values, dtype=np.float64).reshape(1, -1)
        if x.size == 0:  # no entries: an empty row
            return ChunkEval(loss=np.zeros(1), grad=x, floor=x, lse=np.zeros(1),
                             total_weight=np.zeros(1), items=x, item_weight=x)
        part = self.at_entries(rows, cols)
        return part.evaluate_rows(x, np.zeros(1, dtype=np.int64), floor_coef=floor_coef)

    def entry_losses(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The losses l of elements (rows[k], cols[k]) at logits values[k] (unreduced)."""
        return self.entry_values(rows, cols, values).per_element()[0][0]

    def entry_fd_error_bound(self, rows, cols, z_entry: np.ndarray, h: np.ndarray,
                             lp: np.ndarray, lm: np.ndarray) -> np.ndarray:
        """Bound on |fd - dl/dx| * scale, fd = (l(x + h) - l(x - h)) / 2h of one element with
        both losses from `entry_losses` (lp, lm; h the realised half-step).

        Rounding. The kernels form e = exp(-|z|) and t = log1p(e) (each within 1 ulp; e's
        error moves t by at most e/(1 + e) <= t relatively), softplus(+-z) = max(+-z, 0) + t,
        the products with pw y' and 1 - y', their sum and the product with w. With pw y' >= 0
        no term cancels: l is within ~8 ulp (4 eps) of |l|. A negative pw cancels: the error
        is then relative to |w| (|pw y'| sp(-z) + (1 - y') sp(z)) = |l| + 2 |w pw y'| sp(-z)
        at most, sp(-z) <= |z| + S h + log 2 over the step. Through T (softcap, scale) the
        rounded z = T(x) (a few ulp of |z|) moves l by |dl/dz| <= g1 = |w| (|1 - y'| + |pw y'|)
        times that. So each loss errs by at most

            E = 8 eps (max(|lp|, |lm|) + |w c| + 2 |w pw y'| [pw < 0] (|z| + S h + log 2)
                       + g1 (|z| + S h) [with T]),

        the difference quotient by 2E / 2h = E/h; the subtraction, the division by the
        realised step and the scale add ~3 ulp of |fd| <= g1 S: 2 eps g1 S. One element, no
        row sum: no (1 + log2 K) factor.

        Truncation h^2/6 max|l'''| on [x - h, x + h], as in `fd_error_bound`."""
        cw, g1w, neg = self._entry_terms(rows, cols)
        truncation = self._truncation(z_entry, h, cw, g1w)
        S = abs(self.sem.logit_scale)
        z_c = z_entry
        if self.transformed:
            with np.errstate(over="ignore", invalid="ignore"):
                z_c, _ = transform(z_entry, self.sem.logit_scale, self.sem.softcap)
        reach = np.abs(z_c) + S * h  # |z| over the step
        magnitude = np.maximum(np.abs(lp), np.abs(lm)) + cw + 2.0 * neg * (reach + np.log(2.0))
        if self.transformed:
            magnitude += g1w * reach
        rounding = 8.0 * EPS * magnitude / h + 2.0 * EPS * g1w * S
        return (rounding + truncation) * self.grad_scale

    def directional_error_bound(self, ep: ChunkEval, em: ChunkEval, delta: np.ndarray) -> np.ndarray:
        """Rounding of both row sums plus sum_k c_k * THIRD_MOMENT_MAX * |delta_k|^3 / 24 (a sum
        over elements: the third derivative is diagonal); through T each element's bound of
        `fd_error_bound`, from the row sums of c and |g1| (`row_terms`)."""
        K = self.n_classes
        rounding = 16.0 * EPS * (1.0 + np.log2(K)) * (
            np.maximum(np.abs(ep.loss), np.abs(em.loss)) + ep.total_weight)
        reach = np.abs(delta).max(axis=1)
        if not self.transformed:
            truncation = ep.total_weight * THIRD_MOMENT_MAX * reach**3 / 24.0
            return (rounding + truncation) * self.grad_scale
        T1, T2, T3 = chain_bounds(self.sem)
        cw, g1w = required(ep.row_terms, "row terms").T
        f3 = cw * (THIRD_MOMENT_MAX * T1**3 + 0.75 * T1 * T2) + g1w * T3
        return (rounding + f3 * reach**3 / 24.0) * self.grad_scale


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
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    denominator: float | None = None,
    sample_weight: np.ndarray | None = None,
    sample_weight_source: str = "sample_weight",
) -> tuple[SigmoidBCE, list[str]]:
    """Validate inputs (labels in [0, 1], shapes, broadcasts, the training-code options) and
    build the problem."""
    warnings: list[str] = []
    logits, labels = as_numeric_inputs(logits, labels, reduction, source, labels_source)
    validate_scalars(0.0, softcap, logit_scale, "torch", denominator, reduction)
    if not (math.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise CeCheckError(f"`label_smoothing`: must be in [0, 1], got {label_smoothing}")
    layout = make_layout(logits.shape, -1, source)  # rows: the last axis
    if labels.shape != logits.shape:
        if _squeezed(labels.shape) == _squeezed(logits.shape):  # (N, 1) CSV column for (N,) logits
            labels = labels.reshape(logits.shape)
        else:
            raise CeCheckError(f"{labels_source}: shape {labels.shape} does not match the logits "
                               f"{logits.shape}: binary labels need the logits' shape")
    targets = layout.to_rows(labels)
    _check_unit_interval(targets, layout, labels_source)
    w_rows = _element_weights(weight, logits.shape, layout, weight_source)
    pw = _pos_weights(pos_weight, logits.shape, layout, pos_weight_source)
    sw, count = None, None
    if sample_weight is not None:
        sw, count = _sample_weights(np.asarray(sample_weight), layout, sample_weight_source,
                                    warnings)
        if reduction == "mean" and denominator is None and count == 0:
            raise CeCheckError(f"{sample_weight_source}: the sample weights sum to 0: 'mean' is "
                               "0/0; give `denominator` or reduction sum")
    sem = Semantics(softcap=softcap, logit_scale=logit_scale, denominator=denominator,
                    sample_weight=sw)
    problem = SigmoidBCE(layout.to_rows(logits), layout, targets, w_rows, pw, reduction, source,
                         float(label_smoothing), sem, count)
    return problem, warnings


def _element_weights(weight, shape: tuple[int, ...], layout: Layout, source: str) -> np.ndarray | None:
    """PyTorch's `weight`, broadcast to the logits, as (N, K) float64 rows."""
    if weight is None:
        return None
    w = np.asarray(weight, dtype=np.float64)
    try:
        w_full = np.broadcast_to(w, shape)
    except ValueError:
        raise CeCheckError(f"{source}: shape {w.shape} does not broadcast to the logits "
                           f"{shape}") from None
    if not np.all(np.isfinite(w)):
        i = tuple(int(v) for v in np.argwhere(~np.isfinite(w))[0])
        raise CeCheckError(f"{source}: shape {w.shape}: non-finite weight at index {i}")
    return layout.to_rows(w_full)


def _pos_weights(pos_weight, shape: tuple[int, ...], layout: Layout,
                 source: str) -> np.ndarray | None:
    """PyTorch's pos_weight, broadcast with the labels (e.g. (C, 1, 1) for (N, C, H, W)
    logits), as float64: (K,) when it varies along the last axis only, (N, 1) rows when it is
    constant along it, else (N, K) rows."""
    if pos_weight is None:
        return None
    pw = np.asarray(pos_weight, dtype=np.float64)
    if not np.all(np.isfinite(pw)):
        raise CeCheckError(f"{source}: non-finite pos_weight")
    if pw.ndim > len(shape) or pw.shape[-1:] not in ((), (1,), shape[-1:]):
        raise CeCheckError(f"{source}: shape {pw.shape}; pos_weight broadcasts with the labels, "
                           f"shape {shape}: one value, ({shape[-1]},) along the last axis, or a "
                           "shape that broadcasts to the logits")
    try:
        full = np.broadcast_to(pw, shape)
    except ValueError:
        raise CeCheckError(f"{source}: shape {pw.shape} does not broadcast to the logits "
                           f"{shape}") from None
    if pw.size == 1 or pw.ndim == 1 or all(n == 1 for n in pw.shape[:-1]):
        return np.broadcast_to(pw.reshape(-1), (layout.n_classes,)).copy()
    if pw.shape[-1] == 1:  # one value a row: the rows' values, not N*K copies
        return np.ascontiguousarray(full[..., :1].reshape(layout.n_rows, 1), dtype=np.float64)
    return np.ascontiguousarray(layout.to_rows(full), dtype=np.float64)


def _sample_weights(sw: np.ndarray, layout: Layout, source: str,
                    warnings: list[str]) -> tuple[np.ndarray, float]:
    """Sample weights with the batch's shape (the logits' without the last axis; for 1-D
    logits (N,) one per element), as the (N, K) float64 broadcast over the last axis, and
    their sum over the elements (K sum_n s_n)."""
    if sw.dtype.kind not in "biuf":
        raise CeCheckError(f"{source}: dtype {sw.dtype} is not numeric")
    if len(layout.shape) == 1:  # (N,) logits: N samples of one label each
        if sw.shape != layout.shape:
            raise CeCheckError(f"{source}: shape {sw.shape} does not match the logits "
                               f"{layout.shape}: sample weights of 1-D logits have their shape")
        flat = np.asarray(sw, dtype=np.float64).reshape(-1)
        check_sample_weights(flat, source, lambda i: (i,), warnings)
        return flat.reshape(1, -1), loss_sum(flat)
    rows = np.asarray(match_batch(sw, layout, source, "sample weights"), dtype=np.float64)
    check_sample_weights(rows, source, layout.batch_index, warnings)
    count = loss_sum(rows) * layout.n_classes
    return np.broadcast_to(rows[:, None], (layout.n_rows, layout.n_classes)), count


# IEEE binary16/32/64: +0 .. 1.0 are exactly the bit patterns 0 .. bits(1.0) as unsigned
# integers; negatives (-0.0 too), NaN and anything above 1 are larger
_UNIT_BITS = {2: (np.uint16, 0x3C00), 4: (np.uint32, 0x3F800000), 8: (np.uint64, 0x3FF0000000000000)}


def _check_unit_interval(targets: np.ndarray, layout: Layout, source: str) -> None:
    """Every label in [0, 1] (NaN fails): by the compiled kernel's row minima and maxima in one
    pass, the rows it flags looked at again below; without it
    numpy's own float and integer dtypes are compared in their dtype (float64 conversion is
    exact and keeps the order), by min and max over blocks that stay in cache (IEEE floats first
    by one max of their bits: a block with -0.0 then takes the min and max); others are
    converted to float64 first."""
    scan = compiled.row_scan(targets, sums=False)
    if scan is not None:
        _, lo, hi = scan
        for r in np.flatnonzero(~((lo >= 0) & (hi <= 1))):  # a NaN maximum fails
            _check_unit_block(targets[r:r + 1], int(r), layout, source)
        return
    native = targets.dtype.kind in "fiu" and targets.dtype.isbuiltin == 1
    bits = _UNIT_BITS.get(targets.dtype.itemsize) if targets.dtype.kind == "f" else None
    step = max(1, (1 << 18 if native else 1 << 20) // max(1, layout.n_classes))
    for start in range(0, layout.n_rows, step):
        block = targets[start:start + step] if native else np.asarray(targets[start:start + step],
                                                                      dtype=np.float64)
        if block.size and bits is not None and block.view(bits[0]).max() <= bits[1]:
            continue
        _check_unit_block(block, start, layout, source)


def _check_unit_block(block: np.ndarray, start: int, layout: Layout, source: str) -> None:
    """Raise at the first label of rows [start, start + len(block)) outside [0, 1], if any."""
    if block.size and block.min() >= 0 and block.max() <= 1:  # NaN fails both
        return
    bad = ~((block >= 0) & (block <= 1))
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise CeCheckError(
            f"{source}: shape {layout.shape}: label {float(block[r, c])} at index "
            f"{layout.original_index(start + r, c)} is outside [0, 1]"
        )


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)
