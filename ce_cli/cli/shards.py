"""`ce-check grad|binary LOGITS... LABELS --shards AXIS`: a sharded batch, checked shard by shard
(in this process, or as tasks on Dask with --scheduler/--workers), reported merged and per shard.

With --shards, LOGITS is one or more files or quoted globs (globs in natural order: logits_2
before logits_10), in shard order; --grad the same, given once per file or glob; LABELS (the
last argument) a glob of one file per shard or one file for the whole batch (row shards, and
binary column shards, take their part of it; vocabulary shards read global ids from it).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

from ce_cli.cli.app import check_settings, progress_bar
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.report.emit import emit
from ce_cli.report.format import fmt_value, json_safe

if TYPE_CHECKING:  # numpy, Rich and the library load in the command (`--help` needs none)
    from rich.console import Console

    from ce_cli.verify.shards import ShardedReport

SHARD_LABELS = (" With --shards, LOGITS may be several files or quoted globs (LOGITS... LABELS): "
                "one file per shard, the last argument is then LABELS, a glob of one file per "
                "shard or one file for the batch.")
GradsOpt = Annotated[Optional[list[str]], typer.Option(
    "--grad", metavar="FILE", show_default=False,
    help="Your gradient w.r.t. the logits (any float dtype, the logits' shape). With --shards: "
    "once per logits file, or a quoted glob.")]
ShardsOpt = Annotated[Optional[str], typer.Option(
    "--shards", metavar="AXIS", help="Check a sharded batch split along AXIS: rows, vocab (grad) or cols "
    "(binary), or auto (from the shapes). LOGITS and --grad then name one file per shard "
    "(several, or quoted globs); LABELS a glob of one per shard, or one file for the batch.",
    show_default=False)]
LinearShardsOpt = Annotated[Optional[str], typer.Option(
    "--shards", metavar="AXIS", help="Check row shards (rows or auto): HIDDEN, LABELS "
    "and --grad-hidden are quoted globs of one file per shard; WEIGHT, --grad-weight and "
    "--grad-bias one file for the whole batch.", show_default=False)]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    "--scheduler", metavar="ADDRESS", help="With --shards: run the shards as tasks on the Dask cluster at this "
    "address (pip install 'ce-check[dask]').", show_default=False)]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", metavar="N", help="With --shards: start a local Dask cluster of N worker processes.",
    show_default=False)]


def shard_inputs(logits: str, labels: list[str]) -> tuple[list[str], str]:
    """`LOGITS... LABELS`: Click gives LOGITS the first file, LABELS the rest (so that a
    missing LABELS still reads as missing); with --shards every file but the last is logits."""
    return [logits, *labels[:-1]], labels[-1]


def single_input(labels: list[str], grads: list[str] | None) -> tuple[str, str | None]:
    """The one LABELS file and the one --grad of a check without --shards."""
    if len(labels) > 1:
        raise CeCheckError(f"LOGITS: {len(labels)} files given before LABELS; several only with "
                           "`shards`")
    if grads is not None and len(grads) > 1:
        raise CeCheckError(f"`grad`: given {len(grads)} times; several only with `shards`")
    return labels[0], grads[0] if grads else None


class ShardsOutput:
    """A `ShardedReport` as an `Output`: the merged report, then one line per shard."""

    def __init__(self, sharded: ShardedReport) -> None:
        self.sharded = sharded
        self.warnings = sharded.report.warnings

    def to_dict(self) -> dict:
        from ce_cli.report.render import report_to_dict

        data = report_to_dict(self.sharded.report)
        data["shards"] = {"axis": self.sharded.axis,
                          "per_shard": json_safe([asdict(s) for s in self.sharded.shards])}
        return data

    def render(self, console: Console) -> None:
        from rich.table import Table

        from ce_cli.report.render import render_table

        render_table(self.sharded.report, console)
        table = Table(title=f"shards ({self.sharded.axis})", title_justify="left",
                      show_edge=False, pad_edge=False)
        for col in ("#", "logits", "offset", "size", "loss", "grad mismatches", "verdict"):
            table.add_column(col)
        for s in self.sharded.shards:
            table.add_row(str(s.index), s.source, f"{s.offset:,}", f"{s.size:,}",
                          fmt_value(s.loss), f"{s.mismatches:,}", s.verdict)
        console.print(table)


def _pos_weight(text: str | None) -> float | str | None:
    """--pos-weight for the shards: a number, or the file (or URL) the workers read."""
    from ce_cli.io.inputs import InputSpec, Origin

    if text is None:
        return None
    spec = InputSpec.parse(text, "pos_weight", strict=True)
    return float(spec.load()) if spec.origin is Origin.number else spec.text


def run_sharded(axis: str | None, logits: list[str], labels: str, grads: list[str] | None, *,
                scheduler: str | None, workers: int | None, json_out: bool, quiet: bool,
                refused: dict[str, Any], kind: str = "softmax", pos_weight: str | None = None,
                given: dict[str, str | None] | None = None, **flags: Any) -> NoReturn:
    """Plan the shards from the files and globs, run them (here or on Dask), emit, exit with the
    verdict. `refused`: options not supported with shards (an error when given); `given`: the
    batch's other inputs (--weight, --loss, --sample-weight, --lse, --z-loss-value); `flags`:
    the check's settings; `kind`: softmax (grad) or binary (with `pos_weight`)."""
    import numpy as np

    from ce_cli.verify.shards import batch_inputs, expand, pair_files, run_shards

    given = given or {}
    _refusals(axis, refused, [*logits, labels, *(grads or ()), pos_weight, *given.values()])
    inputs, loss_atol = batch_inputs(given, flags["reduction"].value)
    options = check_settings(**flags, loss_atol=loss_atol)
    pw = _pos_weight(pos_weight)
    files = pair_files([f for z in logits for f in expand(z, "logits")], expand(labels, "labels"),
                       [f for g in grads for f in expand(g, "grad")] if grads else None)
    split = None if axis == "auto" else axis
    with np.errstate(all="ignore"), progress_bar(enabled=not quiet) as progress:
        if scheduler is None and workers is None:
            sharded = run_shards(files, split, options, progress=progress, kind=kind, pos_weight=pw,
                                 inputs=inputs)
        else:
            from ce_cli.distributed.dask_run import run_on_dask

            sharded = run_on_dask(files, split, options, scheduler=scheduler, workers=workers,
                                  progress=progress, kind=kind, pos_weight=pw, inputs=inputs)
    emit(ShardsOutput(sharded), json_out=json_out, quiet=quiet)
    raise typer.Exit(ExitCode.OK if sharded.report.ok else ExitCode.CHECK_FAILED)


