"""The batch's inputs beside LOGITS, LABELS and --grad (`BatchInputs`), each shard's part of
them, and what shards refuse of them.

Class weights (every shard reads the C values; pass 1 sums w_y s_n; vocabulary shards weigh
each row by w_y), batch-shaped inputs (one file for the batch, each shard its rows, or one per
shard) and your loss: per sample, each shard compares its own; reduced, each shard sums its
rows' floors in its pass (`ShareStage`) and the client compares your value once with the
merged loss (`batch_checks`), as `LossStage` would on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.inputs import InputSpec, Origin
from ce_cli.models.softmax import class_weights
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.shards.files import expand, is_array, load
from ce_cli.verify.shards.plan import Shard, ShardPlan, one_or_per_shard


@dataclass(frozen=True)
class BatchInputs:
    """The batch's inputs beside LOGITS, LABELS and --grad, as files (or URLs) the shards read.

    `weight`: one file of class weights (C values; binary: element weights broadcast to the
    logits, cut along the split axis where they span it). `arrays`: (role, files) of the
    batch-shaped inputs, `sample_weight`, `lse`, `z_loss_value` and `loss` (per sample with
    reduction none), each one file for the batch (a shard takes its rows) or one per shard.
    `loss` and `z_loss`: your reduced loss and z-loss (numbers, compared once with the merged
    reference), their dtypes setting the tolerance."""

    weight: str | None = None
    arrays: tuple[tuple[str, tuple[str, ...]], ...] = ()
    loss: float | None = None
    loss_dtype: str = "float64"
    loss_source: str = "loss"
    z_loss: float | None = None
    z_loss_dtype: str = "float64"
    z_loss_source: str = "z_loss_value"

    def files(self, role: str) -> tuple[str, ...]:
        return dict(self.arrays).get(role, ())


NO_INPUTS = BatchInputs()


def shard_labels(shard: Shard) -> np.ndarray:
    """The shard's labels: its own file, or its part of the one file of the batch."""
    y = load(shard.files.labels, "labels")
    if shard.labels_range is not None:
        start, stop = shard.labels_range
        y = cut_part(y, 0 if shard.axis == "rows" else -1, start, stop,
                 f"labels file '{shard.files.labels}'")
    return y


def cut_part(arr: np.ndarray, along: int, start: int, stop: int, label: str) -> np.ndarray:
    """[start, stop) of `arr` along axis 0 (rows) or -1 (columns)."""
    what = "rows" if along == 0 else "columns"
    if arr.ndim == 0 or arr.shape[along] < stop:
        raise CeCheckError(f"{label}: shape {arr.shape} has fewer than the {stop} {what} of the "
                           "shards")
    return arr[start:stop] if along == 0 else arr[..., start:stop]


PER_ELEMENT = ("loss",)  # binary: one value an element, the logits' shape (cut along columns too)


def shard_part(shard: Shard, files: Sequence[str], role: str) -> np.ndarray:
    """The shard's part of a batch-shaped input: its own file (one per shard), or its part of
    the one file of the batch: its rows on row shards; on vocabulary and column shards, which
    hold every row, all of it (binary per-element roles and 1-D logits: its columns)."""
    if len(files) > 1:
        return load(files[shard.index], role)
    arr, label = load(files[0], role), f"{role} file '{files[0]}'"
    if shard.axis == "rows":
        return cut_part(arr, 0, shard.offset, shard.offset + shard.size, label)
    if shard.kind == "binary" and (role in PER_ELEMENT or len(shard.shape) == 1):
        return cut_part(arr, -1, shard.offset, shard.offset + shard.size, label)
    return arr


def shard_weight(shard: Shard, path: str) -> np.ndarray:
    """Class weights (softmax: C values, each shard all of them); binary element weights, cut
    along the split axis where they span it (a weight of size 1 there broadcasts)."""
    w = load(path, "weight")
    if shard.kind != "binary":  # a one-row or one-column table is its C values, as in one process
        table = w.ndim == 2 and 1 in w.shape and not is_array(path)
        return w.reshape(-1) if table else w
    along = 0 if shard.axis == "rows" else -1
    ndim = len(shard.shape)
    spans = w.ndim == ndim if along == 0 else w.ndim >= 1
    if spans and w.shape[along] != 1:
        return cut_part(w, along, shard.offset, shard.offset + shard.size, f"weight file '{path}'")
    return w


def file_name(files: Sequence[str], shard: Shard) -> str:
    """The file the shard reads of `files`: its own, or the one of the batch ("" for none)."""
    return files[shard.index] if len(files) > 1 else files[0] if files else ""


