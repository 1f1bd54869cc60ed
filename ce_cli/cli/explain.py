"""The `ce-check explain` command: one sample, the derivation of dC/dz = a - y step by step.

Registered on the shared `app` by the import at the end of ce_cli/cli.py. Parses, loads, calls
ce_cli.explain, renders with ce_cli.explain.render, exits 0 (every step checked out), 1 (a step
disagrees) or 2 (usage or input error).
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from ce_cli.cli.app import EPILOG, JsonOpt, QuietOpt, app, guarded, load_inputs, source_name
from ce_cli.report.console import drop_stdout, stdout_console
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.explain import (
    binary_sample,
    compare_mse,
    explain_binary,
    explain_softmax,
    parse_row,
    softmax_sample,
    step_curve,
)
from ce_cli.explain.render import explanation_to_dict, render_explanation, to_json, write_svg


class Kind(str, Enum):
    multiclass = "multiclass"
    binary = "binary"


def parse_numbers(text: str, flag: str) -> np.ndarray:
    """Comma and/or space separated numbers ('2.0,1.0,0.1', '2 1 0.1', '-inf' allowed)."""
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


@app.command(epilog=EPILOG)
@guarded
def explain(
    logits_file: Annotated[Optional[str], typer.Argument(
        metavar="LOGITS", show_default=False,
        help="Logits file (.npy, .npz, CSV/TSV or '-'): (C,), (N, C) or (B, T, V), class axis last; "
             "with --kind binary any shape. Or give --logits inline.")] = None,
    labels_file: Annotated[Optional[str], typer.Argument(
        metavar="LABELS", show_default=False,
        help="Labels file: class indices with the batch shape, or probability rows with the logits' "
             "shape (binary: labels in [0, 1] with the logits' shape). Or give --label/--target.")] = None,
    logits_text: Annotated[Optional[str], typer.Option(
        "--logits", help="Inline logits of one sample, comma or space separated: \"2.0,1.0,0.1\" "
                         "(binary: one number).", show_default=False)] = None,
    label: Annotated[Optional[int], typer.Option(
        "--label", help="The target class index (binary: 0 or 1).", show_default=False)] = None,
    target: Annotated[Optional[str], typer.Option(
        "--target", help="Target probabilities, comma separated (binary: one soft label in [0, 1]).",
        show_default=False)] = None,
    row: Annotated[Optional[str], typer.Option(
        "--row", help="Which sample of a LOGITS file: a flat row index I, or an index into the batch "
                      "shape such as 1,2 for (B, T, V) (binary: into the logits' shape).",
        show_default=False)] = None,
    kind: Annotated[Kind, typer.Option(
        "--kind", help="multiclass (softmax CE) or binary (sigmoid BCE, one logit).")] = Kind.multiclass,
    compare_mse_flag: Annotated[bool, typer.Option(
        "--compare-mse", help="Contrast the MSE + sigmoid error (a - y) s'(z) with CE's a - y, with a "
                              "saturation table.")] = False,
    steps: Annotated[bool, typer.Option(
        "--steps", help="Finite-difference error against the step h (1e-1 ... 1e-12) for one entry.")] = False,
    entry: Annotated[Optional[int], typer.Option(
        "--entry", help="The class whose derivative --steps probes (default: the target).",
        show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write the --steps table with its bars to FILE.svg (implies --steps).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, help="Seed for the random classes probed when C > 1024.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The derivation of dC/dz = a - y on one sample of your numbers: softmax, its Jacobian, dC/da,
    the chain-rule product, a - y and finite differences, each step with a check."""
    _check_plot_path(plot)
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
    if entry is not None and not (steps or plot is not None):
        raise CeCheckError("--entry chooses the entry of --steps; add --steps")

    arrays = load_inputs({"logits": logits_file, "labels": labels_file})
    logits = arrays["logits"] if logits_file is not None else parse_numbers(logits_text, "--logits")
    logits_source = source_name("logits", logits_file) if logits_file is not None else "--logits"
    labels_source = source_name("labels", labels_file)
    row_index = parse_row(row) if row is not None else None

    if kind is Kind.binary and logits_text is not None and logits.size != 1:
        raise CeCheckError(f"--logits: --kind binary explains one logit; got {logits.size} values")
    with np.errstate(all="ignore"):
        if kind is Kind.binary:
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
            sample = binary_sample(logits, row_index, labels=arrays["labels"], label=soft,
                                   logits_source=logits_source, labels_source=labels_source)
            expl = explain_binary(sample.z, sample.target)
        else:
            probs = parse_numbers(target, "--target") if target is not None else None
            sample = softmax_sample(logits, row_index, labels=arrays["labels"], label=label, target=probs,
                                    logits_source=logits_source, labels_source=labels_source)
            expl = explain_softmax(sample.z, label=sample.label, target=sample.target, seed=seed)
        mse = compare_mse(expl) if compare_mse_flag else None
        curve = step_curve(expl, entry) if (steps or plot is not None) else None
    checks = expl.checks + (mse.checks if mse else ()) + (curve.checks if curve else ())
    ok = all(c.ok for c in checks)

    if plot is not None:
        title = f"ce-check explain --steps ({sample.where})"
        try:
            write_svg(curve, plot, binary=kind is Kind.binary, title=title)
        except OSError as exc:
            raise CeCheckError(f"--plot '{plot}': cannot write ({exc.strerror or exc})") from None

    if not quiet:
        try:
            if json_out:
                data = explanation_to_dict(expl, where=sample.where, row=sample.row, checks=checks,
                                           mse=mse, curve=curve)
                sys.stdout.write(to_json(data) + "\n")
                sys.stdout.flush()
            else:
                render_explanation(expl, stdout_console(), where=sample.where, checks=checks, mse=mse,
                                   curve=curve)
        except BrokenPipeError:
            drop_stdout()
    raise typer.Exit(ExitCode.OK if ok else ExitCode.CHECK_FAILED)


__all__ = ["explain", "parse_numbers"]
