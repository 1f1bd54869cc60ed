"""`ce-check linear`: fused linear cross-entropy, registered on the shared app."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ce_cli.cli.app import (COMMANDS, AtolOpt, EmptyMeanOpt, FDOpt, FloorOpt, JsonOpt, LossOpt,
                            PrecisionOpt, QuietOpt, ReductionOpt, RtolOpt, SamplesOpt, SeedOpt,
                            WorstOpt, app, check_settings, epilog, guarded, input_specs,
                            progress_bar)
from ce_cli.cli.shards import LinearShardsOpt, SchedulerOpt, WorkersOpt, run_linear_sharded
from ce_cli.enums import FDMode, Reduction
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.report.emit import emit


def _opt(flag: str, text: str, metavar: str | None = None) -> typer.models.OptionInfo:
    return typer.Option(flag, help=text, metavar=metavar)  # type: ignore[no-any-return]


@app.command(short_help=COMMANDS["linear"], epilog=epilog(
    "ce-check linear h.npy w.npy y.npy --grad-hidden gh.npy --grad-weight gw.npy",
    "ce-check linear h.npy w.npy y.npy --bias b.npy --grad-bias gb.npy --exact",
    "ce-check linear h.npy w.npy y.npy --weight-layout HV --loss 10.4"))
@guarded
def linear(
    hidden: Annotated[str, typer.Argument(metavar="HIDDEN", help="Hidden states (N, H) or (B, T, H).", show_default=False)],
    weight: Annotated[str, typer.Argument(metavar="WEIGHT", help="Weight (V, H), nn.Linear's layout (--weight-layout HV for (H, V)).", show_default=False)],
    labels: Annotated[list[str], typer.Argument(metavar="LABELS", help="Class indices, one per token. With --shards, HIDDEN may be several files (HIDDEN... WEIGHT LABELS).", show_default=False)],
    bias: Annotated[Optional[str], _opt("--bias", "Bias, V values.", "FILE")] = None,
    grad_hidden: Annotated[Optional[list[str]], _opt("--grad-hidden", "Your dL/dH (the hidden states' shape); with --shards once per HIDDEN file, or a quoted glob.", "FILE")] = None,
    grad_weight: Annotated[Optional[str], _opt("--grad-weight", "Your dL/dW (the weight's shape).", "FILE")] = None,
    grad_bias: Annotated[Optional[str], _opt("--grad-bias", "Your dL/db (V values).", "FILE")] = None,
    loss: LossOpt = None,
    class_weight: Annotated[Optional[str], _opt("--class-weight", "Class weights, V values (PyTorch's weight=).", "FILE")] = None,
    weight_layout: Annotated[str, _opt("--weight-layout", "VH (V, H) or HV (H, V).", "VH|HV")] = "VH",
    exact: Annotated[Optional[bool], _opt("--exact/--projections-only", "Compute every gradient entry instead of random projections (default: for bf16 gradients with N*V*H <= 2^30).")] = None,
    projections: Annotated[int, _opt("--projections", "Random projections per gradient row (Freivalds).", "N")] = 8,
    reduction: ReductionOpt = Reduction.mean,
    ignore_index: Annotated[int, _opt("--ignore-index", "Target value that is ignored.", "INT")] = -100,
    label_smoothing: Annotated[float, _opt("--label-smoothing", "Label smoothing in [0, 1].", "FLOAT")] = 0.0,
    z_loss: Annotated[float, _opt("--z-loss", "z-loss coefficient: adds COEF*lse^2 per non-ignored token, reduced like the loss.", "COEF")] = 0.0,
    softcap: Annotated[Optional[float], _opt("--softcap", "Soft-capping: z <- CAP*tanh(z/CAP) before the softmax; gradients through it.", "CAP")] = None,
    logit_scale: Annotated[float, _opt("--logit-scale", "z <- S*z before the softmax (and before --softcap).", "S")] = 1.0,
    smoothing_form: Annotated[str, _opt("--smoothing-form", "torch: eps/V on every class; others: 1-eps on the target, eps/(V-1) elsewhere.", "torch|others")] = "torch",
    denominator: Annotated[Optional[float], _opt("--denominator", "loss = sum of (weighted) token losses / N (HF num_items_in_batch).", "N")] = None,
    sample_weight: Annotated[Optional[str], _opt("--sample-weight", "Per-token weights with the tokens' shape; 'mean' divides by their weighted count.", "FILE")] = None,
    shift_labels: Annotated[bool, _opt("--shift-labels", "Causal LM: token t is scored against label t+1, the last token ignored.")] = False,
    empty_mean: EmptyMeanOpt = "nan",
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    precision: PrecisionOpt = None,
    floor_factor: FloorOpt = None,
    fd: FDOpt = FDMode.auto,
    samples: SamplesOpt = 256,
    seed: SeedOpt = 0,
    worst: WorstOpt = 5,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    shards: LinearShardsOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Fused linear cross-entropy: F.cross_entropy(F.linear(H, W, b), y) checked in float64
    without forming the logits; your dL/dH, dL/dW, dL/db and loss compared."""
    from ce_cli.verify.linear import LinearSettings

    sharded = shards is not None or scheduler is not None or workers is not None
    inputs = {**_positional([hidden, weight, *labels], grad_hidden, sharded), "bias": bias,
              "grad_weight": grad_weight, "grad_bias": grad_bias, "loss": loss,
              "class_weight": class_weight, "sample_weight": sample_weight}
    linear_settings = LinearSettings(weight_layout=weight_layout, exact=exact,
                                     projections=projections)
    flags = dict(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, rtol=rtol,
        atol=atol, precision=precision, floor_factor=floor_factor, fd=fd, samples=samples,
        seed=seed, worst=worst, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
        smoothing_form=smoothing_form, denominator=denominator, shift_labels=shift_labels,
        empty_mean=empty_mean)
    if sharded:
        run_linear_sharded(shards, inputs, linear_settings, scheduler=scheduler, workers=workers,
                           json_out=json_out, quiet=quiet, **flags)
    _single(inputs, linear_settings, flags, json_out, quiet)


