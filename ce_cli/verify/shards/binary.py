"""Sigmoid BCE shards (`kind="binary"`): no pass 1, every entry is independent, 'mean' divides by
the batch's entry count (known from the shapes), and shards split rows (axis 0) or columns
(`cols`, the last axis; 1-D logits are one row, so their shards are always columns). The
two-class bridge covers the batch's first 2^14 elements, as in one process: each shard checks
its part of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.numerics import loss_sum
from ce_cli.models.sigmoid import SigmoidBCE, build_sigmoid_bce
from ce_cli.verify.bridge import BRIDGE_ELEMENTS, WITHOUT_OPTIONS, two_class_bridge
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.pipeline import Inputs
from ce_cli.verify.results import Report
from ce_cli.verify.shards.files import is_array, load
from ce_cli.verify.shards.inputs import BatchInputs, shard_part
from ce_cli.verify.shards.plan import Mapper, Shard, ShardPlan
from ce_cli.verify.shards.share import ShardInputs, ShardShare, verified


def binary_count(shard: Shard, inputs: BatchInputs) -> float:
    """The shard's part of 'mean''s D with sample weights: their sum over its elements."""
    sw = np.asarray(shard_part(shard, inputs.files("sample_weight"), "sample_weight"),
                    dtype=np.float64).reshape(-1)
    width = 1 if len(shard.shape) == 1 else shard.shape[-1]
    return loss_sum(sw) * width


@dataclass(frozen=True)
class GlobalMeanBCE(SigmoidBCE):
    """A binary shard whose 'mean' divides by the whole batch's entry count."""

    batch_entries: float = 1.0

    @property
    def denominator(self) -> float:
        return self.batch_entries


def bridge_rows(shard: Shard, limit: int) -> int:
    """The shard's rows among the batch's first `limit` rows (the two-class bridge's part):
    column shards have all `limit`, row shards those past their offset."""
    if shard.axis != "rows":
        return limit
    per = math.prod(shard.shape[1:-1])  # rows of the (N, K) matrix per row of axis 0
    return max(0, min(limit - shard.offset * per, shard.size * per))


