"""The public checks: `check_grad` (softmax CE) and `check_binary` (sigmoid BCE) build the loss
model from the arrays and run the pipeline; `reference` gives the float64 reference alone."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from ce_cli.errors import CeCheckError
from ce_cli.io.arrays import api_array, compared_array
from ce_cli.io.bfloat16 import as_array
from ce_cli.io.stored import stored_alike, stored_notes
from ce_cli.kernels.compiled import use_threads
from ce_cli.models.semantics import SplitLse
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.pipeline import Inputs, Run, verify
from ce_cli.verify.results import CheckResult, Report, verdict_line

if TYPE_CHECKING:
    from ce_cli.verify.bridge import two_class_bridge
    from ce_cli.verify.reference import Reference
    from ce_cli.verify.reference import softmax_reference as reference

__all__ = ["Reference", "check_binary", "check_grad", "reference", "two_class_bridge"]

# Public names `check_grad` does not need load on first use (PEP 562): a softmax check (and the
# CLI's `grad`) pays neither for the sigmoid model nor for the bridge.
_LAZY = {"Reference": ("ce_cli.verify.reference", "Reference"),
         "reference": ("ce_cli.verify.reference", "softmax_reference"),
         "two_class_bridge": ("ce_cli.verify.bridge", "two_class_bridge")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

ROLES = ("logits", "labels", "grad", "loss", "weight", "pos_weight", "lse", "sample_weight",
         "z_loss_value")


def _sources(sources: dict[str, str] | None) -> dict[str, str]:
    return {**{role: role for role in ROLES}, **(sources or {})}


def _array_or_none(x: ArrayLike | None) -> np.ndarray | None:
    return None if x is None else np.asarray(x)


def check_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    grad: ArrayLike | None = None,
    loss: ArrayLike | float | None = None,
    weight: ArrayLike | None = None,
    options: CheckOptions | None = None,
    out_grad: str | Path | None = None,
    sources: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    extra_checks: tuple[CheckResult, ...] = (),
    lse: ArrayLike | SplitLse | None = None,
    sample_weight: ArrayLike | None = None,
    z_loss_value: ArrayLike | float | None = None,
    **settings: Any,
) -> Report:
    """Verify softmax cross-entropy (PyTorch `F.cross_entropy` semantics) on arrays.

    Settings come as `options` (a `CheckOptions`) and/or as its field names (`reduction="sum"`).
    Returns a `Report`; raises `CeCheckError` for invalid input. `progress(done_rows, total_rows)`
    is called per chunk; `out_grad` names a .npy file for the float64 reference gradient.
    Training code: `sample_weight` (the batch's shape) multiplies each row's loss; `lse` is the
    per-row log-sum-exp your kernel returns (compared), or with `vocab_offset` the global one of
    a vocabulary shard (an input: an array, or a `SplitLse` m + log1p(s1) that keeps a
    confident row's lse - m to full precision), with the setting `vocab_size` its whole
    vocabulary's V (what label smoothing spreads over; `weight` then holds V class weights);
    `z_loss_value` the z-loss your kernel returns on its own.
    """
    opts = CheckOptions.build(options, **settings)
    src = _sources(sources)
    logits, labels, weight, sample_weight = map(api_array, (logits, labels, weight, sample_weight))
    grad, loss, lse, z_loss_value = map(compared_array, (grad, loss, lse, z_loss_value))
    z, y = as_array(logits), as_array(labels)
    grad, loss, z_loss_value = stored_alike(z, grad, loss, z_loss_value)
    if opts.shift_labels:
        y = shift_labels(z, y, opts.ignore_index, src["labels"])
    given = opts.semantics(_array_or_none(sample_weight), vocab_offset=opts.vocab_offset,
                           vocab_size=opts.vocab_size)
    with use_threads(opts.threads):  # the input checks' scans run on the check's threads
        problem, warnings = build_softmax_ce(
            z, y, weight=_array_or_none(weight), reduction=opts.reduction.value,
            ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
            class_axis=opts.class_axis, source=src["logits"], labels_source=src["labels"],
            weight_source=src["weight"], semantics=given,
            lse=lse if opts.vocab_offset is not None else None,
            sample_weight_source=src["sample_weight"], lse_source=src["lse"])
    _refuse_or_note(problem, opts, warnings)
    warnings += stored_notes({src["grad"]: grad, src["loss"]: loss, src["lse"]: lse,
                              src["z_loss_value"]: z_loss_value})
    loss = _shard_loss(problem, loss, src, warnings)
    run = Run("multiclass", _echo(problem, opts, weight is not None), extra_checks, out_grad,
              progress)
    compared_lse = lse if opts.vocab_offset is None else None
    return verify(problem, warnings, Inputs(z, y, grad, loss, src, compared_lse, z_loss_value),
                  opts, run)


def _refuse_or_note(problem, opts: CheckOptions, warnings: list[str]) -> None:
    """A `kl_loss` the targets cannot give (one line); the two-class note."""
    if opts.kl_loss and problem.targets_entropy() is None:
        raise CeCheckError("`kl_loss`: the KL divergence to smoothed one-hot targets needs "
                           "class-index labels, without class weights or `vocab_offset`")
    if problem.n_classes == 2 and opts.vocab_offset is None:
        warnings.append("note: two classes: softmax CE over [z0, z1] equals sigmoid BCE on z1 - z0; "
                        "binary `two_class` checks the correspondence")


def _echo(problem, opts: CheckOptions, weighted: bool) -> dict[str, Any]:
    """The report's `options`: the settings that shaped a softmax check."""
    return {"ignore_index": opts.ignore_index, "label_smoothing": opts.label_smoothing,
            "class_axis": opts.class_axis, "class_axis_resolved": problem.layout.class_axis,
            "weighted": weighted, **problem.sem.to_echo(),
            **({"shift_labels": True} if opts.shift_labels else {}),
            **({"kl_loss": True} if opts.kl_loss else {})}


def shift_labels(z: Any, y: np.ndarray, ignore_index: int, source: str) -> np.ndarray:
    """HF `ForCausalLMLoss`: position t is scored against label t + 1 along the last batch
    axis (the sequence), the last position of each sequence against `ignore_index`. `z`: the
    logits, or only their shape."""
    if y.ndim < 1 or y.shape == np.shape(z):
        raise CeCheckError(f"`shift_labels`: needs class-index labels of shape (..., T) for "
                           f"(..., T, V) logits; {source} has shape {y.shape}")
    out = np.full(y.shape, ignore_index, dtype=np.result_type(y.dtype, np.min_scalar_type(ignore_index)))
    out[..., :-1] = y[..., 1:]
    return out


# the warning of a vocabulary shard whose rows' labels lie elsewhere (merged reports drop it)
OUTSIDE_LABELS = "labels lie in another shard"


def _shard_loss(problem, loss, src: dict[str, str], warnings: list[str]):
    """A shard's rows whose label lies in another shard miss -z_y there: their loss cannot be
    formed from this shard, so a loss is checked only when every label is inside."""
    sem = problem.sem
    if sem.vocab_offset is None:
        return loss
    outside = int(np.count_nonzero(problem.valid & ~sem.inside_mask))
    if not outside:
        return loss
    if loss is not None:
        raise CeCheckError(
            f"{src['loss']}: {outside} rows' labels lie outside the shard's columns "
            f"[{sem.vocab_offset}, {sem.vocab_offset + problem.n_classes}): their loss "
            "lse - z_y needs z_y from another shard; check the loss on a shard that holds every "
            "label, or without `vocab_offset`")
    warnings.append(f"{outside} rows' {OUTSIDE_LABELS}: the reference loss counts "
                    "their lse only (-z_y is that shard's); the gradient is complete")
    return loss


def check_binary(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    grad: ArrayLike | None = None,
    loss: ArrayLike | float | None = None,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | float | None = None,
    options: CheckOptions | None = None,
    out_grad: str | Path | None = None,
    sources: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    sample_weight: ArrayLike | None = None,
    **settings: Any,
) -> Report:
    """Verify sigmoid binary cross-entropy (PyTorch `BCEWithLogitsLoss` semantics) on arrays.

    Labels in [0, 1] with the logits' shape; `weight` broadcasts to the logits, `pos_weight`
    along the last axis. The report always carries the two-class bridge: softmax CE over
    [0, z] with targets [1 - y, y] equals BCE(z, y), and d/dz1 = s(z) - y = -d/dz0.
    With `two_class=True` the logits are (..., 2) softmax logits with class-index (or
    probability) labels: the multiclass checks run on them, and the bridge on z = z1 - z0.
    Training code (models/sigmoid.py): `sample_weight` (the batch's shape) multiplies each
    element's loss, and the settings `softcap`, `logit_scale`, `denominator` and
    `label_smoothing` (y' = y (1 - A) + A/2, Keras' form) apply; softmax-only settings are refused.
    """
    from ce_cli.models.sigmoid import build_sigmoid_bce
    from ce_cli.verify.bridge import WITHOUT_OPTIONS, two_class_bridge

    opts = CheckOptions.build(options, **settings)
    refuse_softmax_only(opts)
    src = _sources(sources)
    logits, labels, weight, pos_weight, sample_weight = map(
        api_array, (logits, labels, weight, pos_weight, sample_weight))
    grad, loss = map(compared_array, (grad, loss))
    z, y = as_array(logits), as_array(labels)
    grad, loss = stored_alike(z, grad, loss)
    common = dict(grad=grad, loss=loss, out_grad=out_grad, sources=src, progress=progress)
    if opts.two_class:
        return _check_two_class(z, y, weight, pos_weight, opts, src,
                                {**common, "sample_weight": sample_weight})
    with use_threads(opts.threads):  # the input checks' scans run on the check's threads
        problem, warnings = build_sigmoid_bce(
            z, y, weight=_array_or_none(weight), pos_weight=_array_or_none(pos_weight),
            reduction=opts.reduction.value, source=src["logits"], labels_source=src["labels"],
            weight_source=src["weight"], pos_weight_source=src["pos_weight"],
            label_smoothing=opts.label_smoothing, softcap=opts.softcap,
            logit_scale=opts.logit_scale, denominator=opts.denominator,
            sample_weight=_array_or_none(sample_weight), sample_weight_source=src["sample_weight"])
    plain = (problem if weight is None and pos_weight is None and problem.plain
             else problem.without_options())
    bridge = two_class_bridge(plain, opts.worst, note="" if plain is problem else
                              "identity checked without weight/pos_weight" if problem.plain else
                              WITHOUT_OPTIONS)
    echo = {"weighted": weight is not None, "pos_weighted": pos_weight is not None,
            **problem.sem.to_echo(),
            **({"label_smoothing": problem.smoothing} if problem.smoothing else {})}
    run = Run("binary", echo, (bridge,), out_grad, progress)
    warnings += stored_notes({src["grad"]: grad, src["loss"]: loss})
    return verify(problem, warnings, Inputs(z, y, grad, loss, src), opts, run)


def refuse_softmax_only(opts: CheckOptions) -> None:
    """The settings of softmax CE that mean nothing for a sigmoid: a one-line error each."""
    defaults = CheckOptions()
    for name in ("z_loss", "smoothing_form", "shift_labels", "vocab_offset", "vocab_size",
                 "kl_loss", "empty_mean"):
        if getattr(opts, name) != getattr(defaults, name):
            raise CeCheckError(f"`{name}`: applies to softmax cross-entropy (check_grad), "
                               "not sigmoid BCE")


def _check_two_class(z: np.ndarray, y: np.ndarray, weight: ArrayLike | None,
                     pos_weight: ArrayLike | float | None, opts: CheckOptions,
                     src: dict[str, str], common: dict[str, Any]) -> Report:
    """(..., 2) softmax logits checked as multiclass, plus the bridge on z1 - z0."""
    from ce_cli.models.sigmoid import build_sigmoid_bce
    from ce_cli.verify.bridge import two_class_bridge

    if pos_weight is not None:
        raise CeCheckError("`pos_weight`: not used with `two_class` (give `weight`, 2 class weights)")
    if z.ndim < 1 or z.shape[-1] != 2:
        raise CeCheckError(f"{src['logits']}: shape {z.shape}; `two_class` needs (..., 2) logits")
    report = check_grad(z, y, weight=weight, options=replace(opts, two_class=False), **common)
    with np.errstate(invalid="ignore"):
        x = np.asarray(z[..., 1], dtype=np.float64) - np.asarray(z[..., 0], dtype=np.float64)
    if y.shape == z.shape:
        t = np.asarray(y[..., 1], dtype=np.float64)
        ignored = np.zeros(x.shape, dtype=bool)
    else:
        t = np.asarray(y, dtype=np.float64).reshape(x.shape)
        ignored = t == opts.ignore_index
    # a -inf logit makes z1 - z0 = +-inf, where the identity only holds as a limit
    masked = ~np.isfinite(x) | ignored
    problem, _ = build_sigmoid_bce(np.where(masked, 0.0, x), np.where(masked, 0.0, t),
                                   source=src["logits"], labels_source=src["labels"])
    skipped = int(np.count_nonzero(masked))
    bridge = two_class_bridge(problem, opts.worst,
                              note=f"{skipped} masked or ignored rows left out" if skipped else "")
    checks, ok = report.checks + (bridge,), report.ok and bridge.ok
    return replace(report, checks=checks, ok=ok, verdict=verdict_line(ok, checks, report.diagnosis),
                   warnings=tuple(w for w in report.warnings if "two classes" not in w))