def _positional(args: list[str], grad_hidden: list[str] | None, sharded: bool) -> dict[str, Any]:
    """HIDDEN... WEIGHT LABELS (Click gives LABELS every argument after the second): with
    --shards lists of hidden and --grad-hidden files; without, one of each."""
    hidden, (weight, labels) = args[:-2], args[-2:]
    if sharded:
        return {"hidden": hidden, "weight": weight, "labels": labels, "grad_hidden": grad_hidden}
    _one_each(hidden, grad_hidden)
    return {"hidden": hidden[0], "weight": weight, "labels": labels,
            "grad_hidden": grad_hidden[0] if grad_hidden else None}


def _one_each(hidden: list[str], grad_hidden: list[str] | None) -> None:
    """Without --shards: one HIDDEN and at most one --grad-hidden."""
    if len(hidden) > 1:
        raise CeCheckError(f"HIDDEN: {len(hidden)} files given before WEIGHT LABELS; several only "
                           "with `shards`")
    if grad_hidden is not None and len(grad_hidden) > 1:
        raise CeCheckError(f"`grad_hidden`: given {len(grad_hidden)} times; several only with "
                           "`shards`")


def _single(inputs: dict[str, Any], linear_settings: Any, flags: dict[str, Any], json_out: bool,
            quiet: bool) -> None:
    """The single-process check: load, check, emit, exit with the verdict."""
    import numpy as np  # numpy and the library load here, not for `--help`

    from ce_cli.io.inputs import load_all
    from ce_cli.report.render import CheckOutput
    from ce_cli.verify.linear import check_linear

    loaded = load_all(input_specs(inputs), vectors=("bias", "grad_bias", "class_weight"))
    options = check_settings(**flags, loss_atol=loaded.loss_atol)
    with np.errstate(all="ignore"), progress_bar(enabled=not quiet) as progress:
        arrays: dict[str, Any] = dict(loaded.arrays)
        report = check_linear(**arrays, sources=loaded.sources, progress=progress,
                              options=options, linear=linear_settings)
    emit(CheckOutput(report), json_out=json_out, quiet=quiet)
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.CHECK_FAILED)
