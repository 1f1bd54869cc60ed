"""Vocabulary shards (tensor-parallel ranks), split along the class axis.

- pass 1: each shard's per-row max m_i and s1_i, the sum of exp(z - m_i) over its entries but
  its arg-max, in float64, of z = T(x) (softcap, logit scale); merged as the kernel merges
  chunks: m = max m_i, s1 = s1_* + sum_{j != *} (1 + s1_j) exp(m_j - m) (* the shard holding
  m), lse = m + log1p(s1).
- pass 2: each shard checked on its own with `vocab_offset`, the global lse and V: its
  gradient (Q + 2 zeta lse) a_c - q_c on its columns is then local (q_c = alpha w_y [c = y] +
  beta w_c, label smoothing over the V classes; Q = alpha w_y + beta sum_c w_c).
- your loss: a shard holds part of each row's, so it is compared by the client against the
  batch's rows (`batch_rows`); every shard's loss repeats the normaliser's part
  s_n (Q_n lse_n + zeta lse_n^2) (`reduced_lse`), which the merged loss counts once.
- your lse and z-loss: a vocabulary-sharded kernel's per-row lse is the GLOBAL logsumexp
  (after its all-reduce), compared once with pass 1's (`vocab_lse_check`), and so is the
  z-loss zeta lse^2 (`vocab_z_loss_check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.base import ChunkEval
from ce_cli.kernels.numpy_softmax import transform
from ce_cli.models.layout import Layout, make_layout, match_batch
from ce_cli.models.semantics import (ROW_CHUNK, Semantics, SplitLse, mean_of_nothing,
                                    transformed_row_stats)
from ce_cli.models.softmax import smoothing_split
from ce_cli.verify.allowance import normaliser_bound
from ce_cli.verify.checks import OUTSIDE_LABELS, check_grad, shift_labels
from ce_cli.verify.compare import Comparison
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, Report
from ce_cli.verify.shards.files import load
from ce_cli.verify.shards.inputs import NO_INPUTS, BatchInputs, shard_arrays, target_weights
from ce_cli.verify.shards.plan import Shard, ShardPlan
from ce_cli.verify.shards.share import ShardInputs
from ce_cli.verify.tolerance import SIXTEEN_BIT, loss_rule, reduction_floor
from ce_cli.verify.stages import (Chunk, ZLossStage, lse_check, reduced_check,
                                  softmax_unit16, with_normaliser)


def shard_row_stats(shard: Shard, scale: float = 1.0,
                    cap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the shard: m, the max logit, and s1, the sum of exp(z - m) over every entry
    but one arg-max, in float64 (m = -inf and s1 = 0 for an all -inf row); z = T(x), the
    logits the loss sees (`logit_scale` and `softcap`: cap tanh(scale x / cap))."""
    z = load(shard.files.logits, "logits")
    return transformed_row_stats(z.reshape(-1, z.shape[-1]), scale, cap)


