"""The `ce-check` command line: parse, load, call the library, render, exit."""

from __future__ import annotations

import functools
import io
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from typer.core import TyperGroup

from ce_cli import __version__
from ce_cli.check import check_grad, parse_loss_value
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


@app.command(epilog=EPILOG)
@guarded
def grad(
    logits: Annotated[str, typer.Argument(help=LOGITS_HELP, show_default=False)],
    labels: Annotated[str, typer.Argument(help=LABELS_HELP, show_default=False)],
    grad_path: Annotated[Optional[str], typer.Option("--grad", help="Your gradient w.r.t. the logits (any float dtype, the logits' shape).")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="Your loss: a file (scalar, or per-sample with --reduction none) or a number.")] = None,
    weight: Annotated[Optional[str], typer.Option("--weight", help="Class weights, C values (PyTorch's weight=).")] = None,
    reduction: Annotated[Reduction, typer.Option("--reduction", help="mean, sum or none (gradient of the sum).")] = Reduction.mean,
    ignore_index: Annotated[int, typer.Option("--ignore-index", help="Target value that is ignored.")] = -100,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing in [0, 1].")] = 0.0,
    class_axis: Annotated[int, typer.Option("--class-axis", help="Axis of the classes: -1 (last) or 1 for PyTorch's (N, C, d1, ...).")] = -1,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance (default 2*eps of the compared precision).")] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance added to the error floor (default 0).")] = None,
    precision: Annotated[Optional[Precision], typer.Option("--precision", help="Precision your gradient was computed in, if narrower than its storage.")] = None,
    floor_factor: Annotated[Optional[float], typer.Option("--floor-factor", help="k in the error floor k*eps*(...); 0 disables the floor (default 4).")] = None,
    fd: Annotated[FDMode, typer.Option("--fd", help="Finite differences: auto, full, directional, sample or off.")] = FDMode.auto,
    samples: Annotated[int, typer.Option("--samples", help="Entries checked by --fd sample.")] = 256,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed for sampled finite differences.")] = 0,
    worst: Annotated[int, typer.Option("--worst", help="Worst entries shown per check.")] = 5,
    out_grad: Annotated[Optional[Path], typer.Option("--out-grad", help="Write the float64 reference gradient here (.npy).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of tables.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; only the exit code tells.")] = False,
) -> None:
    """Softmax cross-entropy (PyTorch F.cross_entropy semantics): reference loss and gradient in
    float64, proven by finite differences, compared with your gradient and loss."""
    loss_file = loss if loss is not None and (loss == STDIN or Path(loss).exists()) else None
    specs = {"logits": logits, "labels": labels, "grad": grad_path, "loss": loss_file, "weight": weight}
    refuse_overwriting_inputs(out_grad, specs)
    arrays = load_inputs(specs)
    if arrays["weight"] is not None and arrays["weight"].ndim == 2 and 1 in arrays["weight"].shape:
        arrays["weight"] = arrays["weight"].reshape(-1)  # one CSV row or column of C values
    loss_value, loss_atol = arrays["loss"], 0.0
    if loss is not None and loss_file is None:
        loss_value, loss_atol = parse_loss_value(loss)
    sources = {role: source_name(role, spec) for role, spec in specs.items()}
    if loss is not None and loss_file is None:
        sources["loss"] = f"--loss {loss}"
    with np.errstate(all="ignore"):  # over/underflow is expected and handled; no numpy warnings
        report = check_grad(
            arrays["logits"], arrays["labels"], grad=arrays["grad"], loss=loss_value,
            weight=arrays["weight"], reduction=reduction.value, ignore_index=ignore_index,
            label_smoothing=label_smoothing, class_axis=class_axis, rtol=rtol, atol=atol,
            precision=precision.value if precision else None, floor_factor=floor_factor,
            loss_atol=loss_atol, fd=fd.value, samples=samples, seed=seed, worst=worst,
            out_grad=out_grad, sources=sources,
        )
    emit(report, json_out=json_out, quiet=quiet)
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.CHECK_FAILED)


def main() -> None:
    """Console-script entry point."""
    app()