@dataclass(frozen=True)
class BinaryBatch:
    """What every binary shard needs of the whole batch: its entry count (the 'mean'), the
    rows of the two-class bridge (the batch's first 2^14 elements) and its note, its width,
    and `pos_weight` (a number, or the file or URL of the batch's K values)."""

    entries: float
    bridge_rows: int
    bridge_note: str
    n_cols: int
    pos_weight: float | str | None = None
    weighted_count: float | None = None  # 'mean''s D with sample weights: their sum

    @classmethod
    def of(cls, shape: tuple[int, ...], pos_weight: float | str | None = None) -> BinaryBatch:
        n_rows, n_cols = math.prod(shape[:-1]), shape[-1]
        rows = max(1, min(n_rows, BRIDGE_ELEMENTS // n_cols))
        note = ("identity checked without weight/pos_weight" if pos_weight is not None else
                f"{rows * n_cols} elements: CE([0, z]) = BCE(z), d/dz1 = s(z) - y = -d/dz0")
        return cls(float(math.prod(shape)), rows, note, n_cols, pos_weight)


def shard_pos_weight(shard: Shard, batch: BinaryBatch) -> tuple[Any, str]:
    """The pos_weight of the shard's columns (all K for row shards) and how to name it."""
    if batch.pos_weight is None or isinstance(batch.pos_weight, float):
        return batch.pos_weight, f"--pos-weight {batch.pos_weight}"
    source = f"pos_weight file '{batch.pos_weight}'"
    pw = load(batch.pos_weight, "pos_weight")
    # a row, or a CSV column, is K values; an array file's (K, 1) broadcasts along axis -2 (as
    # in one process), which shards do not take
    column = pw.ndim == 2 and pw.shape[1] == 1 and is_array(batch.pos_weight)
    pw = pw.reshape(-1) if pw.ndim == 2 and 1 in pw.shape and not column else pw
    if pw.ndim > 1 or pw.size not in (1, batch.n_cols):
        raise CeCheckError(f"{source}: shape {pw.shape}; pos_weight broadcasts along the last "
                           f"axis of the batch: expected ({batch.n_cols},) or a scalar")
    if shard.axis == "cols" and pw.size > 1:
        pw = pw[shard.offset:shard.offset + shard.size]
    return pw, source


def _batch_mean(problem: SigmoidBCE, entries: float) -> GlobalMeanBCE:
    fields = {f: getattr(problem, f) for f in problem.__dataclass_fields__
              if f not in ("kernel", "batch_entries")}
    return GlobalMeanBCE(**fields, batch_entries=entries)


def check_binary_shard(shard: Shard, z: np.ndarray, y: np.ndarray, grad: np.ndarray | None,
                       batch: BinaryBatch, options: CheckOptions,
                       given: ShardInputs) -> tuple[Report, ShardShare]:
    """check_binary on a shard: 'mean' over the batch's entries (or its sample weights' sum),
    the training-code options element by element, the bridge on its part of the batch's first
    2^14 elements (without weights or the options, as check_binary does)."""
    arrays, sources = given.arrays, given.sources
    pw, pw_source = shard_pos_weight(shard, batch)
    reduction = options.reduction.value
    problem, warnings = build_sigmoid_bce(  # 'mean' is the batch's: a shard's weights may sum to 0
        z, y, weight=arrays.get("weight"), pos_weight=pw,
        reduction="sum" if reduction == "mean" else reduction, source=sources["logits"],
        labels_source=sources["labels"], weight_source=sources["weight"],
        pos_weight_source=pw_source, label_smoothing=options.label_smoothing,
        softcap=options.softcap, logit_scale=options.logit_scale,
        denominator=options.denominator, sample_weight=arrays.get("sample_weight"),
        sample_weight_source=sources.get("sample_weight", "sample_weight"))
    problem = _batch_mean(replace(problem, reduction=reduction),
                          batch.weighted_count if batch.weighted_count is not None else batch.entries)
    weighted = pw is not None or "weight" in arrays
    plain = problem if not weighted and problem.plain else problem.without_options()
    if batch.weighted_count is not None:  # the bridge: plain BCE, the mean over every element
        plain = _batch_mean(plain, batch.entries)
    rows = bridge_rows(shard, batch.bridge_rows)
    part = replace(plain, z=plain.z[:rows], targets=plain.targets[:rows])
    note = (("identity checked without weight/pos_weight" if weighted else batch.bridge_note)
            if problem.plain else WITHOUT_OPTIONS)
    bridge = (two_class_bridge(part, options.worst, note),) if rows else ()
    src = {**{r: r for r in ("logits", "labels", "grad", "loss")}, **sources}
    echo = {"weighted": "weight" in arrays, "pos_weighted": pw is not None,
            **problem.sem.to_echo(),
            **({"label_smoothing": problem.smoothing} if problem.smoothing else {})}
    inputs = Inputs(z, y, grad, arrays.get("loss"), src)
    return verified(problem, warnings, inputs, options,
                     given.run("binary", echo, problem, options, bridge))


def binary_weighted_count(plan: ShardPlan, inputs: BatchInputs, options: CheckOptions,
                  mapper: Mapper) -> float | None:
    """'mean''s D with sample weights: their sum over the batch's elements (None without)."""
    if not inputs.files("sample_weight"):
        return None
    count = math.fsum(mapper.map(binary_count, plan.shards, (inputs,)))
    if options.reduction.value == "mean" and options.denominator is None and count == 0:
        raise CeCheckError(f"sample_weight file '{inputs.files('sample_weight')[0]}': the sample "
                           "weights sum to 0: 'mean' is 0/0; give `denominator` or reduction sum")
    return count
