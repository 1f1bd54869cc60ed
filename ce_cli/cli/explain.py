"""The `ce-check explain` command: one sample, the derivation of dC/dz = a - y step by step.

Registered on the shared `app` by ce_cli.cli.main. Parses, loads, calls ce_cli.explain, hands
ce_cli.explain.render.ExplainOutput to `emit`, exits 0 (every step checked out), 1 (a step
disagrees) or 2 (usage or input error).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ce_cli.cli.app import COMMANDS, JsonOpt, QuietOpt, app, epilog, guarded, load_inputs, source_name
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.report.emit import emit

if TYPE_CHECKING:  # numpy and ce_cli.explain load in the command (`--help` needs neither)
    import numpy as np

    from ce_cli.explain import Explanation, Sample
    from ce_cli.explain.render import ExplainOutput


class Kind(str, Enum):
    multiclass = "multiclass"
    binary = "binary"


LogitsArg = Annotated[Optional[str], typer.Argument(
    metavar="LOGITS", show_default=False,
    help="Logits file (.npy, .npz, CSV/TSV or '-'): (C,), (N, C) or (B, T, V), class axis last; "
         "with --kind binary any shape. Or give --logits inline.")]
LabelsArg = Annotated[Optional[str], typer.Argument(
    metavar="LABELS", show_default=False,
    help="Labels file: class indices with the batch shape, or probability rows with the logits' "
         "shape (binary: labels in [0, 1] with the logits' shape). Or give --label/--target.")]
LogitsOpt = Annotated[Optional[str], typer.Option(
    "--logits", metavar="NUMBERS", help="Inline logits of one sample, comma or space separated: \"2.0,1.0,0.1\" "
                     "(binary: one number).", show_default=False)]
LabelOpt = Annotated[Optional[int], typer.Option(
    "--label", metavar="INT", help="The target class index (binary: 0 or 1).", show_default=False)]
TargetOpt = Annotated[Optional[str], typer.Option(
    "--target", metavar="NUMBERS", help="Target probabilities, comma separated (binary: one soft label in [0, 1]).",
    show_default=False)]
RowOpt = Annotated[Optional[str], typer.Option(
    "--row", metavar="INDEX", help="Which sample of a LOGITS file: a flat row index I, or an index into the batch "
                  "shape such as 1,2 for (B, T, V) (binary: into the logits' shape).",
    show_default=False)]
KindOpt = Annotated[Kind, typer.Option(
    "--kind", metavar="multiclass|binary", help="multiclass (softmax CE) or binary (sigmoid BCE, one logit).")]
CompareMseOpt = Annotated[bool, typer.Option(
    "--compare-mse", help="Contrast the MSE + sigmoid error (a - y) s'(z) with CE's a - y, with a "
                          "saturation table.")]
StepsOpt = Annotated[bool, typer.Option(
    "--steps", help="Finite-difference error against the step h (1e-1 ... 1e-12) for one entry.")]
EntryOpt = Annotated[Optional[int], typer.Option(
    "--entry", metavar="INT", help="The class whose derivative --steps probes (default: the target).",
    show_default=False)]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", metavar="FILE.svg", help="Write the --steps table with its bars to FILE.svg (implies --steps).",
    show_default=False)]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also show the step-by-step table and every check's errors and "
                            "tolerance rule (docs/explain.md explains them).")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", min=0, metavar="SEED", help="Seed for the random classes probed when C > 1024.")]


def parse_numbers(text: str, flag: str) -> np.ndarray:
    """Comma and/or space separated numbers ('2.0,1.0,0.1', '2 1 0.1', '-inf' allowed)."""
    import numpy as np

    tokens = [t for t in text.replace(",", " ").split()]
    if not tokens:
        raise CeCheckError(f"{flag}: no numbers in {text!r}")
    values = []
    for k, tok in enumerate(tokens):
        try:
            values.append(float(tok))
        except ValueError:
            raise CeCheckError(f"{flag}: value {k}: not a number: {tok!r}") from None
    return np.array(values, dtype=np.float64)


def _check_plot_path(plot: Path | None) -> None:
    if plot is None:
        return
    if plot.suffix.lower() != ".svg":
        raise CeCheckError(f"--plot '{plot}': only .svg is supported (Rich's SVG export of the --steps "
                           "table; no plotting library needed)")
    if plot.is_dir():
        raise CeCheckError(f"--plot '{plot}': is a directory")
    if not plot.parent.exists():
        raise CeCheckError(f"--plot '{plot}': directory '{plot.parent}' does not exist")


def _check_choices(logits_file: str | None, logits_text: str | None, labels_file: str | None,
                   label: int | None, target: str | None, row: str | None, entry: int | None,
                   steps: bool) -> None:
    """One source of logits, one of the target; --row only with a file, --entry only with --steps."""
    if logits_file is not None and logits_text is not None:
        raise CeCheckError("give the logits as a LOGITS file or with --logits, not both")
    if logits_file is None and logits_text is None:
        raise CeCheckError("no logits: give a LOGITS file (and LABELS) or --logits \"2.0,1.0,0.1\" --label 0")
    given = [name for name, v in (("LABELS", labels_file), ("--label", label), ("--target", target))
             if v is not None]
    if len(given) != 1:
        raise CeCheckError("give the target once: a LABELS file, --label or --target"
                           + (f" (got {', '.join(given)})" if given else ""))
    if logits_text is not None and row is not None:
        raise CeCheckError("--row picks a sample of a LOGITS file; --logits is already one sample")
    if entry is not None and not steps:
        raise CeCheckError("--entry chooses the entry of --steps; add --steps")


def _soft_label(label: int | None, target: str | None) -> float | None:
    """--kind binary's label: --target's one soft label, or --label's 0 or 1."""
    soft = None
    if target is not None:
        values = parse_numbers(target, "--target")
        if values.size != 1:
            raise CeCheckError(f"--target: --kind binary takes one soft label, got {values.size} values")
        soft = float(values[0])
    if label is not None:
        if label not in (0, 1):
            raise CeCheckError(f"--label {label}: a binary label is 0 or 1 (--target for a soft label)")
        soft = float(label)
    return soft


