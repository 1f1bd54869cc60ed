"""`ce-check binary`: sigmoid binary cross-entropy, registered on the shared app."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ce_cli.cli.app import (COMMANDS, AtolOpt, FDBudgetOpt, FDOpt, FloorOpt, JsonOpt, LossOpt,
                            NormaliserOpt, OutGradOpt, PrecisionOpt, QuietOpt, ReductionOpt,
                            RtolOpt, SamplesOpt, SeedOpt, StrictSubnormalsOpt, ThreadsOpt,
                            VerboseOpt, WorstOpt, app, epilog, guarded, run_check)
from ce_cli.enums import FDMode, Kind, Reduction
from ce_cli.cli.shards import (SHARD_LABELS, GradsOpt, SchedulerOpt, ShardsOpt, WorkersOpt,
                               run_sharded, shard_inputs, single_input)


BINARY_LABELS_HELP = ("Labels in [0, 1] (soft labels allowed) with the logits' shape; with --two-class, "
                      "class indices 0/1 or probability pairs.")


@app.command(short_help=COMMANDS["binary"], epilog=epilog(
    "ce-check binary logits.npy labels.npy --grad grad.npy",
    "ce-check binary pairs.npy labels.npy --two-class --grad grad.npy",
    "ce-check binary a.npy b.npy y.npy --grad ga.npy --grad gb.npy --shards cols"))
@guarded
def binary(
    logits: Annotated[str, typer.Argument(metavar="LOGITS", help="Logits of any shape (multi-label (N, K) included): "
                                          ".npy, .npz, CSV/TSV or '-'.", show_default=False)],
    labels: Annotated[list[str], typer.Argument(metavar="LABELS", help=BINARY_LABELS_HELP + SHARD_LABELS, show_default=False)],
    grad_path: GradsOpt = None,
    loss: LossOpt = None,
    weight: Annotated[Optional[str], typer.Option("--weight", metavar="FILE", help="Element weights, broadcast to the logits (PyTorch's weight=).")] = None,
    pos_weight: Annotated[Optional[str], typer.Option("--pos-weight", metavar="FILE|NUMBER", help="Positive-class weight: a file of K values (broadcast along the last axis) or a number.")] = None,
    reduction: ReductionOpt = Reduction.mean,
    two_class: Annotated[bool, typer.Option("--two-class", help="LOGITS are (..., 2) softmax logits: check them as multiclass and show CE([z0, z1]) = BCE(z1 - z0).")] = False,
    sample_weight: Annotated[Optional[str], typer.Option("--sample-weight", metavar="FILE", help="Per-sample / per-token weights with the batch's shape (the logits' without the last axis; 1-D logits: one per element), broadcast over the last axis; 'mean' divides by their sum over the elements. Not PyTorch's --weight.")] = None,
    denominator: Annotated[Optional[float], typer.Option("--denominator", metavar="N", help="loss = sum of (weighted) element losses / N (mean or sum): HF num_items_in_batch, global counts.")] = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", metavar="A", help="Labels smoothed toward 1/2: y*(1-A) + A/2 (Keras BinaryCrossentropy label_smoothing).")] = 0.0,
    softcap: Annotated[Optional[float], typer.Option("--softcap", metavar="CAP", help="Soft-capping: z <- CAP*tanh(z/CAP) before the sigmoid; gradients are w.r.t. the raw logits.")] = None,
    logit_scale: Annotated[float, typer.Option("--logit-scale", metavar="S", help="z <- S*z before the sigmoid (and before --softcap): 1/temperature.")] = 1.0,
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
    threads: ThreadsOpt = None,
    out_grad: OutGradOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    shards: ShardsOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Sigmoid binary cross-entropy (PyTorch BCEWithLogitsLoss semantics): reference loss and
    gradient in float64, proven by finite differences, compared with yours, plus the two-class
    bridge (softmax CE over [0, z] equals BCE on z). The softmax-only options of `grad`
    (--z-loss, --lse, --smoothing-form, --shift-labels, --vocab-offset) do not apply to a
    sigmoid."""
    given = locals()
    from ce_cli.io.inputs import VECTOR_ROLES  # numpy and the library load here, not for --help
    from ce_cli.verify.checks import check_binary
    from ce_cli.verify.options import FIELDS

    settings = {name: given[name] for name in FIELDS if name in given}  # the CheckOptions fields
    if shards is not None or scheduler is not None or workers is not None:
        run_sharded(  # cli/shards.py: LOGITS, LABELS and --grad name shard files
            shards, *shard_inputs(logits, labels), grad_path, scheduler=scheduler, workers=workers,
            json_out=json_out, quiet=quiet, kind="binary", pos_weight=pos_weight,
            refused={"out_grad": out_grad},
            given={"weight": weight, "loss": loss, "sample_weight": sample_weight}, **settings)
    labels_file, grad_file = single_input(labels, grad_path)
    run_check(
        check_binary, {"logits": logits, "labels": labels_file, "grad": grad_file, "loss": loss,
                       "weight": weight, "pos_weight": pos_weight, "sample_weight": sample_weight},
        out_grad=out_grad, json_out=json_out, quiet=quiet, verbose=verbose, fd_budget=fd_budget,
        vectors=VECTOR_ROLES[Kind.binary], elementwise=True, **settings)
