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

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels import compiled
from ce_cli.kernels.base import ChunkEval
from ce_cli.kernels.numpy_softmax import semantic_rows, softmax_rows, transform
from ce_cli.models import semantics as ext
from ce_cli.models.base import RowMatrix, as_numeric_inputs
from ce_cli.models.layout import Layout, make_layout, match_batch
from ce_cli.models.semantics import Semantics, SplitLse, transformed_row_stats
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX, logistic_third_max


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(frozen=True, eq=False)
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
    sem: Semantics = field(default_factory=Semantics)  # z-loss, softcap, shards ... (semantics.py)
    kernel: Any = field(default=None, compare=False, repr=False)  # compiled.FusedKernel or None
    q_sums: np.ndarray | None = field(default=None, compare=False, repr=False)  # (N,) probs' row sums

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
    def one_target_term(self) -> bool:
        """Whether each row's targets are one term (index targets, no smoothing, the whole
        vocabulary): a backward's sum over them is then exact, so a factor on your gradient's
        softmax term is its normaliser's, and your loss carries the same (LossStage.unexplained)."""
        return self.probs is None and not self.smoothing and self.sem.vocab_offset is None

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

    def loss_floor(self, ev: ChunkEval, coef: float, rows: np.ndarray | None = None) -> np.ndarray:
        """Error of a correct loss_n (of `rows`, evaluated in `ev`) in a precision with k*eps =
        coef: the rounded terms of Q*lse - q.z, and lse's own magnitude (implementations that
        form lse = m + log s)."""
        if self.sem.extended:
            return ext.loss_floor(ev, coef)
        return coef * (np.abs(ev.loss) + np.abs(ev.total_weight) * (1.0 + np.abs(ev.lse)))

    @property
    def grad_scale(self) -> float:
        """d(reduced loss)/d(loss_n): 1/D for 'mean' (0 when D is 0: PyTorch's zero gradient);
        1/N with an outside `denominator` N."""
        if self.sem.denominator is not None:
            return 1.0 / self.sem.denominator
        if self.reduction != "mean":
            return 1.0
        return 1.0 / self.denominator if self.denominator != 0 else 0.0

    @property
    def max_target_weight(self) -> float:
        """An upper bound of Q_n (1 unweighted): scales the subnormal allowance."""
        q = float(np.abs(self.weight).max()) if self.weight is not None else 1.0
        sem = self.sem
        if sem.extended:
            s = float(np.abs(sem.sample_weight).max()) if sem.sample_weight is not None else 1.0
            q = q * s * sem.logit_scale * (1.0 + 2.0 * sem.z_loss)
        return q

    @property
    def nan_gradient(self) -> bool:
        """'mean' with D = 0 but some target not ignored (all weights 0): PyTorch's 0/0 NaN rows."""
        return (self.reduction == "mean" and self.sem.denominator is None
                and self.denominator == 0 and bool(self.valid.any())
                and self.sem.empty_mean == "nan")

    def reduce(self, row_loss_sum: float) -> float:
        if self.sem.denominator is not None:
            return row_loss_sum / self.sem.denominator
        if self.reduction == "mean":
            d = self.denominator
            return row_loss_sum / d if d != 0 else ext.mean_of_nothing(self.sem.empty_mean)
        return row_loss_sum

    def target_columns(self, rows: np.ndarray) -> np.ndarray:
        """The target class of each row: the label, or the largest target probability."""
        if self.probs is not None:
            return np.asarray(self.probs[rows]).argmax(axis=1)
        return np.where(self.valid[rows] & self.sem.inside(rows), self._local(rows), 0)

    def _local(self, rows: np.ndarray) -> np.ndarray:
        """The labels of `rows` as this array's columns (a shard's labels are global ids)."""
        assert self.labels is not None  # index targets
        y = self.labels[rows]
        return y - self.sem.vocab_offset if self.sem.vocab_offset else y

    def targets(self, rows: np.ndarray):
        """(alpha, beta, y) for index targets or (q, None, None) for probability targets."""
        if self.probs is not None:
            return self._smoothed(np.asarray(self.probs[rows], dtype=np.float64), self.weight), None, None
        valid = self.valid[rows]
        ys = self.target_columns(rows)
        wy = (self.sem.label_weight[rows] if self.sem.label_weight is not None
              else self.weight[ys] if self.weight is not None else 1.0)
        on, off = smoothing_split(self.smoothing, self.sem.smoothing_classes or self.n_classes,
                                  self.sem.smoothing_form)
        return np.where(valid, on * wy, 0.0), np.where(valid, off, 0.0), ys

    def targets_entropy(self) -> np.ndarray | None:
        """Per row s_n H(q) (0 for ignored rows), H(q) = -sum_c q_c log q_c of the smoothed
        one-hot targets: what T5X and Flax subtract from each token's loss (their loss is the
        KL divergence, the gradient the same); 0 without smoothing. None where it is not theirs:
        probability targets, class weights, a vocabulary shard."""
        eps, C = self.smoothing, self.n_classes
        if self.probs is not None or self.weight is not None or self.sem.vocab_offset is not None:
            return None
        if not eps or C < 2:
            return np.zeros(self.n_rows)
        alpha, beta = smoothing_split(eps, C, self.sem.smoothing_form)
        h = -(C - 1) * _xlogx(beta) - _xlogx(alpha + beta)  # q_y = alpha + beta, else beta
        rows = np.arange(self.n_rows)
        return np.where(self.valid, h * self.sem.row_weight(rows), 0.0)

    def _smoothed(self, t: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        """Probability targets as the loss weighs them: (t (1 - eps) + eps/C) w."""
        if self.smoothing:
            t = t * (1.0 - self.smoothing) + self.smoothing / self.n_classes
        return t * w if w is not None else t

    def target_entries(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """`target_weights(rows)[0][i, cols[i]]` for each i, without forming the dense rows."""
        w = self.weight[cols] if self.weight is not None else None
        if self.probs is not None:
            full = self._smoothed(np.asarray(self.probs[rows, cols], dtype=np.float64), w)
        else:
            alpha, beta, ys = self.targets(rows)
            hit = (ys == cols) & self.sem.inside(rows)
            full = beta * (w if w is not None else 1.0) + np.where(hit, alpha, 0.0)
        if self.sem.extended:
            x = np.asarray(self.z[rows, cols], dtype=np.float64)
            _z, dz = transform(x, self.sem.logit_scale, self.sem.softcap)
            full = full * self.sem.row_weight(rows) * dz
        return full

    def target_weights(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense (R, C) target weights q, and the part of them smoothing spreads over every
        class (alpha * w_c / C; 0 for ignored rows). With softcap, scale or sample weights,
        both as they enter the raw-logit gradient: times s_n T'(x), so that
        reference + q * scale stays the softmax term (a normaliser factor multiplies it)."""
        C = self.n_classes
        w = self.weight if self.weight is not None else np.ones(C)
        q, beta, ys = self.targets(rows)
        live = self.valid[rows].astype(np.float64)[:, None]
        if beta is None:
            full, spread = q, live * (self.smoothing / C) * w[None, :]
        else:
            spread = beta[:, None] * w[None, :]
            full = spread.copy()
            full[np.arange(len(rows)), ys] += np.where(self.sem.inside(rows), q, 0.0)
        if self.sem.extended:
            x = np.asarray(self.z[rows], dtype=np.float64)
            _z, dz = transform(x, self.sem.logit_scale, self.sem.softcap)
            chain = self.sem.row_weight(rows)[:, None] * dz
            full, spread = full * chain, spread * chain
        return full, spread

    def evaluate_rows(self, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                      floor_coef: float | None = None, picks: np.ndarray | None = None,
                      perturb: tuple[np.ndarray, np.ndarray] | None = None,
                      lse_weight: float = 1.0,
                      steps: tuple[np.ndarray, np.ndarray] | None = None) -> ChunkEval:
        """Rows `rows` of the problem with logits `z_rows`: through the compiled kernel when it
        serves them, else the numpy kernel (its reference). `perturb` = (cols, values): row i
        with its (raw) logit at cols[i] set to values[i], in float64 (the rows are not written
        to). `picks` ((R, k) columns, -1: none): the gradient and floor at those columns only
        (ChunkEval.pick_grad, pick_floor), not the (R, C) arrays: the compiled kernel then
        makes no pass over every entry. `steps` = ((R, k) columns, (R, k) values): the compiled
        kernel's loss of row i with its logit at cols[i, j] set to values[i, j]
        (ChunkEval.step_loss, the bits `perturb` gives; NaN, or no step_loss, where not
        served). `lse_weight`: the floor's |lse| term's (Tolerance.lse_weight)."""
        if self.kernel is not None:
            ev = self.kernel.evaluate(z_rows, np.asarray(rows), grad=grad, floor_coef=floor_coef,
                                      picks=picks, perturb=perturb, lse_weight=lse_weight,
                                      steps=steps)
            if ev is not None:
                return ev
        rows_fn = semantic_rows if self.sem.extended else softmax_rows
        ev = rows_fn(self, z_rows, rows, grad=grad or picks is not None, floor_coef=floor_coef,
                     perturb=perturb, lse_weight=lse_weight)
        return ev if picks is None else ev.picked(picks)

    def fd_error_bound(self, rows, cols, z_entry: np.ndarray, h: np.ndarray, ev: ChunkEval) -> np.ndarray:
        """Bound on |central difference - derivative| of loss_n at entries `z_entry` (row-wise `ev`).

        Rounding: each loss evaluation errs by about 8*eps*(|loss_n| + |Q|*(2 + 2*log2 C))
        (loss_n = Q*l1 + |q.zs| holds every rounded term, H(a) <= log C bounds the shift's);
        it is divided by 2h. Truncation: h^2/6 * |Q| * max|a(1-a)(1-2a)| over the step, the
        third derivative of lse along one coordinate, bounded on [z - h, z + h] exactly.
        With softcap, logit scale, z-loss, sample weights or a shard: semantics.fd_error_bound
        (the chain rule's derivatives of T scale the truncation term).
        """
        if self.sem.extended:
            return ext.fd_error_bound(self.sem, self.n_classes, z_entry, h, ev) * self.grad_scale
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
        THIRD_MOMENT_MAX * range(u)^3, and range(u) <= max|delta|. Extended problems:
        semantics.directional_error_bound.
        """
        if self.sem.extended:
            return ext.directional_error_bound(self.sem, self.n_classes, ep, em,
                                               delta) * self.grad_scale
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


def _xlogx(x: float) -> float:
    """x log x, 0 at x = 0 (its limit: a weight that underflowed adds nothing)."""
    return x * math.log(x) if x > 0 else 0.0


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
    semantics: Semantics | None = None,
    lse: Any = None,
    sample_weight_source: str = "sample_weight",
    lse_source: str = "lse",
) -> tuple[SoftmaxCE, list[str]]:
    """Validate inputs and build the problem. Returns it with a list of warnings.

    `semantics` holds the training-code options as given (its `sample_weight` any array of the
    batch's shape; `inside_mask` and `rho` are derived here); `lse` is the global per-row
    log-sum-exp of a vocabulary shard (with `vocab_offset`)."""
    warnings: list[str] = []
    args = semantics or Semantics()
    logits, labels = as_numeric_inputs(logits, labels, reduction, source, labels_source)
    if not (np.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise CeCheckError(f"`label_smoothing`: must be in [0, 1], got {label_smoothing}")
    ext.validate_scalars(args.z_loss, args.softcap, args.logit_scale, args.smoothing_form,
                         args.denominator, reduction)
    layout = make_layout(logits.shape, class_axis, source)
    w_all = class_weights(weight, _weight_classes(args, layout), weight_source, warnings)
    if labels.shape == logits.shape and labels.ndim >= 1 and not (labels.ndim == 1 and layout.n_classes == 1):
        probs = layout.to_rows(labels)
        if ignore_index >= 0:
            raise CeCheckError(
                f"`ignore_index={ignore_index}`: not supported with probability targets "
                f"({labels_source} has the logits' shape {labels.shape}); PyTorch raises too"
            )
        _refuse_for_probabilities(args)
        q_sums = _check_probs(probs, layout, labels_source, warnings)
        y, valid = None, np.ones(layout.n_rows, dtype=bool)
    else:
        probs, q_sums = None, None
        y, valid = _index_targets(labels, layout, ignore_index, labels_source, args,
                                  warnings)
    z = layout.to_rows(logits)
    sem = _semantics(args, z, layout, y, valid, w_all, label_smoothing, warnings,
                     lse=lse, sources=(sample_weight_source, lse_source))
    denominator = _denominator(y, valid, w_all, sem)
    w64 = w_all  # the weights of this array's columns: a shard's part of the vocabulary's
    if w_all is not None and sem.vocab_offset is not None:
        w64 = w_all[sem.vocab_offset:sem.vocab_offset + layout.n_classes]
    if probs is None:
        _warn_empty(reduction, denominator, valid, sem, warnings)
    problem = SoftmaxCE(z, layout, y, probs, w64, ignore_index, float(label_smoothing),
                        reduction, denominator, valid, source, sem, q_sums=q_sums)
    return problem, warnings


def _weight_classes(args: Semantics, layout: Layout) -> int:
    """How many class weights: one per column, or a shard's whole vocabulary V (which must
    hold the shard's columns [K, K + C))."""
    K, V, C = args.vocab_offset, args.vocab_size, layout.n_classes
    if V is None:
        return C
    if K is None:
        raise CeCheckError("`vocab_size`: the size of a shard's whole vocabulary: needs "
                           "`vocab_offset`")
    if V < K + C:
        raise CeCheckError(f"`vocab_size`: {V} is smaller than the shard's columns [{K}, {K + C})")
    return V


def smoothing_split(eps: float, C: int, form: str) -> tuple[float, float]:
    """(alpha, beta) of smoothed index targets, q_c = alpha w_y [c = y] + beta w_c: torch
    (1 - eps, eps/C); others (Megatron, fairseq: 1 - eps on the target, eps/(C - 1) on every
    other class) (1 - eps - eps/(C - 1), eps/(C - 1))."""
    if form == "others" and C > 1:
        return 1.0 - eps - eps / (C - 1), eps / (C - 1)
    return 1.0 - eps, eps / C


def class_weights(weight, C: int, weight_source: str, warnings: list[str]) -> np.ndarray | None:
    """PyTorch's `weight=`: C finite values as float64 (None without); negative ones warn."""
    if weight is None:
        return None
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
    return w64


def _refuse_for_probabilities(args: Semantics) -> None:
    if args.smoothing_form != "torch":
        raise CeCheckError("`smoothing_form=others`: applies to class-index labels, not "
                           "probability targets")
    if args.vocab_offset is not None:
        raise CeCheckError("`vocab_offset`: applies to class-index labels, not probability targets")


def _index_targets(labels: np.ndarray, layout: Layout, ignore_index: int, labels_source: str,
                   args: Semantics, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Class indices as (N,) int64 and the rows that are not ignored; a shard's labels are
    global ids (out of range: negative, or past its `vocab_size` when given)."""
    y = match_batch(labels, layout, labels_source, "class-index labels")
    if y.dtype.kind == "b":
        warnings.append(f"{labels_source}: bool labels, read as class indices 0 (False) and "
                        "1 (True)")
    y = _as_class_indices(y, layout, labels_source)
    valid = y != ignore_index
    # a shard's labels lie anywhere in its whole vocabulary (V, when given)
    limit = layout.n_classes if args.vocab_offset is None else args.vocab_size
    bad = valid & ((y < 0) | ((y >= limit) if limit is not None else False))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = "is negative" if limit is None or y[i] < 0 else f"is out of range [0, {limit})"
        raise CeCheckError(
            f"{labels_source}: shape {labels.shape}: label {int(y[i])} at index "
            f"{layout.batch_index(i)} {where} and is not the ignore_index {ignore_index}"
        )
    return y, valid


def _semantics(args: Semantics, z, layout: Layout, y, valid: np.ndarray, w_all,
               smoothing: float, warnings: list[str], *, lse: Any,
               sources: tuple[str, str]) -> Semantics:
    """The validated `Semantics`: sample weights in rows, a shard's rest-of-vocabulary mass
    (without `vocab_offset` an `lse` is compared by the lse stage, not an input of the loss)."""
    sw = None
    sw_source, lse_source = sources
    if args.sample_weight is not None:
        sw = np.asarray(match_batch(np.asarray(args.sample_weight), layout,
                                    sw_source, "sample weights"), dtype=np.float64)
        ext.check_sample_weights(sw, sw_source, layout.batch_index, warnings)
    inside = rho = label_w = None
    rest = 0.0
    base = None
    if args.vocab_offset is not None:
        inside, rho, base = _shard(args, lse, lse_source, z, layout, y, valid, w_all, smoothing)
        label_w, rest = _shard_weights(args, layout.n_classes, y, valid, w_all)
    return replace(args, sample_weight=sw, inside_mask=inside, rho=rho, rho_base=base,
                   rest_weight=rest, label_weight=label_w)


def _shard_weights(args: Semantics, C: int, y, valid: np.ndarray,
                   w_all) -> tuple[np.ndarray | None, float]:
    """A shard's rows' label weights w_y (their columns may lie in other shards; None without
    class weights) and the weights of the classes outside its columns summed (V - C
    unweighted; 0 without `vocab_size`)."""
    K, V = args.vocab_offset, args.vocab_size
    assert K is not None
    if V is None:
        return None, 0.0
    if w_all is None:
        return None, float(V - C)
    rest = float(w_all[:K].sum() + w_all[K + C:].sum())
    return np.where(valid, w_all[np.where(valid, y, 0)], 0.0), rest


def _shard(args: Semantics, lse: Any, lse_source: str, z, layout: Layout, y,
           valid: np.ndarray, w_all, smoothing: float):
    """Which rows' labels lie in the shard's columns [K, K + C), and log R_n, the mass of the
    other columns (`_rest`), from the global lse given (an array, or a `SplitLse`)."""
    K, C = args.vocab_offset, layout.n_classes
    assert K is not None
    if K < 0:
        raise CeCheckError(f"`vocab_offset`: must be >= 0, got {K}")
    if w_all is not None and args.vocab_size is None:
        raise CeCheckError("`vocab_offset`: class weights are the whole vocabulary's: give "
                           "its `vocab_size` (and its V weights), or check the shards together "
                           "(`shards` vocab)")
    if smoothing and args.vocab_size is None:
        raise CeCheckError("`vocab_offset`: label smoothing spreads over the whole vocabulary: "
                           "give its `vocab_size`, or check the shards together (`shards` vocab)")
    if lse is None:
        raise CeCheckError("`vocab_offset`: needs `lse`, the global per-row log-sum-exp of the "
                           "whole vocabulary")
    rho, base = _rest(args, lse, lse_source, z, layout)
    return valid & (y >= K) & (y < K + C), rho, base


def _rest(args: Semantics, lse: Any, lse_source: str, z,
          layout: Layout) -> tuple[np.ndarray, np.ndarray | None]:
    """log R_n, R_n = exp(lse_n) - sum_shard exp(z); from a `SplitLse` (M, S) relative to the
    shard's row max m_i (returned too): R_n / exp(m_i) = (1 + S) exp(M - m_i) - (1 + s1_i),
    S - s1_i where the shard holds the row's max, so lse's rounding never enters."""
    split = lse if isinstance(lse, SplitLse) else None
    lse_in = np.asarray(split.lse if split is not None else lse)
    if lse_in.dtype.kind not in "iuf":
        raise CeCheckError(f"{lse_source}: dtype {lse_in.dtype} is not numeric")
    g = np.asarray(match_batch(lse_in, layout, lse_source, "the per-row log-sum-exp"),
                   dtype=np.float64)
    if not np.all(np.isfinite(g)):
        i = int(np.flatnonzero(~np.isfinite(g))[0])
        raise CeCheckError(f"{lse_source}: non-finite lse {g[i]} at index {layout.batch_index(i)}")
    m, s1 = transformed_row_stats(z, args.logit_scale, args.softcap)
    local = m + np.log1p(s1)
    eps = np.finfo(lse_in.dtype).eps if lse_in.dtype.kind == "f" else EPS
    gap = g - local
    short = gap < -8.0 * eps * (1.0 + np.abs(g))
    if short.any():
        i = int(np.flatnonzero(short)[0])
        raise CeCheckError(
            f"{lse_source}: the global lse {g[i]:.17g} at index {layout.batch_index(i)} is "
            f"below the shard's own log-sum-exp {local[i]:.17g}: not the whole vocabulary's")
    with np.errstate(divide="ignore"):
        rho = g + np.log(-np.expm1(-np.maximum(gap, 0.0)))
    if split is None:
        return rho, None
    M, S = (np.asarray(match_batch(np.asarray(a), layout, lse_source, "the per-row log-sum-exp"),
                       dtype=np.float64) for a in (split.m, split.s1))
    held = np.isfinite(m)  # rows with no mass in the shard keep log R_n = lse
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rest = np.where(m == M, S - s1, (1.0 + S) * np.exp(M - m) - (1.0 + s1))
        return np.where(held, np.log(np.maximum(rest, 0.0)), rho), np.where(held, m, 0.0)


def _denominator(y, valid: np.ndarray, w64, sem: Semantics) -> float:
    """D of 'mean': the non-ignored rows' weights sum_n s_n w_{y_n} (index targets; s_n the
    sample weights, w the class weights, 1 when absent: every class's, a shard's labels being
    global ids), sum_n s_n for probability targets."""
    s = sem.sample_weight
    if y is None:
        return float(np.sum(s)) if s is not None else float(len(valid))
    if w64 is not None:
        per = w64[y[valid]]
    else:
        per = np.ones(int(np.count_nonzero(valid)))
    if s is not None:
        per = per * s[valid]
    return float(np.sum(per))


def _warn_empty(reduction: str, denominator: float, valid: np.ndarray, sem: Semantics,
                warnings: list[str]) -> None:
    if reduction != "mean" or denominator != 0 or sem.denominator is not None:
        return
    warnings.append(empty_mean_warning(sem.empty_mean, every=not valid.any()))


def empty_mean_warning(empty_mean: str, every: bool) -> str:
    """The warning of 'mean' over a zero total weight (`every` target ignored, or the
    non-ignored targets' weights summing to 0), under `empty_mean` (models/semantics.py)."""
    what = ("every target is ignored" if every
            else "the non-ignored targets' weights sum to 0")
    if empty_mean == "zero":
        return f"{what}: the mean loss and the gradient are 0 (empty mean 'zero', as Liger, Keras, Paddle)"
    return (f"{what}: the mean loss is NaN (0/0, as PyTorch) and the gradient is "
            + ("zero" if every else "NaN in those rows")
            + "; Liger, Keras and Paddle return 0 instead (empty mean 'zero')")


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


def _check_probs(probs: np.ndarray, layout: Layout, source: str, warnings: list[str]) -> np.ndarray:
    """Probability targets must be finite; PyTorch accepts any values, so others only warn.
    Row sums are taken in float64 in numpy's pairwise order (np.sum's bits, as a float64 copy's);
    a finite row sum proves every entry of its row finite. Returns the row sums (the kernel's Q
    for plain probability targets)."""
    scan = compiled.row_scan(probs)
    sums, lows = scan[:2] if scan is not None else _probs_blocks(probs, layout, source)
    assert sums is not None
    for r in np.flatnonzero(~np.isfinite(sums)):  # a float64 sum can also overflow
        _first_non_finite(np.asarray(probs[r:r + 1], dtype=np.float64), int(r), layout, source)
    if lows.size and lows.min() < 0:
        warnings.append(f"{source}: negative target probabilities (PyTorch accepts them)")
    if off_simplex := int(np.count_nonzero(np.abs(sums - 1.0) > 1e-6)):
        warnings.append(f"{source}: {off_simplex} target rows do not sum to 1 (PyTorch accepts them)")
    return sums


def _probs_blocks(probs: np.ndarray, layout: Layout, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The row sums of `probs` (`compiled.row_scan`'s bits) and row minima (at most 0) through
    numpy, in blocks that stay in cache; a non-finite entry raises at its block."""
    # a strided view keeps the large blocks, whose float64 sums are the reference order
    elements = (1 << 17) if probs.flags.c_contiguous else (1 << 22)
    step = max(1, elements // max(1, layout.n_classes))
    sums, lows = np.empty(layout.n_rows), np.empty(layout.n_rows)
    for start in range(0, layout.n_rows, step):
        block = np.asarray(probs[start:start + step], dtype=np.float64)
        with np.errstate(over="ignore"):  # an overflowing sum is looked at below, not warned of
            sums[start:start + step] = block.sum(axis=1)
        if not np.isfinite(sums[start:start + step]).all():
            _first_non_finite(block, start, layout, source)
        lows[start:start + step] = block.min(axis=1, initial=0.0)
    return sums, lows


def _first_non_finite(block: np.ndarray, start: int, layout: Layout, source: str) -> None:
    """Raise at the first non-finite target of rows [start, start + len(block)), if any (a
    float64 row sum can also overflow with every entry finite)."""
    finite = np.isfinite(block)
    if not finite.all():
        r, c = (int(v) for v in np.argwhere(~finite)[0])
        raise CeCheckError(
            f"{source}: shape {layout.shape}: non-finite target {block[r, c]} at index "
            f"{layout.original_index(start + r, c)}"
        )