def merge_row_stats(stats: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The global per-row lse from the shards' (m_i, s1_i) (`merge_row_split`)."""
    return merge_row_split(stats).lse


def merge_row_split(stats: list[tuple[np.ndarray, np.ndarray]]) -> SplitLse:
    """The global per-row lse from the shards' (m_i, s1_i), merged as the kernel merges chunks
    and kept apart (pass 2 needs lse - m_i to eps of itself): m = max m_i,
    s1 = s1_* + sum_{j != *} (1 + s1_j) exp(m_j - m), lse = m + log1p(s1)."""
    ms = np.stack([m for m, _ in stats])
    s1s = np.stack([s for _, s in stats])
    m = ms.max(axis=0)
    star = ms.argmax(axis=0)  # the first shard holding the row's max
    safe = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = (1.0 + s1s) * np.exp(ms - safe)
    scaled = np.where(np.isneginf(ms), 0.0, scaled)
    rows = np.arange(ms.shape[1])
    scaled[star, rows] = s1s[star, rows]
    return SplitLse(m, scaled.sum(axis=0))


def global_lse(lse: Any) -> np.ndarray:
    """Pass 1's per-row lse as (N,) float64 (from a `SplitLse`, or as given)."""
    return np.asarray(lse.lse if isinstance(lse, SplitLse) else lse, dtype=np.float64).reshape(-1)


def check_vocab(shard: Shard, z: np.ndarray, y: np.ndarray, grad: np.ndarray | None,
                lse: Any, options: CheckOptions, given: ShardInputs) -> Report:
    """check_grad with `vocab_offset`, the global lse and V (`vocab_size`), the whole
    vocabulary's class weights and the batch's sample weights (a shard holds every row)."""
    split = isinstance(lse, SplitLse)  # pass 1's, kept apart; or an lse as given
    opts = replace(options, vocab_offset=shard.offset, vocab_size=shard.extent)
    return check_grad(z, y, grad=grad, options=opts, sources=given.sources,
                      lse=lse if split else np.asarray(lse).reshape(z.shape[:-1]),
                      weight=given.arrays.get("weight"),
                      sample_weight=given.arrays.get("sample_weight"))


def whole_loss(report: Report) -> Report:
    """A shard's report without its note that rows whose label lies in another shard miss
    -z_y: the merged loss has every row's."""
    return replace(report, warnings=tuple(w for w in report.warnings
                                          if OUTSIDE_LABELS not in w))


def vocab_labels(shard: Shard, options: CheckOptions) -> np.ndarray:
    """The batch's labels (global class ids) as the loss sees them (`shifted`)."""
    return shifted(load(shard.files.labels, "labels"), shard, options)


def shifted(y: np.ndarray, shard: Shard, options: CheckOptions) -> np.ndarray:
    """`y` shifted along the sequence with `shift_labels` (every vocabulary shard holds every
    position, so the shift is the batch's), else `y`."""
    if not options.shift_labels:
        return y
    return shift_labels(np.broadcast_to(False, shard.shape), y, options.ignore_index,
                        f"labels file '{shard.files.labels}'")


def row_weights(y: np.ndarray, arrays: dict[str, np.ndarray], options: CheckOptions,
                source: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sample weight s_n and label weight w_{y_n} (1 without either; both 0 where
    the target is ignored), flat."""
    flat = np.asarray(y).reshape(-1)
    valid = flat != options.ignore_index
    wy = target_weights(flat, valid, arrays.get("weight"), source)
    sw = arrays.get("sample_weight")
    if sw is None:
        return valid.astype(np.float64), wy
    s = np.asarray(sw, dtype=np.float64).reshape(-1)
    if s.shape != wy.shape:
        raise CeCheckError(f"sample_weight: shape {np.shape(sw)} does not match the labels "
                           f"{np.shape(y)}")
    return np.where(valid, s, 0.0), wy


@dataclass(frozen=True, eq=False)
class VocabRows:
    """A vocabulary shard's per-row share of the rows' losses: z_y where the label is one of its
    columns (0 elsewhere), its largest finite |z|, with label smoothing the sum over its
    columns of w_c (lse_n - z_c) (terms >= 0 unweighted: nothing cancels); shard 0 adds the
    global lse, each row's sample and label weights s_n, w_y (`row_weights`), the rows whose
    target is not ignored, the class weights' sum and absolute sum (`class_sums`) and whether
    sample weights were given."""

    z_y: np.ndarray
    zabs: np.ndarray
    spread: np.ndarray | None = None
    lse: np.ndarray | None = None
    weight: np.ndarray | None = None
    label_weight: np.ndarray | None = None
    valid: np.ndarray | None = None
    class_sums: tuple[float, float] = (0.0, 0.0)
    sample_weighted: bool = False


def vocab_loss_rows(shard: Shard, lse: Any, options: CheckOptions,
                    inputs: BatchInputs = NO_INPUTS) -> VocabRows:
    """The shard's `VocabRows` (a pass over its logits, in row blocks), of z = T(x)."""
    z = load(shard.files.logits, "logits")
    z = z.reshape(-1, z.shape[-1])
    y = vocab_labels(shard, options).reshape(-1)
    valid = y != options.ignore_index
    inside = valid & (y >= shard.offset) & (y < shard.offset + z.shape[1])
    z_y, zabs = np.zeros(len(y)), np.empty(len(y))
    rows = np.flatnonzero(inside)
    z_y[rows] = _transformed(z[rows, y[rows] - shard.offset], options)
    lse = global_lse(lse)
    arrays = shard_arrays(shard, inputs)
    w = arrays.get("weight")
    w_c = None if w is None else np.asarray(w, dtype=np.float64).reshape(-1)[
        shard.offset:shard.offset + z.shape[1]]
    spread = np.zeros(len(y)) if options.label_smoothing else None
    step = max(1, ROW_CHUNK // max(1, z.shape[1]))
    for a in range(0, len(y), step):
        block = _transformed(z[a:a + step], options)
        if spread is not None:
            terms = lse[a:a + step, None] - block
            spread[a:a + step] = (terms if w_c is None else terms * w_c).sum(axis=1)
        block = np.abs(block)
        zabs[a:a + step] = np.where(np.isfinite(block), block, 0.0).max(axis=1)
    if shard.index:
        return VocabRows(z_y, zabs, spread)
    s, wy = row_weights(y, arrays, options, f"labels file '{shard.files.labels}'")
    return VocabRows(z_y, zabs, spread, lse, s, wy, valid, class_sums(arrays, shard.extent),
                     "sample_weight" in arrays)


def class_sums(arrays: dict[str, np.ndarray], V: int) -> tuple[float, float]:
    """sum_c w_c and sum_c |w_c| over the whole vocabulary (V, V unweighted)."""
    if "weight" not in arrays:
        return float(V), float(V)
    w = np.asarray(arrays["weight"], dtype=np.float64).reshape(-1)
    return float(np.sum(w)), float(np.sum(np.abs(w)))


def reduced_scale(wy: np.ndarray, s: np.ndarray, valid: np.ndarray,
                  options: CheckOptions) -> float:
    """What the reduced loss is divided by: `denominator`, 'mean''s D = sum of w_y s_n over
    the rows whose target is not ignored, in the order the shard's check sums it (so that the
    shards' and the client's D are the same bits), or 1."""
    if options.denominator is not None:
        return options.denominator
    if options.reduction.value != "mean":
        return 1.0
    return float(np.sum(wy[valid] * s[valid]))


def _transformed(x: Any, options: CheckOptions) -> np.ndarray:
    """z = T(x) in float64 (`logit_scale`, `softcap`)."""
    with np.errstate(invalid="ignore"):
        return transform(np.asarray(x, dtype=np.float64), options.logit_scale, options.softcap)[0]


def extended(options: CheckOptions, sample_weighted: bool) -> bool:
    """Whether one process takes the extended loss floor (semantics.loss_floor) on the batch."""
    return bool(sample_weighted or options.z_loss or options.softcap is not None
                or options.logit_scale != 1.0)


@dataclass(frozen=True, eq=False)
class BatchRows:
    """The batch's row losses L_n from the shards' `VocabRows`, with what the single process's
    floor needs: `floor` is its k eps factor's multiplier per row, `weight` what a normaliser
    factor multiplies (|s_n (Q_n + 2 zeta lse_n)|), `scale` the reduced loss's divisor."""

    loss: np.ndarray
    weight: np.ndarray
    floor: np.ndarray
    scale: float


def batch_rows(plan: ShardPlan, parts: list[VocabRows], options: CheckOptions) -> BatchRows:
    """L_n = s_n (alpha w_y (lse_n - z_y) + beta sum_c w_c (lse_n - z_c) + zeta lse_n^2) of
    z = T(x) (label smoothing's alpha, beta over the V classes; 1, 0 without); the floor
    |L_n| + Se_n (1 + |lse_n|), plus (Se_n + |s_n| sum_c |q_c|) max|z| where one process takes
    the extended floor (Se_n = |s_n (Q_n + 2 zeta lse_n)|, Q_n = alpha w_y + beta sum_c w_c)."""
    first = parts[0]
    assert first.lse is not None and first.weight is not None
    assert first.label_weight is not None and first.valid is not None
    z_y = np.sum(np.stack([p.z_y for p in parts]), axis=0)  # one shard holds each label
    zabs = np.max(np.stack([p.zabs for p in parts]), axis=0)
    s, wy, lse, zeta = first.weight, first.label_weight, first.lse, options.z_loss
    alpha, beta = smoothing_split(options.label_smoothing, plan.shape[-1], options.smoothing_form)
    W, W_abs = first.class_sums
    row = alpha * wy * (lse - z_y) + zeta * lse * lse
    if beta:  # Q lse - q . z = alpha w_y (lse - z_y) + beta sum_c w_c (lse - z_c)
        row = row + beta * np.sum(np.stack([p.spread for p in parts if p.spread is not None]),
                                  axis=0)
    loss = np.where(s != 0, s * row, 0.0)
    Se = np.abs(s) * np.abs(alpha * wy + beta * W + 2.0 * zeta * lse)
    floor = np.abs(loss) + Se * (1.0 + np.abs(lse))
    if extended(options, first.sample_weighted):
        floor = floor + (Se + np.abs(s) * (np.abs(alpha * wy) + abs(beta) * W_abs)) * zabs
    return BatchRows(loss, Se, floor, reduced_scale(wy, s, first.valid, options))


def vocab_loss_check(plan: ShardPlan, parts: list[VocabRows], inputs: BatchInputs,
                     options: CheckOptions, total: float) -> CheckResult:
    """Your loss against the batch's rows L_n (`batch_rows`), each allowed the single
    process's floor, k eps times `BatchRows.floor`; reduced: summed, scaled by 1/D, plus
    the reduction's (`reduction_floor`); widened by the normaliser bound when only that
    passes, as `LossStage`."""
    rows = batch_rows(plan, parts, options)
    n_classes = plan.shape[-1]
    got: Any
    if options.reduction.value == "none":
        got = _vocab_user_losses(plan, inputs)
        tol = options.tolerance(got.dtype)
    else:
        got, tol = inputs.loss, options.tolerance(inputs.loss_dtype)
    units = rows.floor
    if tol.precision in SIXTEEN_BIT:  # a 16-bit loss: that computation's model, as LossStage
        units = softmax_unit16(units, rows.loss, rows.weight, n_classes)
    tol = loss_rule(tol)
    floor = tol.floor_coef * units
    normaliser = normaliser_bound(tol, n_classes, options.normaliser_rtol)
    if options.reduction.value == "none":
        shape = plan.shape[:-1]

        def compare(k: float) -> CheckResult:
            cmp = Comparison("loss_vs_reference", tol,
                             lambda r, c: tuple(int(i) for i in np.unravel_index(r, shape)),
                             expected_label="reference", got_label="yours", n_worst=options.worst,
                             extra_atol=options.loss_atol, beyond_range=True)
            cmp.update(0, rows.loss, got, floor + k * rows.weight)
            return cmp.result()
    else:
        scale = 1.0 / rows.scale if rows.scale else 0.0
        n = max(1, len(rows.loss))

        def compare(k: float) -> CheckResult:
            bound = ((float(np.sum(floor)) + k * float(np.sum(rows.weight))) * scale
                     + reduction_floor(tol, n, total))
            return reduced_check("loss_vs_reference", tol, total, bound, got, options.loss_atol)
    return with_normaliser(compare, normaliser, tol, n_classes)


def _vocab_user_losses(plan: ShardPlan, inputs: BatchInputs) -> np.ndarray:
    """Your per-sample losses of the batch (one file), as (N,) rows."""
    path = inputs.files("loss")[0]
    source = f"loss file '{path}'"
    got = load(path, "loss")
    if got.dtype.kind not in "iuf":
        raise CeCheckError(f"{source}: dtype {got.dtype} is not numeric")
    if got.shape != plan.shape[:-1] and got.shape != (math.prod(plan.shape[:-1]),):
        raise CeCheckError(f"{source}: shape {got.shape}; reduction 'none' gives per-sample "
                           f"losses of the batch's shape {plan.shape[:-1]}")
    return got.reshape(-1)


def vocab_lse_check(shard: Shard, lse: Any, options: CheckOptions, shape: tuple[int, ...],
                    path: str) -> CheckResult:
    """Your per-row lse (one file of the batch's) against the global lse of pass 1, as
    `LseStage` compares it in one process: the rows whose target is not ignored, each allowed
    k eps (1 + |lse_n|) plus the normaliser bound of the batch's C classes."""
    source = f"lse file '{path}'"
    layout = make_layout(shape, -1, source)
    got = np.asarray(load(path, "lse"))
    if got.dtype.kind not in "iuf":
        raise CeCheckError(f"{source}: dtype {got.dtype} is not numeric")
    got = match_batch(got, layout, source, "the per-row log-sum-exp")
    tol = options.tolerance(got.dtype)
    valid = vocab_labels(shard, options).reshape(-1) != options.ignore_index
    return lse_check(global_lse(lse), got, valid, tol,
                     normaliser_bound(tol, shape[-1], options.normaliser_rtol),
                     lambda r, c: layout.batch_index(r), options.worst)


@dataclass(frozen=True, eq=False)
class LseRows:
    """The batch's rows as `ZLossStage` sees its problem: the V classes, the rows whose target
    is not ignored, the reduction and its divisor (`reduced_scale`), the z-loss coefficient."""

    layout: Layout
    valid: np.ndarray
    reduction: str
    scale: float
    sem: Semantics

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def n_classes(self) -> int:
        return self.layout.n_classes

    @property
    def grad_scale(self) -> float:
        return 1.0 / self.scale if self.scale else 0.0

    def per_sample_index(self, row: int, _col: int) -> tuple[int, ...]:
        return self.layout.batch_index(row)

    def reduce(self, total: float) -> float:
        if self.scale == 0.0 and self.reduction == "mean" and self.sem.denominator is None:
            return mean_of_nothing(self.sem.empty_mean)  # as the loss of one process
        return total / self.scale


def vocab_z_loss_check(shard: Shard, lse: Any, options: CheckOptions, shape: tuple[int, ...],
                       inputs: BatchInputs) -> CheckResult:
    """Your z-loss (a number, or with reduction none one file of the batch's per-row values)
    as one process's `ZLossStage` checks it, on pass 1's global lse: s_n zeta lse_n^2 over the
    rows whose target is not ignored, reduced like the loss, allowed its floor (the V
    classes' normaliser bound); the z-loss needs nothing of a shard but the lse."""
    y = vocab_labels(shard, options).reshape(-1)
    valid = y != options.ignore_index
    arrays = shard_arrays(shard, replace(inputs, arrays=tuple(
        (r, f) for r, f in inputs.arrays if r == "sample_weight")))
    s, wy = row_weights(y, arrays, options, f"labels file '{shard.files.labels}'")
    layout = make_layout(shape, -1, "logits")
    rows = LseRows(layout, valid, options.reduction.value, reduced_scale(wy, s, valid, options),
                   Semantics(z_loss=options.z_loss, denominator=options.denominator,
                             empty_mean=options.empty_mean))
    if options.reduction.value == "none":
        path = inputs.files("z_loss_value")[0]
        source = f"z_loss_value file '{path}'"
        got = np.asarray(load(path, "z_loss_value"))
        if got.dtype.kind not in "iuf":
            raise CeCheckError(f"{source}: dtype {got.dtype} is not numeric")
        value, dtype = match_batch(got, layout, source, "per-sample z-losses ('none')"), got.dtype
    else:
        value, dtype = np.asarray(inputs.z_loss), np.dtype(inputs.z_loss_dtype)
    g = global_lse(lse)
    stage = ZLossStage(rows, value, options.tolerance(dtype), options.worst, 0.0,
                       options.normaliser_rtol)
    stage.update(Chunk(0, len(g), ChunkEval(loss=np.zeros(len(g)), grad=None, floor=None, lse=g,
                                            total_weight=s, row_terms=s[:, None])))
    return stage.finish()[0][1]


def reduced_lse(shard: Shard, lse: Any, options: CheckOptions,
                inputs: BatchInputs = NO_INPUTS) -> float:
    """The reduced loss of the rows' normaliser terms alone (sum over the rows whose target is
    not ignored of s_n (Q_n lse_n + zeta lse_n^2), Q_n = alpha w_y + beta sum_c w_c, divided
    by `reduced_scale`): each vocabulary shard's loss holds it once."""
    y = vocab_labels(shard, options).reshape(-1)
    valid = y != options.ignore_index
    arrays = shard_arrays(shard, inputs)
    s, wy = row_weights(y, arrays, options, f"labels file '{shard.files.labels}'")
    alpha, beta = smoothing_split(options.label_smoothing, shard.extent, options.smoothing_form)
    L = global_lse(lse)[valid]
    Q = alpha * wy[valid] + beta * class_sums(arrays, shard.extent)[0]
    total = math.fsum((s[valid] * (Q * L + options.z_loss * L * L)).tolist())
    scale = reduced_scale(wy, s, valid, options)
    return total / scale if scale else 0.0