def _derive(kind: Kind, logits: np.ndarray, row: tuple[int, ...] | None, labels: np.ndarray | None,
            label: int | None, target: str | None, seed: int, sources: tuple[str, str]
            ) -> tuple[Sample, Explanation]:
    """The sample, picked and validated, and its derivation."""
    from ce_cli.explain import binary_sample, explain_binary, explain_softmax, softmax_sample

    logits_source, labels_source = sources
    if kind is Kind.binary:
        sample = binary_sample(logits, row, labels=labels, label=_soft_label(label, target),
                               logits_source=logits_source, labels_source=labels_source)
        assert sample.target is not None  # binary_sample always sets the label
        return sample, explain_binary(sample.z, sample.target)
    probs = parse_numbers(target, "--target") if target is not None else None
    sample = softmax_sample(logits, row, labels=labels, label=label, target=probs,
                            logits_source=logits_source, labels_source=labels_source)
    return sample, explain_softmax(sample.z, label=sample.label, target=sample.target, seed=seed)


def _write_plot(output: ExplainOutput, plot: Path) -> None:
    from ce_cli.explain.render import write_svg

    assert output.curve is not None  # --plot implies --steps
    title = f"ce-check explain --steps ({output.where})"
    try:
        write_svg(output.curve, plot, binary=output.expl.kind == "binary", title=title)
    except OSError as exc:
        raise CeCheckError(f"--plot '{plot}': cannot write ({exc.strerror or exc})") from None


@app.command(short_help=COMMANDS["explain"], epilog=epilog(
    'ce-check explain --logits "2.0,1.0,0.1" --label 0',
    "ce-check explain logits.npy labels.npy --row 3 --steps",
    'ce-check explain --kind binary --logits 1.5 --label 1 --compare-mse'))
@guarded
def explain(logits_file: LogitsArg = None, labels_file: LabelsArg = None, logits_text: LogitsOpt = None,
            label: LabelOpt = None, target: TargetOpt = None, row: RowOpt = None,
            kind: KindOpt = Kind.multiclass, compare_mse_flag: CompareMseOpt = False,
            steps: StepsOpt = False, entry: EntryOpt = None, plot: PlotOpt = None, seed: SeedOpt = 0,
            json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """The derivation of dC/dz = a - y on one sample of your numbers: softmax, its Jacobian, dC/da,
    the chain-rule product, a - y and finite differences, each step with a check."""
    import numpy as np

    from ce_cli.explain import compare_mse, parse_row, step_curve
    from ce_cli.explain.render import ExplainOutput

    _check_plot_path(plot)
    steps = steps or plot is not None
    _check_choices(logits_file, logits_text, labels_file, label, target, row, entry, steps)
    arrays = load_inputs({"logits": logits_file, "labels": labels_file})
    if logits_text is not None:
        logits, logits_source = parse_numbers(logits_text, "--logits"), "--logits"
        if kind is Kind.binary and logits.size != 1:
            raise CeCheckError(f"--logits: --kind binary explains one logit; got {logits.size} values")
    else:
        logits, logits_source = arrays["logits"], source_name("logits", logits_file)
    row_index = parse_row(row) if row is not None else None
    with np.errstate(all="ignore"):
        sample, expl = _derive(kind, logits, row_index, arrays["labels"], label, target, seed,
                               (logits_source, source_name("labels", labels_file)))
        mse = compare_mse(expl) if compare_mse_flag else None
        curve = step_curve(expl, entry) if steps else None
    output = ExplainOutput(expl, sample.where, sample.row, mse, curve, verbose=verbose)
    if plot is not None:
        _write_plot(output, plot)
    emit(output, json_out=json_out, quiet=quiet)
    raise typer.Exit(ExitCode.OK if output.ok else ExitCode.CHECK_FAILED)


__all__ = ["explain", "parse_numbers"]
