"""`ce-check grad`: softmax cross-entropy, registered on the shared app."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ce_cli.cli.app import (LABELS_HELP, LOGITS_HELP, AtolOpt, FDBudgetOpt, FDOpt, FloorOpt, GradOpt,
                            JsonOpt, LossOpt, NormaliserOpt, OutGradOpt, PrecisionOpt, QuietOpt,
                            ReductionOpt, RtolOpt, SamplesOpt, SeedOpt, StrictSubnormalsOpt, VerboseOpt,
                            WorstOpt, app, epilog, guarded, run_check)
from ce_cli.enums import FDMode, Kind, Reduction
from ce_cli.io.inputs import VECTOR_ROLES
from ce_cli.verify.checks import check_grad


@app.command(short_help="Softmax cross-entropy: check your loss and gradient.", epilog=epilog(
    "ce-check grad logits.npy labels.npy --grad grad.npy",
    "ce-check grad logits.npy labels.npy --loss 2.31 --reduction sum",
    "ce-check grad nchw.npy labels.npy --class-axis 1 --grad g.npy --json"))
@guarded
def grad(
    logits: Annotated[str, typer.Argument(metavar="LOGITS", help=LOGITS_HELP, show_default=False)],
    labels: Annotated[str, typer.Argument(metavar="LABELS", help=LABELS_HELP, show_default=False)],
    grad_path: GradOpt = None,
    loss: LossOpt = None,
    weight: Annotated[Optional[str], typer.Option("--weight", metavar="FILE", help="Class weights, C values (PyTorch's weight=).")] = None,
    reduction: ReductionOpt = Reduction.mean,
    ignore_index: Annotated[int, typer.Option("--ignore-index", metavar="INT", help="Target value that is ignored.")] = -100,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", metavar="FLOAT", help="Label smoothing in [0, 1].")] = 0.0,
    class_axis: Annotated[int, typer.Option("--class-axis", metavar="AXIS", help="Axis of the classes: -1 (last) or 1 for PyTorch's (N, C, d1, ...).")] = -1,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    precision: PrecisionOpt = None,
    floor_factor: FloorOpt = None,
    normaliser_rtol: NormaliserOpt = None,
    strict_subnormals: StrictSubnormalsOpt = False,
    fd: FDOpt = FDMode.auto,
    fd_budget: FDBudgetOpt = None,
    samples: SamplesOpt = 256,
    seed: SeedOpt = 0,
    worst: WorstOpt = 5,
    out_grad: OutGradOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Softmax cross-entropy (PyTorch F.cross_entropy semantics): reference loss and gradient in
    float64, proven by finite differences, compared with your gradient and loss."""
    run_check(
        check_grad, {"logits": logits, "labels": labels, "grad": grad_path, "loss": loss,
                     "weight": weight},
        out_grad=out_grad, json_out=json_out, quiet=quiet, verbose=verbose, fd_budget=fd_budget, vectors=VECTOR_ROLES[Kind.multiclass],
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        class_axis=class_axis, rtol=rtol, atol=atol, precision=precision, floor_factor=floor_factor,
        normaliser_rtol=normaliser_rtol, strict_subnormals=strict_subnormals,
        fd=fd, samples=samples, seed=seed, worst=worst,
    )