def _refusals(axis: str | None, refused: dict[str, Any], texts: list[str | None]) -> None:
    """One line for what `grad`/`binary --shards` do not take (never ignored)."""
    if axis is None:
        raise CeCheckError("`scheduler`/`workers`: only with `shards`")
    for name, value in refused.items():
        if value not in (None, False):
            raise CeCheckError(f"`{name}`: not supported with `shards` (each shard would write "
                               "its part; check the batch whole to write the reference)"
                               if name == "out_grad" else f"`{name}`: not supported with `shards`")
    if "-" in texts:
        raise CeCheckError("`shards`: inputs are files, not stdin")


def _linear_refusals(axis: str | None, files: dict[str, Any]) -> None:
    """One line for what `linear --shards` does not take (never ignored)."""
    if axis is None:
        raise CeCheckError("`scheduler`/`workers`: only with `shards`")
    if axis not in ("rows", "auto"):
        raise CeCheckError(f"`shards`: linear shards split rows (use rows or auto), got '{axis}'")
    if "-" in [f for v in files.values() if v is not None for f in ([v] if isinstance(v, str) else v)]:
        raise CeCheckError("`shards`: inputs are files, not stdin")


def _files(text: str | None, role: str) -> tuple[str, ...]:
    """The files a glob (or one name) gives `role`; none without it."""
    from ce_cli.verify.shards import expand

    return tuple(expand(text, role)) if text else ()


def run_linear_sharded(axis: str | None, files: dict[str, Any], settings: Any, *,
                       scheduler: str | None, workers: int | None, json_out: bool, quiet: bool,
                       **flags: Any) -> NoReturn:
    """`linear --shards rows`: HIDDEN, LABELS and --grad-hidden are globs (or one file) of row
    shards; WEIGHT, --bias, --class-weight, --grad-weight, --grad-bias and --loss are one file
    (or value) for the whole batch (verify/shards/linear_run.py)."""
    import numpy as np

    from ce_cli.cli.app import input_specs
    from ce_cli.io.inputs import load_all
    from ce_cli.verify.shards import expand, pair_files
    from ce_cli.verify.shards.linear_run import LinearBatch, run_linear_shards

    _linear_refusals(axis, files)
    per_token = flags["reduction"].value == "none"  # --loss: files of per-token losses
    loss = (load_all(input_specs({"loss": files["loss"]}))
            if files["loss"] is not None and not per_token else None)
    options = check_settings(**flags, loss_atol=loss.loss_atol if loss is not None else 0.0)
    gh = files["grad_hidden"]
    shard_files = pair_files([f for h in files["hidden"] for f in expand(h, "hidden")],
                             expand(str(files["labels"]), "labels"),
                             [f for g in gh for f in expand(g, "grad_hidden")] if gh else None)
    batch = LinearBatch(str(files["weight"]), files["bias"], files["class_weight"], settings,
                        sample_weight=_files(files["sample_weight"], "sample_weight"),
                        loss_files=_files(files["loss"] if per_token else None, "loss"))
    kw: dict[str, Any] = {"grad_weight": files["grad_weight"], "grad_bias": files["grad_bias"],
                          "loss": loss.arrays["loss"] if loss is not None else None,
                          "loss_source": loss.sources["loss"] if loss is not None else "loss"}
    with np.errstate(all="ignore"), progress_bar(enabled=not quiet) as progress:
        if scheduler is None and workers is None:
            sharded = run_linear_shards(shard_files, options, batch, progress=progress, **kw)
        else:
            from ce_cli.distributed.dask_run import run_linear_on_dask

            sharded = run_linear_on_dask(shard_files, options, batch, scheduler=scheduler,
                                         workers=workers, progress=progress, **kw)
    emit(ShardsOutput(sharded), json_out=json_out, quiet=quiet)
    raise typer.Exit(ExitCode.OK if sharded.report.ok else ExitCode.CHECK_FAILED)
