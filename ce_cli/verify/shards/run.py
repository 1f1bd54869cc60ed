"""The sharded check of `grad` and `binary` (`run_shards`): a row-split (data-parallel ranks) or
vocabulary-split (tensor-parallel ranks) batch checked shard by shard, never concatenated, and
the per-shard reports merged into one.

The run has three steps, each a map over the shards (`Mapper`: a plain loop here, Dask tasks in
`ce_cli.distributed`):

- describe: each shard's logits shape; the plan gives every shard its offset along the split
  axis (axis 0 for rows, the class axis for the vocabulary), in the order the files are given.
- pass 1: rows: each shard's denominator D_i (its non-ignored targets) -> D = sum D_i, the
  global denominator of 'mean'. Vocabulary: each shard's per-row max m_i and s1_i, the sum of
  exp(z - m_i) over its entries but its arg-max, in float64; merged as the kernel merges
  chunks: m = max m_i, s1 = s1_* + sum_{j != *} (1 + s1_j) exp(m_j - m) (* the shard holding
  m), lse = m + log1p(s1).
- pass 2: each shard checked on its own: row shards with the global denominator, vocabulary
  shards with `vocab_offset` and the global lse.

Sigmoid BCE (`kind="binary"`) needs no pass 1 (ce_cli/verify/shards/binary.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from ce_cli.enums import FDMode
from ce_cli.errors import CeCheckError
from ce_cli.verify.checks import refuse_softmax_only
from ce_cli.verify.finite_diff import choose_mode
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.results import CheckResult, InputInfo, Report
from ce_cli.verify.shards.binary import BinaryBatch, binary_weighted_count, check_binary_shard
from ce_cli.verify.shards.files import describe, load
from ce_cli.verify.shards.inputs import (NO_INPUTS, BatchInputs, file_name, refuse_inputs,
                                         shard_arrays, shard_labels)
from ce_cli.verify.shards.merge import merge_reports, merge_results, merged_loss
from ce_cli.verify.shards.plan import (LocalMapper, Mapper, Shard, ShardedReport, ShardFiles,
                                       ShardPlan, make_plan)
from ce_cli.verify.shards.rows import check_rows, shard_denominator
from ce_cli.verify.shards.share import ShardInputs, ShardShare, share_tols
from ce_cli.verify.shards.vocab import (check_vocab, merge_row_split, reduced_lse, shard_row_stats,
                                        vocab_lse_check, vocab_loss_check, vocab_loss_rows,
                                        vocab_z_loss_check, whole_loss)


def check_shard(shard: Shard, options: CheckOptions, shared: Any,
                inputs: BatchInputs = NO_INPUTS) -> Report:
    """Pass 2 on one shard (`shard_pass`), its report alone."""
    return shard_pass(shard, options, shared, inputs)[0]


def shard_pass(shard: Shard, options: CheckOptions, shared: Any,
               inputs: BatchInputs = NO_INPUTS) -> tuple[Report, ShardShare]:
    """Pass 2 on one shard: rows with the global denominator `shared`, vocabulary with the
    global lse `shared`, binary with `shared` a `BinaryBatch`; with its share of the batch's
    reduced loss and z-loss checks."""
    z = load(shard.files.logits, "logits")
    y = load(shard.files.labels, "labels") if shard.axis == "vocab" else shard_labels(shard)
    g = load(shard.files.grad, "grad") if shard.files.grad is not None else None
    arrays = shard_arrays(shard, inputs)
    sources = {"logits": f"logits file '{shard.files.logits}'",
               "labels": f"labels file '{shard.files.labels}'",
               "grad": f"grad file '{shard.files.grad}'",
               **{role: f"{role} file '{file_name(files, shard)}'" for role, files in inputs.arrays},
               "weight": f"weight file '{inputs.weight}'"}
    opts = replace(options, seed=options.seed + shard.index)  # shards sample their own entries
    given = ShardInputs(arrays, sources, share_tols(inputs, options))
    with np.errstate(all="ignore"):
        if shard.kind == "binary":
            return check_binary_shard(shard, z, y, g, shared, opts, given)
        if shard.axis == "rows":
            return check_rows(z, y, g, float(shared), opts, given)
        return check_vocab(shard, z, y, g, shared, opts, given), ShardShare()


# settings a shard check cannot take: `vocab_offset` (a shard's own offset comes from the plan),
# and `vocab_size` (its V too), `two_class` (a (..., 2) softmax batch), `kl_loss` (the merged
# loss is the cross-entropy); refused, never ignored
UNSHARDED = ("vocab_offset", "vocab_size", "two_class", "kl_loss")


def refuse_unsharded(options: CheckOptions, class_axis: int, what: str = "`shards`") -> None:
    """The classes on the last axis (`class_axis` -1 or its index), and no UNSHARDED setting."""
    if options.class_axis not in (-1, class_axis):
        raise CeCheckError("`class_axis`: shards need the classes on the last axis")
    plain = CheckOptions()
    for name in UNSHARDED:
        if getattr(options, name) != getattr(plain, name):
            raise CeCheckError(f"`{name}`: not supported with {what}")


def resolve_options(plan: ShardPlan, options: CheckOptions, elementwise: bool = False) -> CheckOptions:
    """Settings every shard shares: the finite-difference mode chosen for the WHOLE batch
    (`elementwise`: a loss of per-element terms, binary)."""
    refuse_unsharded(options, len(plan.shape) - 1)
    # the training-code options act row by row (softmax) or element by element (binary): row
    # shards (binary: and column shards) carry them; vocabulary shards too: pass 1 merges the
    # lse of z = T(x), a shard's gradient is then local, the loss counts each row's
    # s (Q lse + zeta lse^2) once, and every shard holds every position of a sequence
    if options.shift_labels and plan.axis == "rows" and len(plan.shape) < 3:
        raise CeCheckError("`shift_labels`: row shards need (B, T, V) logits, each shard "
                           "whole sequences (2-D shards could cut a sequence between two)")
    n_rows = math.prod(plan.shape[:-1])
    return replace(options, fd=FDMode(choose_mode(options.fd.value, n_rows, plan.shape[-1],
                                                  elementwise)))


def run_shards(files: Sequence[ShardFiles], axis: str | None, options: CheckOptions,
               mapper: Mapper | None = None,
               progress: Callable[[int, int], None] | None = None,
               kind: str = "softmax", pos_weight: float | str | None = None,
               inputs: BatchInputs = NO_INPUTS) -> ShardedReport:
    """Describe, pass 1, pass 2 and merge (module docstring), each step through `mapper`.
    `kind`: softmax (`grad`) or binary (sigmoid BCE, with `pos_weight`: a number, or the file
    or URL of K values). `inputs`: class weights, your loss, the batch-shaped inputs."""
    mapper = mapper or LocalMapper()
    shapes = mapper.map(describe, [f.logits for f in files], ("logits",))
    label_files = list(dict.fromkeys(f.labels for f in files))
    label_shapes = mapper.map(describe, label_files, ("labels",))
    plan = make_plan(files, shapes, label_shapes, axis, kind)
    opts = resolve_options(plan, options, elementwise=kind == "binary")
    refuse_inputs(plan, inputs, opts, kind)
    if kind == "binary":
        refuse_softmax_only(opts)
        batch = replace(BinaryBatch.of(plan.shape, pos_weight),
                        weighted_count=binary_weighted_count(plan, inputs, opts, mapper))
        results = mapper.map(shard_pass, plan.shards, (opts, batch, inputs), progress)
        return merge_results(plan, results, opts, inputs)
    denominator = None
    if plan.axis == "rows":
        denominator = float(math.fsum(mapper.map(shard_denominator, plan.shards, (opts, inputs))))
        shared: Any = denominator
    else:
        stats = partial(shard_row_stats, scale=opts.logit_scale, cap=opts.softcap)
        shared = mapper.reduce(stats, plan.shards, merge_row_split)
    if plan.axis == "vocab":
        return _run_vocab(plan, opts, inputs, mapper, shared, progress)
    results = mapper.map(shard_pass, plan.shards, (opts, shared, inputs), progress)
    return merge_results(plan, results, opts, inputs, denominator)


def _run_vocab(plan: ShardPlan, options: CheckOptions, inputs: BatchInputs, mapper: Mapper,
               lse: Any, progress: Callable[[int, int], None] | None) -> ShardedReport:
    """Pass 2 on vocabulary shards (your loss and lse kept for the client: a shard holds part of
    each row's), the lse the shards' losses repeat, and your loss and lse against the batch's
    rows."""
    loss_given = inputs.loss is not None or bool(inputs.files("loss"))
    own = replace(inputs, loss=None, z_loss=None, arrays=tuple(
        (r, f) for r, f in inputs.arrays if r not in ("loss", "lse", "z_loss_value")))
    results = mapper.map(shard_pass, plan.shards, (options, lse, own), progress)
    once = mapper.map(reduced_lse, plan.shards[:1], (lse, options, own))[0]
    repeated = (len(plan.shards) - 1) * once
    reports = [whole_loss(r) for r, _ in results]
    checks: dict[str, CheckResult] = {}
    if loss_given:
        rows = mapper.map(vocab_loss_rows, plan.shards, (lse, options, own))
        total = merged_loss(reports, options, None, repeated)
        checks["loss_vs_reference"] = vocab_loss_check(plan, rows, inputs, options, total)
    for path in inputs.files("lse"):  # one file of the batch's
        checks["lse_vs_reference"] = mapper.map(vocab_lse_check, plan.shards[:1],
                                                (lse, options, plan.shape, path))[0]
    if inputs.z_loss is not None or inputs.files("z_loss_value"):
        checks["z_loss_vs_reference"] = mapper.map(vocab_z_loss_check, plan.shards[:1],
                                                   (lse, options, plan.shape, inputs))[0]
    infos: tuple[InputInfo, ...] = ((InputInfo("loss", inputs.loss_source, (), inputs.loss_dtype),)
                                    if inputs.loss is not None else ())
    for path in inputs.files("loss"):  # per sample: one file of the batch's
        arr = load(path, "loss")
        infos += (InputInfo("loss", f"loss file '{path}'", tuple(arr.shape), str(arr.dtype)),)
    return merge_reports(plan, reports, options, None, repeated, checks, infos)
