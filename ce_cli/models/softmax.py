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

from dataclasses import dataclass

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.models.layout import Layout, RowMatrix, make_layout, match_batch
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX, logistic_third_max

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class ChunkEval:
    """Reference values for rows [start, stop)."""

    loss: np.ndarray          # (R,) unreduced row losses loss_n (0 for ignored rows)
    grad: np.ndarray | None   # (R, C) gradient of the reduced loss
    floor: np.ndarray | None  # (R, C) error floor of a correct implementation (see tolerance.py)
    lse: np.ndarray           # (R,) log-sum-exp of the row
    total_weight: np.ndarray  # (R,) Q_n = sum_c q_nc
    items: np.ndarray | None = None        # (R, C) per-element losses (elementwise models)
    item_weight: np.ndarray | None = None  # (R, C) per-element loss scale (elementwise models)
    row_max: np.ndarray | None = None      # (R,) m, softmax rows: lse = m + log1p(s1) ...
    log1p_s1: np.ndarray | None = None     # (R,) ... kept apart, so log a = (z - m) - log1p(s1)

    def take_rows(self, idx: np.ndarray) -> ChunkEval:
        """The per-row values of rows `idx` (per-entry arrays dropped)."""
        def pick(v):
            return None if v is None else v[idx]

        return ChunkEval(loss=self.loss[idx], grad=None, floor=None, lse=self.lse[idx],
                         total_weight=self.total_weight[idx], row_max=pick(self.row_max),
                         log1p_s1=pick(self.log1p_s1))


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

    def evaluate(self, start: int, stop: int, *, grad: bool = True,
                 floor_coef: float | None = None) -> ChunkEval:
        """Loss, gradient and (when `floor_coef` = k*eps is given) the error floor of rows [start, stop)."""
        return self.evaluate_rows(
            self.z[start:stop], np.arange(start, stop), grad=grad, floor_coef=floor_coef
        )

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

    def evaluate_rows(self, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                      floor_coef: float | None = None) -> ChunkEval:
        """The kernel: rows `rows` of the problem, with logits `z_rows` (possibly perturbed).
        The compiled kernel (fused.py) serves what it can; this numpy code is its reference."""
        from ce_cli.kernels.compiled import evaluate_rows  # fused.py builds on this module

        ev = evaluate_rows(self, z_rows, rows, grad=grad, floor_coef=floor_coef)
        if ev is not None:
            return ev
        with np.errstate(invalid="ignore"):  # 0 * -inf at masked logits, replaced where it occurs
            return self._evaluate_rows(z_rows, rows, grad, floor_coef)

    def _evaluate_rows(self, z_rows, rows, grad, floor_coef) -> ChunkEval:
        zs = np.array(z_rows, dtype=np.float64)  # becomes z - m in place
        R, C = zs.shape
        r = np.arange(R)
        am = zs.argmax(axis=1)
        m = zs[r, am]
        active = self.valid[rows]
        if not np.all(np.isfinite(m)):
            m = self._check_row_max(zs, m, rows, active)
        zs -= m[:, None]
        e = np.exp(zs)
        e[r, am] = 0.0
        s1 = e.sum(axis=1)
        e[r, am] = 1.0
        l1 = np.log1p(s1)          # lse - m
        s = 1.0 + s1
        lse = m + l1
        # -inf logits (masks) make 0 * -inf terms below; find them only when those terms exist
        needs_mask = floor_coef is not None or self.smoothing or self.probs is not None
        has_neginf = needs_mask and bool(np.isneginf(zs.min(axis=1)).any())

        q, beta, ys = self.targets(rows)
        w = self.weight
        if beta is None:  # probability targets: q is a dense (R, C) array
            Q = q.sum(axis=1)
            qz = np.where(q != 0, q * zs, 0.0).sum(axis=1) if has_neginf else np.einsum("ij,ij->i", q, zs)
        else:
            alpha = q
            W = float(w.sum()) if w is not None else float(C)
            Q = alpha + beta * W
            zy = zs[r, ys]
            qz = np.where(alpha != 0, alpha * zy, 0.0)
            if self.smoothing:
                if w is None:
                    sz = zs.sum(axis=1)
                elif has_neginf:
                    sz = np.where(w != 0, zs * w, 0.0).sum(axis=1)
                else:
                    sz = zs @ w
                qz = qz + np.where(beta != 0, beta * sz, 0.0)
        loss = np.where(active, Q * l1 - qz, 0.0)

        scale = self.grad_scale
        floor = None
        if floor_coef is not None:
            # k*eps*(Q*a*(1 + |log a| + |lse|) + |q|)*scale: |log a| = l1 - zs
            floor = np.subtract((1.0 + l1 + np.abs(lse))[:, None], zs)
            if has_neginf:
                np.minimum(floor, 1e300, out=floor)
            floor *= e
            floor *= (floor_coef * scale * np.abs(Q) / s)[:, None]
            if beta is None:
                floor += floor_coef * scale * np.abs(q)
            else:
                if self.smoothing:
                    floor += (floor_coef * scale * np.abs(beta))[:, None] * np.abs(w if w is not None else 1.0)
                floor[r, ys] += floor_coef * scale * np.abs(alpha)

        g = None
        if grad:
            g = e
            g *= (Q * scale / s)[:, None]
            if beta is None:
                g -= q * scale
                q_am = q[r, am]
                rest = Q - q_am
            else:
                if self.smoothing:
                    g -= (beta * scale)[:, None] * (w if w is not None else 1.0)
                g[r, ys] -= alpha * scale
                w_am = w[am] if w is not None else 1.0
                W = float(w.sum()) if w is not None else float(C)
                rest = np.where(am != ys, alpha, 0.0) + beta * (W - w_am)
            # a confident row (a_max >= 1/2): a_max - 1 = -s1/s exactly, so
            # Q*a - q = Q*(a - 1) + (Q - q) keeps full precision; a flat row keeps Q*a - q
            sure = s1 <= 1.0
            g[r[sure], am[sure]] = scale * (rest[sure] - Q[sure] * s1[sure] / s[sure])
            if self.nan_gradient:
                g[active] = np.nan
        return ChunkEval(loss=loss, grad=g, floor=floor, lse=lse, total_weight=Q, row_max=m,
                         log1p_s1=l1)

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

    def _check_row_max(self, zs, m, rows, active):
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


def as_numeric_inputs(logits, labels, reduction: str, source: str, labels_source: str):
    """The checks every loss model starts with: numeric arrays and a known reduction."""
    logits = np.asarray(logits) if not isinstance(logits, np.ndarray) else logits
    labels = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    if logits.dtype.kind not in "biuf":
        raise CeCheckError(f"{source}: dtype {logits.dtype} is not numeric")
    if labels.dtype.kind not in "biuf":
        raise CeCheckError(f"{labels_source}: dtype {labels.dtype} is not numeric")
    if reduction not in REDUCTIONS:
        raise CeCheckError(f"`reduction`: unknown value '{reduction}' (use mean, sum or none)")
    return logits, labels


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
            f"{source}: shape {y.shape}: label {yf[i]!r} at index {layout.batch_index(i)} is not a "
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