def shard_arrays(shard: Shard, inputs: BatchInputs) -> dict[str, np.ndarray]:
    """The shard's part of every input of `inputs` (weight, sample_weight, lse, z_loss_value,
    per-sample loss) by role."""
    out = {role: shard_part(shard, files, role) for role, files in inputs.arrays}
    if inputs.weight is not None:
        out["weight"] = shard_weight(shard, inputs.weight)
    return out


def target_weights(y: np.ndarray, valid: np.ndarray, weight: np.ndarray | None,
                    source: str) -> np.ndarray:
    """w_{y_n} for each row (0 where ignored; 1 without class weights)."""
    if weight is None:
        return valid.astype(np.float64)
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    bad = valid & ((y < 0) | (y >= w.size))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CeCheckError(f"{source}: label {int(y[i])} at row {i} is out of the class weights' "
                           f"range [0, {w.size}) and is not the ignore_index")
    return np.where(valid, w[np.where(valid, y, 0)], 0.0)


def batch_inputs(given: dict[str, str | None], reduction: str) -> tuple[BatchInputs, float]:
    """`BatchInputs` from the command line's texts, and the typed loss's tolerance (half a unit
    of its last digit): `weight` one file; `sample_weight` and `lse` one file or a quoted glob
    of one per shard; `loss` and `z_loss_value` a number or a file of one value, per sample
    with reduction none (then files like `sample_weight`)."""
    out, arrays, atol = BatchInputs(weight=given.get("weight")), [], 0.0
    for role in ("sample_weight", "lse", "loss", "z_loss_value"):
        text = given.get(role)
        if text is None:
            continue
        if role in ("sample_weight", "lse") or reduction == "none":
            arrays.append((role, tuple(expand(text, role))))
            continue
        spec = InputSpec.parse(text, role, strict=True)
        value = spec.load() if spec.origin is Origin.number else load(text, role)
        what = "loss" if role == "loss" else "z-loss"
        if value.dtype.kind not in "iuf":
            raise CeCheckError(f"{spec.source}: dtype {value.dtype} is not numeric")
        if value.size != 1:
            raise CeCheckError(f"{spec.source}: shape {value.shape}; reduction '{reduction}' "
                               f"gives a scalar {what} (use `reduction=none` for per-sample "
                               "values)")
        number = float(value.reshape(-1)[0])
        if role == "loss":
            out = replace(out, loss=number, loss_dtype=str(value.dtype), loss_source=spec.source)
            atol = spec.tolerance
        else:
            out = replace(out, z_loss=number, z_loss_dtype=str(value.dtype),
                          z_loss_source=spec.source)
    return replace(out, arrays=tuple(arrays)), atol


def refuse_inputs(plan: ShardPlan, inputs: BatchInputs, options: CheckOptions, kind: str) -> None:
    """What shards cannot take of `inputs`: one line each, never ignored."""
    n = len(plan.shards)
    for role, files in inputs.arrays:
        one_or_per_shard(f"`{role}`", len(files), n)
    _refuse_values(inputs, options, kind)
    if kind != "binary" and inputs.weight is not None:  # C values, read once here
        class_weights(shard_weight(plan.shards[0], inputs.weight), plan.shape[-1],
                      f"weight file '{inputs.weight}'", [])
    if plan.axis == "vocab":
        _refuse_on_vocab(inputs)


def _refuse_values(inputs: BatchInputs, options: CheckOptions, kind: str) -> None:
    """Your loss and z-loss as the settings need them: numbers only when reduced, a z-loss
    (and an lse) only for softmax with `z_loss`."""
    if options.reduction.value == "none" and (inputs.loss is not None or inputs.z_loss is not None):
        raise CeCheckError("`loss`: reduction none compares per-sample values: give them as files "
                           "(one for the batch or one per shard), not a number")
    z_value = inputs.z_loss is not None or bool(inputs.files("z_loss_value"))
    if kind == "binary" and (z_value or inputs.files("lse")):
        raise CeCheckError(f"`{'lse' if inputs.files('lse') else 'z_loss_value'}`: applies to "
                           "softmax cross-entropy (check_grad), not sigmoid BCE")
    if z_value and not options.z_loss:
        raise CeCheckError("`z_loss_value`: needs `z_loss`, the coefficient it was computed with")


def _refuse_on_vocab(inputs: BatchInputs) -> None:
    """Per-row values on vocabulary shards: one file of the batch's (a shard holds every row)."""
    for role, what in (("loss", "per-sample losses"), ("lse", "per-row log-sum-exps"),
                       ("z_loss_value", "per-sample z-losses")):
        if len(inputs.files(role)) > 1:
            raise CeCheckError(f"`{role}`: one file of the batch's {what} with vocabulary "
                               "shards (every shard holds every row)")
