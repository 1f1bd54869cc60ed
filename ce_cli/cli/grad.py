"""`ce-check grad`: softmax cross-entropy, registered on the shared app.

No `from __future__ import annotations` here: Typer would evaluate the forty parameters' string
annotations back into objects on every run (~7 ms of start-up)."""

from typing import Annotated, Optional

import typer

from ce_cli.cli.app import (COMMANDS, LABELS_HELP, LOGITS_HELP, AtolOpt, EmptyMeanOpt, FDBudgetOpt,
                            FDOpt, FloorOpt, JsonOpt, LossOpt, NormaliserOpt, OutGradOpt,
                            PrecisionOpt, QuietOpt, ReductionOpt, RtolOpt, SamplesOpt, SeedOpt,
                            StrictSubnormalsOpt, ThreadsOpt, VerboseOpt, WorstOpt, app, epilog,
                            guarded, run_check)
from ce_cli.enums import FDMode, Kind, Reduction
from ce_cli.cli.shards import (SHARD_LABELS, GradsOpt, SchedulerOpt, ShardsOpt, WorkersOpt, run_sharded,
                               shard_inputs, single_input)


@app.command(short_help=COMMANDS["grad"], epilog=epilog(
    "ce-check grad logits.npy labels.npy --grad grad.npy",
    "ce-check grad logits.npy labels.npy --loss 2.31 --reduction sum",
    "ce-check grad z0.npy z1.npy y.npy --grad g0.npy --grad g1.npy --shards rows"))
@guarded
def grad(
    logits: Annotated[str, typer.Argument(metavar="LOGITS", help=LOGITS_HELP, show_default=False)],
    labels: Annotated[list[str], typer.Argument(metavar="LABELS", help=LABELS_HELP + SHARD_LABELS, show_default=False)],
    grad_path: GradsOpt = None,
    loss: LossOpt = None,
    weight: Annotated[Optional[str], typer.Option("--weight", metavar="FILE", help="Class weights, C values (PyTorch's weight=).")] = None,
    reduction: ReductionOpt = Reduction.mean,
    ignore_index: Annotated[int, typer.Option("--ignore-index", metavar="INT", help="Target value that is ignored.")] = -100,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", metavar="FLOAT", help="Label smoothing in [0, 1].")] = 0.0,
    class_axis: Annotated[int, typer.Option("--class-axis", metavar="AXIS", help="Axis of the classes: -1 (last) or 1 for PyTorch's (N, C, d1, ...).")] = -1,
    z_loss: Annotated[float, typer.Option("--z-loss", metavar="COEF", help="z-loss coefficient: adds COEF*lse^2 per non-ignored row, reduced like the loss (PaLM, Liger lse_square_scale).")] = 0.0,
    z_loss_value: Annotated[Optional[str], typer.Option("--z-loss-value", metavar="FILE|NUMBER", help="The z-loss your kernel returns on its own: a file or a number (per sample with --reduction none).")] = None,
    lse: Annotated[Optional[str], typer.Option("--lse", metavar="FILE", help="Per-row log-sum-exp your kernel returns (compared); with --vocab-offset the global lse of the whole vocabulary (an input).")] = None,
    softcap: Annotated[Optional[float], typer.Option("--softcap", metavar="CAP", help="Soft-capping: z <- CAP*tanh(z/CAP) before the softmax (Gemma 2, Liger softcap); gradients are w.r.t. the raw logits.")] = None,
    logit_scale: Annotated[float, typer.Option("--logit-scale", metavar="S", help="z <- S*z before the softmax (and before --softcap): Cohere logit_scale, 1/temperature.")] = 1.0,
    smoothing_form: Annotated[str, typer.Option("--smoothing-form", metavar="torch|others", help="torch: eps/C on every class; others: 1-eps on the target, eps/(C-1) elsewhere (Megatron, fairseq, NeMo).")] = "torch",
    denominator: Annotated[Optional[float], typer.Option("--denominator", metavar="N", help="loss = sum of (weighted) row losses / N: HF num_items_in_batch, global token counts.")] = None,
    sample_weight: Annotated[Optional[str], typer.Option("--sample-weight", metavar="FILE", help="Per-sample / per-token weights with the batch's shape; 'mean' divides by their weighted count.")] = None,
    shift_labels: Annotated[bool, typer.Option("--shift-labels", help="Causal LM (HF ForCausalLMLoss): position t is scored against label t+1, the last position ignored.")] = False,
    kl_loss: Annotated[bool, typer.Option("--kl-loss", help="Your loss is the KL divergence to the smoothed targets: the cross-entropy minus their entropy (T5X, Flax); the gradient is the same.")] = False,
    empty_mean: EmptyMeanOpt = "nan",
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size", metavar="V", help="With --vocab-offset: the whole vocabulary's size, over which --label-smoothing spreads (--weight then holds V class weights).")] = None,
    vocab_offset: Annotated[Optional[int], typer.Option("--vocab-offset", metavar="K", help="The logits are columns [K, K+V_shard) of a larger vocabulary (labels are global ids); needs --lse.")] = None,
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
    """Softmax cross-entropy (PyTorch F.cross_entropy semantics): reference loss and gradient in
    float64, proven by finite differences, compared with your gradient and loss."""
    given = locals()
    from ce_cli.io.inputs import VECTOR_ROLES  # numpy and the library load here, not for --help
    from ce_cli.verify.checks import check_grad
    from ce_cli.verify.options import FIELDS
    settings = {name: given[name] for name in FIELDS if name in given}  # the CheckOptions fields
    batch = dict(loss=loss, weight=weight, lse=lse, sample_weight=sample_weight, z_loss_value=z_loss_value)
    if shards is not None or scheduler is not None or workers is not None:
        run_sharded(  # cli/shards.py: LOGITS, LABELS and --grad are globs of shard files
            shards, *shard_inputs(logits, labels), grad_path, scheduler=scheduler, workers=workers,
            json_out=json_out, quiet=quiet, refused={"out_grad": out_grad}, given=batch, **settings)
    labels_file, grad_file = single_input(labels, grad_path)
    run_check(
        check_grad, {"logits": logits, "labels": labels_file, "grad": grad_file, **batch},
        out_grad=out_grad, json_out=json_out, quiet=quiet, verbose=verbose, fd_budget=fd_budget,
        vectors=VECTOR_ROLES[Kind.multiclass], **settings)
