"""Row shards (data-parallel ranks), split along axis 0.

- pass 1: each shard's denominator D_i (its non-ignored targets) -> D = sum D_i, the global
  denominator of 'mean'.
- pass 2: each shard checked on its own with the global denominator; the training-code options
  act row by row (`shift_labels` within the shard's sequences).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.checks import shift_labels
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.pipeline import Inputs
from ce_cli.verify.results import Report
from ce_cli.verify.shards.inputs import (NO_INPUTS, BatchInputs, shard_arrays, shard_labels,
                                         target_weights)
from ce_cli.verify.shards.plan import Shard
from ce_cli.verify.shards.share import ShardInputs, ShardShare, verified


def shard_denominator(shard: Shard, options: CheckOptions,
                      inputs: BatchInputs = NO_INPUTS) -> float:
    """D_i: the shard's non-ignored index targets (after `shift_labels`; its rows, for
    probability targets), each counted w_y s_n with class weights w and sample weights s."""
    y = np.asarray(shard_labels(shard))
    arrays = shard_arrays(shard, inputs)
    sw = arrays.get("sample_weight")
    s = None if sw is None else np.asarray(sw, dtype=np.float64).reshape(-1)
    if y.shape == shard.shape:
        return float(math.prod(shard.shape[:-1])) if s is None else math.fsum(s.tolist())
    if options.shift_labels:  # within the shard's sequences, as its check shifts them
        y = shift_labels(shard.shape, y, options.ignore_index, f"labels file '{shard.files.labels}'")
    y = y.reshape(-1)
    valid = y != options.ignore_index
    if s is None and "weight" not in arrays:
        return float(np.count_nonzero(valid))
    per = target_weights(y, valid, arrays.get("weight"), f"labels file '{shard.files.labels}'")
    if s is not None and s.shape == per.shape:  # else the shard's check names the bad shape
        per = per * s
    return math.fsum(per[valid].tolist())


def check_rows(z: np.ndarray, y: np.ndarray, grad: np.ndarray | None, denominator: float,
               options: CheckOptions, given: ShardInputs) -> tuple[Report, ShardShare]:
    """check_grad on a row shard whose 'mean' divides by the whole batch's denominator D; the
    training-code options act row by row (`shift_labels` within the shard's sequences)."""
    arrays, sources = given.arrays, given.sources
    if options.shift_labels:
        y = shift_labels(z, y, options.ignore_index, sources["labels"])
    sem = options.semantics(arrays.get("sample_weight"))
    problem, warnings = build_softmax_ce(
        z, y, weight=arrays.get("weight"), reduction=options.reduction.value,
        ignore_index=options.ignore_index, label_smoothing=options.label_smoothing,
        class_axis=options.class_axis, source=sources["logits"], labels_source=sources["labels"],
        weight_source=sources["weight"], semantics=sem,
        sample_weight_source=sources.get("sample_weight", "sample_weight"))
    if options.reduction.value == "mean":
        problem = replace(problem, denominator=denominator)
        warnings = [w for w in warnings if not w.startswith(LOCAL_WARNINGS)]
    if problem.n_classes == 2:
        warnings.append("note: two classes: softmax CE over [z0, z1] equals sigmoid BCE on "
                        "z1 - z0; binary `two_class` checks the correspondence")
    echo = {"ignore_index": options.ignore_index, "label_smoothing": options.label_smoothing,
            "class_axis": options.class_axis, "class_axis_resolved": problem.layout.class_axis,
            "weighted": "weight" in arrays, **problem.sem.to_echo(),
            **({"shift_labels": True} if options.shift_labels else {})}
    src = {**{r: r for r in ("logits", "labels", "grad", "loss")}, **sources}
    inputs = Inputs(z, y, grad, arrays.get("loss"), src, arrays.get("lse"),
                    arrays.get("z_loss_value"))
    return verified(problem, warnings, inputs, options,
                     given.run("multiclass", echo, problem, options))


LOCAL_WARNINGS = ("every target is ignored", "the non-ignored targets' weights sum to 0")
