"""The `ce-check` command line: parse, load, call the library, render, exit."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from typer.core import TyperGroup

from ce_cli import __version__
from ce_cli.check import check_binary, check_grad, parse_loss_value
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.loading import STDIN, load_array
from ce_cli.render import render_table, to_json

# Click's exception classes, from wherever this Typer takes Click (vendored or the package)
_click_exceptions = sys.modules[typer.BadParameter.__module__]

EPILOG = ("Exit codes: 0 every check passed; 1 a check failed; 2 usage or input error; "
          "3 internal error.")


class OneLineErrors(TyperGroup):
    """Usage errors print one line, `ce-check: error: ...`, exit 2, like input errors."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click_exceptions.ClickException as exc:
            no_args_help = getattr(_click_exceptions, "NoArgsIsHelpError", ())
            if isinstance(exc, _click_exceptions.UsageError) and not isinstance(exc, no_args_help):
                hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
                fail_input(exc.format_message() + hint)
            else:
                exc.show()
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else ExitCode.OK)


app = typer.Typer(
    name="ce-check",
    cls=OneLineErrors,
    help="Verify cross-entropy losses and gradients against a float64 reference, with proof.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Reduction(str, Enum):
    mean = "mean"
    sum = "sum"
    none = "none"


class FDMode(str, Enum):
    auto = "auto"
    full = "full"
    directional = "directional"
    sample = "sample"
    off = "off"


class Precision(str, Enum):
    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"
    f64 = "f64"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ce-check {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Verify cross-entropy losses and gradients against a float64 reference, with proof."""


class PipeConsole(Console):
    """Rich exits 1 on a closed pipe (`| head`), which reads as a failed check; raise instead."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def _color_system() -> str | None:
    """NO_COLOR (https://no-color.org) turns off every escape code, bold included."""
    return None if os.environ.get("NO_COLOR") else "auto"


def stdout_console() -> Console:
    return PipeConsole(highlight=False, soft_wrap=False, emoji=False, color_system=_color_system())


def stderr_console() -> Console:
    return PipeConsole(stderr=True, highlight=False, emoji=False, soft_wrap=True,
                       color_system=_color_system())


def fail_input(message: str) -> typer.Exit:
    stderr_console().print(f"ce-check: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(ExitCode.USAGE_OR_INPUT_ERROR)


def load_inputs(specs: dict[str, str | None]) -> dict:
    """Load each named input; at most one may come from stdin."""
    from_stdin = [role for role, spec in specs.items() if spec == STDIN]
    if len(from_stdin) > 1:
        raise CeCheckError(f"only one input can be '-' (stdin); got {', '.join(from_stdin)}")
    return {role: (load_array(spec, what=role) if spec is not None else None)
            for role, spec in specs.items()}


def refuse_overwriting_inputs(out_grad: Path | None, specs: dict[str, str | None]) -> None:
    """--out-grad must not name an input: inputs are memory-mapped while it is written."""
    if out_grad is None or not out_grad.exists():
        return
    for role, spec in specs.items():
        if spec is None or spec == STDIN:
            continue
        path = Path(spec) if Path(spec).exists() else Path(spec.rpartition(":")[0] or spec)
        try:
            same = path.exists() and os.path.samefile(path, out_grad)
        except OSError:
            same = False
        if same:
            raise CeCheckError(f"--out-grad '{out_grad}': is the {role} file; writing it would destroy "
                               "the input")


def source_name(role: str, spec: str | None) -> str:
    if spec is None:
        return role
    return f"{role} from stdin" if spec == STDIN else f"{role} file '{spec}'"


def emit(report, *, json_out: bool, quiet: bool) -> None:
    if quiet:
        return
    try:
        if report.warnings:
            err = stderr_console()
            for w in report.warnings:
                err.print(f"ce-check: warning: {w}", markup=False, soft_wrap=True)
        if json_out:
            sys.stdout.write(to_json(report) + "\n")
            sys.stdout.flush()
        else:
            render_table(report, stdout_console())
    except BrokenPipeError:
        _drop_stdout()


def _drop_stdout() -> None:
    """The reader closed the pipe: send what is left to /dev/null; the exit code still tells."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def guarded(command):
    """Input errors exit 2 with one line; anything unexpected exits 3, never 1 (a failed check)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except CeCheckError as exc:
            raise fail_input(str(exc)) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(ExitCode.OK) from None
        except MemoryError:
            stderr_console().print("ce-check: error: out of memory", markup=False, soft_wrap=True)
            raise typer.Exit(ExitCode.INTERNAL_ERROR) from None
        except Exception as exc:
            if os.environ.get("CE_CHECK_DEBUG"):
                raise
            stderr_console().print(
                f"ce-check: internal error: {type(exc).__name__}: {exc} "
                "(set CE_CHECK_DEBUG=1 for the traceback; please report it)", markup=False,
                soft_wrap=True)
            raise typer.Exit(ExitCode.INTERNAL_ERROR) from None

    return wrapper


LOGITS_HELP = "Logits: .npy, .npz (FILE.npz:KEY), CSV/TSV, or '-' for stdin. Class axis last by default."
LABELS_HELP = ("Labels: class indices with the batch shape, or probability rows with the logits' shape "
               "(one-hot or soft targets).")


GradOpt = Annotated[Optional[str], typer.Option(
    "--grad", help="Your gradient w.r.t. the logits (any float dtype, the logits' shape).")]
LossOpt = Annotated[Optional[str], typer.Option(
    "--loss", help="Your loss: a file (scalar, or per-sample with --reduction none) or a number.")]
ReductionOpt = Annotated[Reduction, typer.Option(
    "--reduction", help="mean, sum or none (gradient of the sum).")]
RtolOpt = Annotated[Optional[float], typer.Option(
    "--rtol", help="Relative tolerance (default 2*eps of the compared precision).")]
AtolOpt = Annotated[Optional[float], typer.Option(
    "--atol", help="Absolute tolerance added to the error floor (default 0).")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option(
    "--precision", help="Precision your gradient was computed in, if narrower than its storage.")]
FloorOpt = Annotated[Optional[float], typer.Option(
    "--floor-factor", help="k in the error floor k*eps*(...); 0 disables the floor (default 4).")]
FDOpt = Annotated[FDMode, typer.Option(
    "--fd", help="Finite differences: auto, full, directional, sample or off.")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Entries checked by --fd sample.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed for sampled finite differences.")]
WorstOpt = Annotated[int, typer.Option("--worst", help="Worst entries shown per check.")]
OutGradOpt = Annotated[Optional[Path], typer.Option(
    "--out-grad", help="Write the float64 reference gradient here (.npy).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; only the exit code tells.")]


PROGRESS_AFTER = 2.0  # seconds: shorter runs never show a bar


@contextlib.contextmanager
def progress_bar(enabled: bool):
    """A Rich progress bar on stderr for runs past PROGRESS_AFTER seconds, only on a terminal.

    Yields the `progress(done_rows, total_rows)` callback for check_grad/check_binary.
    """
    console = stderr_console()
    if not enabled or not console.is_terminal:
        yield None
        return
    start = time.monotonic()
    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            if time.monotonic() - start < PROGRESS_AFTER:
                return
            from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeRemainingColumn)

            bar = Progress(TextColumn("ce-check"), BarColumn(), TaskProgressColumn(),
                           TimeRemainingColumn(), console=console, transient=True)
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task("rows", total=total)
        state["bar"].update(state["task"], completed=done)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()


def file_or_number(spec: str | None) -> bool:
    """True when `spec` names an input (a path or '-'), False for a number typed instead."""
    return spec is not None and (spec == STDIN or Path(spec).exists()
                                 or Path(spec.rpartition(":")[0] or spec).exists())


def run_check(check, specs: dict[str, str | None], *, loss: str | None, out_grad: Path | None,
              json_out: bool, quiet: bool, vectors: tuple[str, ...] = (), numbers: tuple[str, ...] = (),
              **options) -> None:
    """Load the inputs, call `check` (check_grad or check_binary), render, exit with the verdict.

    `vectors` are roles whose one-row or one-column CSV is flattened to C values; `numbers` are
    roles that may be typed as a number instead of a file.
    """
    specs = dict(specs, loss=loss if file_or_number(loss) else None)
    typed = {role: specs[role] for role in numbers if specs.get(role) is not None
             and not file_or_number(specs[role])}
    files = {role: (None if role in typed else spec) for role, spec in specs.items()}
    refuse_overwriting_inputs(out_grad, files)
    arrays = load_inputs(files)
    for role in vectors:
        arr = arrays.get(role)
        if arr is not None and arr.ndim == 2 and 1 in arr.shape:
            arrays[role] = arr.reshape(-1)  # one CSV row or column of C values
    for role, text in typed.items():
        arrays[role], _ = parse_loss_value(text, flag=f"--{role.replace('_', '-')}")
    loss_atol = 0.0
    if loss is not None and specs["loss"] is None:
        arrays["loss"], loss_atol = parse_loss_value(loss)
    sources = {role: source_name(role, spec) for role, spec in files.items()}
    sources.update({role: f"--{role.replace('_', '-')} {text}" for role, text in typed.items()})
    if loss is not None and specs["loss"] is None:
        sources["loss"] = f"--loss {loss}"
    inputs = {role: arr for role, arr in arrays.items() if role not in ("logits", "labels")}
    with np.errstate(all="ignore"), progress_bar(enabled=not quiet) as progress:
        # over/underflow is expected and handled: no numpy warnings
        report = check(arrays["logits"], arrays["labels"], **inputs, loss_atol=loss_atol,
                       out_grad=out_grad, sources=sources, progress=progress, **options)
    emit(report, json_out=json_out, quiet=quiet)
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.CHECK_FAILED)


@app.command(epilog=EPILOG)
@guarded
def grad(
    logits: Annotated[str, typer.Argument(help=LOGITS_HELP, show_default=False)],
    labels: Annotated[str, typer.Argument(help=LABELS_HELP, show_default=False)],
    grad_path: GradOpt = None,
    loss: LossOpt = None,
    weight: Annotated[Optional[str], typer.Option("--weight", help="Class weights, C values (PyTorch's weight=).")] = None,
    reduction: ReductionOpt = Reduction.mean,
    ignore_index: Annotated[int, typer.Option("--ignore-index", help="Target value that is ignored.")] = -100,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing in [0, 1].")] = 0.0,
    class_axis: Annotated[int, typer.Option("--class-axis", help="Axis of the classes: -1 (last) or 1 for PyTorch's (N, C, d1, ...).")] = -1,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    precision: PrecisionOpt = None,
    floor_factor: FloorOpt = None,
    fd: FDOpt = FDMode.auto,
    samples: SamplesOpt = 256,
    seed: SeedOpt = 0,
    worst: WorstOpt = 5,
    out_grad: OutGradOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Softmax cross-entropy (PyTorch F.cross_entropy semantics): reference loss and gradient in
    float64, proven by finite differences, compared with your gradient and loss."""
    run_check(
        check_grad, {"logits": logits, "labels": labels, "grad": grad_path, "weight": weight},
        loss=loss, out_grad=out_grad, json_out=json_out, quiet=quiet, vectors=("weight",),
        reduction=reduction.value, ignore_index=ignore_index, label_smoothing=label_smoothing,
        class_axis=class_axis, rtol=rtol, atol=atol, precision=precision.value if precision else None,
        floor_factor=floor_factor, fd=fd.value, samples=samples, seed=seed, worst=worst,
    )


BINARY_LABELS_HELP = ("Labels in [0, 1] (soft labels allowed) with the logits' shape; with --two-class, "
                      "class indices 0/1 or probability pairs.")


@app.command(epilog=EPILOG)
@guarded
def binary(
    logits: Annotated[str, typer.Argument(help="Logits of any shape (multi-label (N, K) included): "
                                          ".npy, .npz, CSV/TSV or '-'.", show_default=False)],
    labels: Annotated[str, typer.Argument(help=BINARY_LABELS_HELP, show_default=False)],
    grad_path: GradOpt = None,
    loss: LossOpt = None,
    weight: Annotated[Optional[str], typer.Option("--weight", help="Element weights, broadcast to the logits (PyTorch's weight=).")] = None,
    pos_weight: Annotated[Optional[str], typer.Option("--pos-weight", help="Positive-class weight: a file of K values (broadcast along the last axis) or a number.")] = None,
    reduction: ReductionOpt = Reduction.mean,
    two_class: Annotated[bool, typer.Option("--two-class", help="LOGITS are (..., 2) softmax logits: check them as multiclass and show CE([z0, z1]) = BCE(z1 - z0).")] = False,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    precision: PrecisionOpt = None,
    floor_factor: FloorOpt = None,
    fd: FDOpt = FDMode.auto,
    samples: SamplesOpt = 256,
    seed: SeedOpt = 0,
    worst: WorstOpt = 5,
    out_grad: OutGradOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sigmoid binary cross-entropy (PyTorch BCEWithLogitsLoss semantics): reference loss and
    gradient in float64, proven by finite differences, compared with yours, plus the two-class
    bridge (softmax CE over [0, z] equals BCE on z)."""
    run_check(
        check_binary, {"logits": logits, "labels": labels, "grad": grad_path, "weight": weight,
                       "pos_weight": pos_weight},
        loss=loss, out_grad=out_grad, json_out=json_out, quiet=quiet, vectors=("pos_weight",),
        numbers=("pos_weight",), reduction=reduction.value, two_class=two_class, rtol=rtol,
        atol=atol, precision=precision.value if precision else None, floor_factor=floor_factor,
        fd=fd.value, samples=samples, seed=seed, worst=worst,
    )


CORE_COMMANDS = ("grad", "binary")


def main() -> None:
    """Console-script entry point.

    `grad` and `binary` run without importing the other commands (~70 ms of start-up, a
    twentieth of a language-model-sized check); any other invocation registers them all.
    """
    if sys.argv[1:2] and sys.argv[1] in CORE_COMMANDS:
        app(prog_name="ce-check")
        return
    register_all_commands()
    app(prog_name="ce-check")


def register_all_commands() -> None:
    """Import the command modules beyond `grad` and `binary`; each registers itself on `app`."""
    from ce_cli import cli_batch, cli_explain, cli_stress  # noqa: F401


