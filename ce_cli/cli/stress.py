"""`ce-check stress`: numerical-stability stress tests, registered on the `ce-check` app.

Built-in sweep (textbook softmax CE / sigmoid BCE forms, a report: exit 0), or the user's
implementation: `--impl package.module:function` or `--impl-cmd 'CMD {logits} {labels} {grad}
{loss}'` (exit 1 when a cell fails). The grid and the verdicts come from `ce_cli.stress`.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ce_cli.cli.app import COMMANDS, JsonOpt, QuietOpt, app, epilog, guarded
from ce_cli.enums import Kind, Reduction
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.report.console import stderr_console
from ce_cli.report.emit import emit

if TYPE_CHECKING:  # ce_cli.stress (numpy) loads in the command: `--help` needs neither
    from ce_cli.stress.grid import Runner, StressReport
    from ce_cli.stress.judge import Case
    from ce_cli.stress.reproducer import Rerun
    from ce_cli.stress.runner import CommandTemplate
    from ce_cli.stress.scenarios import Scenario

# The help's copies of ce_cli.stress's scenario names and runner timeout (importing those
# modules imports numpy); tests/test_startup.py proves they agree.
SCENARIO_NAMES = {"multiclass": ("spread", "far-label", "ties", "dominant", "masked", "equal",
                                 "two-class", "ignored", "vocab"),
                  "binary": ("spread", "saturated", "soft", "many")}
DEFAULT_TIMEOUT = 30.0

STRESS_EPILOG = ("Exit codes: the built-in sweep 0 (a report); with --impl or --impl-cmd 0 every "
                 "cell passed, 1 a cell failed; 2 usage error; 3 internal error.")


def _names(kind: str) -> str:
    return ", ".join(SCENARIO_NAMES[kind])


IMPL_HELP = ("Your implementation: package.module:function, called as fn(logits, labels) -> (loss, grad) "
             "with logits in the dtype under test and int64 labels (float targets in that dtype for "
             "--kind binary). The current directory is importable.")
IMPL_CMD_HELP = ("Your implementation as a program: 'CMD {logits} {labels} {grad} {loss}' (also {dtype}, "
                 "{reduction}); .npy files in a temporary folder, not run through a shell. {loss} is "
                 "optional. bfloat16 inputs are written as float32.")


def _impl_cmd_name(template: CommandTemplate) -> str:
    words = [Path(t).name for t in template.argv[:2] if "{" not in t]
    name = " ".join(words) or template.argv[0]
    return name if len(name) <= 40 else name[:37] + "..."


@app.command(short_help=COMMANDS["stress"], epilog=epilog(
    "ce-check stress",
    "ce-check stress --impl mypkg.losses:cross_entropy --dtypes f16,f32",
    "ce-check stress --impl-cmd 'python ce.py {logits} {labels} {grad} {loss}'",
    exit_codes=STRESS_EPILOG))
@guarded
def stress(
    impl: Annotated[Optional[str], typer.Option("--impl", metavar="MODULE:FUNCTION", help=IMPL_HELP, show_default=False)] = None,
    impl_cmd: Annotated[Optional[str], typer.Option("--impl-cmd", metavar="COMMAND", help=IMPL_CMD_HELP,
                                                    show_default=False)] = None,
    kind: Annotated[Kind, typer.Option(
        "--kind", metavar="multiclass|binary", help="multiclass (softmax CE) or binary (sigmoid BCE).")] = Kind.multiclass,
    dtypes: Annotated[Optional[str], typer.Option(
        "--dtypes", metavar="LIST", help="Comma-separated dtypes to run: f16, bf16, f32, f64 (default all; bf16 "
        "needs the optional ml_dtypes package).", show_default=False)] = None,
    scales: Annotated[Optional[str], typer.Option(
        "--scales", metavar="LIST", help="Comma-separated logit scales (default 1,10,30,100,1e3,1e4).",
        show_default=False)] = None,
    scenarios: Annotated[Optional[str], typer.Option(
        "--scenarios", metavar="LIST", help=f"Comma-separated scenarios (multiclass: {_names('multiclass')}; "
        f"binary: {_names('binary')}).", show_default=False)] = None,
    reduction: Annotated[Reduction, typer.Option(
        "--reduction", metavar="mean|sum|none", help="What your implementation returns: mean, sum or none (per-sample "
        "losses; the gradient is that of their sum).")] = Reduction.mean,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", help="Seconds per case before your implementation counts as hung.")] = DEFAULT_TIMEOUT,
    save_failures: Annotated[Optional[Path], typer.Option(
        "--save-failures", metavar="FOLDER", help="Write a reproducer folder per failing cell here (inputs, expected "
        "loss and gradient as .npy, command.sh).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, metavar="SEED", help="Seed of the scenarios' logits.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Spell out each cell's first failure (scale and reason) and its "
        "worst error.")] = False,
) -> None:
    """Numerical-stability stress tests: a grid of scenarios x logit scales x dtypes, every cell
    judged against the float64 reference of the same rounded inputs with the tolerance model of
    `grad`. Without --impl/--impl-cmd: the built-in textbook implementations and where each breaks."""
    from ce_cli.stress.dtypes import parse_dtypes
    from ce_cli.stress.render import StressOutput
    from ce_cli.stress.scenarios import parse_scales, parse_scenarios

    _check_options(impl, impl_cmd, timeout)
    dtype_list, notes = parse_dtypes(dtypes)
    scale_list = parse_scales(scales)
    grid_spec = _Grid(kind.value, reduction.value, parse_scenarios(kind.value, scenarios),
                      scale_list, dtype_list, tuple(notes), seed)
    _check_save_folder(save_failures)
    with tempfile.TemporaryDirectory(prefix="ce-check-stress-") as tmp:
        mode, impls = _implementations(impl, impl_cmd, grid_spec, timeout, Path(tmp))
        report = _sweep(grid_spec, mode, impls, save_failures, silent=quiet or json_out)
    emit(StressOutput(report, verbose=verbose), json_out=json_out, quiet=quiet)
    if mode == "builtin" or report.ok:
        raise typer.Exit(ExitCode.OK)
    raise typer.Exit(ExitCode.CHECK_FAILED)


def _check_options(impl: str | None, impl_cmd: str | None, timeout: float) -> None:
    if impl is not None and impl_cmd is not None:
        raise CeCheckError("--impl and --impl-cmd: give one of them, not both")
    if not (math.isfinite(timeout) and timeout > 0):
        raise CeCheckError(f"--timeout: must be a number of seconds > 0, got {timeout}")


def _check_save_folder(save_failures: Path | None) -> None:
    if save_failures is not None and save_failures.exists() and not save_failures.is_dir():
        raise CeCheckError(f"--save-failures '{save_failures}': exists and is not a folder")


@dataclass(frozen=True)
class _Grid:
    """The parsed options that define the grid."""

    kind: str
    reduction: str
    scenarios: tuple[Scenario, ...]
    scales: tuple[float, ...]
    dtypes: tuple[str, ...]
    notes: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class _Impl:
    """An implementation under test: its name in the grid, how to run a case in-process, and the
    shell lines that rerun it on a reproducer folder."""

    name: str
    run: Runner
    rerun: Rerun


def _implementations(impl: str | None, impl_cmd: str | None, g: _Grid, timeout: float,
                     tmp: Path) -> tuple[str, list[_Impl]]:
    """The mode (impl-cmd, impl or builtin) and its implementations."""
    from ce_cli.stress.builtins import BUILTINS
    from ce_cli.stress.grid import run_builtin
    from ce_cli.stress.runner import load_callable, python_runner

    cwd = os.getcwd()
    if impl_cmd is not None:
        return "impl-cmd", [_command_impl(impl_cmd, g.reduction, timeout, tmp, cwd)]
    if impl is not None:
        fn = load_callable(impl)
        return "impl", [_Impl(impl, python_runner(fn, timeout), _python_rerun(impl, cwd, g.kind))]
    return "builtin", [_Impl(b.name, run_builtin(b.fn, g.reduction),
                             _python_rerun(b.spec, cwd, g.kind, {"reduction": g.reduction}))
                       for b in BUILTINS[g.kind]]


def _python_rerun(spec: str, cwd: str, kind: str, kwargs: dict | None = None) -> Rerun:
    from ce_cli.stress.reproducer import python_rerun

    def rerun(case: Case, folder: Path) -> str:
        return python_rerun(spec, cwd, kind, case.dtype, folder, kwargs)

    return rerun


def _command_impl(impl_cmd: str, red: str, timeout: float, tmp: Path, cwd: str) -> _Impl:
    from ce_cli.stress.dtypes import DTYPE_NAMES
    from ce_cli.stress.runner import CommandTemplate, command_runner

    template = CommandTemplate.parse(impl_cmd)

    def rerun(case: Case, folder: Path) -> str:
        # run from where ce-check ran (the command may name files relative to it)
        values = {name: str(folder / f"{name}.npy") for name in ("logits", "labels", "grad", "loss")}
        values.update(dtype=DTYPE_NAMES[case.dtype], reduction=red)
        return f"cd {shlex.quote(cwd)} || exit 2\n{shlex.join(template.render(values))}"

    return _Impl(_impl_cmd_name(template), command_runner(template, tmp, reduction=red,
                                                          timeout=timeout), rerun)


def _sweep(g: _Grid, mode: str, impls: list[_Impl], save_failures: Path | None, *,
           silent: bool) -> StressReport:
    """Every cell of the grid for every implementation; reproducers of the failing ones."""
    from ce_cli.stress.grid import StressReport, grid, run_cells
    from ce_cli.stress.reproducer import FailureSaver

    t0 = time.perf_counter()
    cases, skipped = grid(g.kind, g.scenarios, g.scales, g.dtypes, g.seed)
    saver = (None if save_failures is None else
             FailureSaver(save_failures, g.kind, g.reduction, {i.name: (i.run, i.rerun) for i in impls}))
    status = _progress(silent)
    try:
        cells = run_cells(g.kind, [(i.name, i.run) for i in impls], cases, g.reduction, on_cell=saver,
                          progress=status.update if status else None)
    finally:
        if status:
            status.stop()
    return StressReport(g.kind, mode, tuple(i.name for i in impls), g.reduction, g.dtypes, g.scales,
                        g.scenarios, tuple(cells), g.notes + tuple(skipped),
                        time.perf_counter() - t0, tuple(saver.saved) if saver is not None else ())


class _Status:
    """A transient 'cell i/n' line on a terminal's stderr."""

    def __init__(self) -> None:
        self._status = stderr_console().status("stress: starting")
        self._status.start()
        self._last = 0.0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last > 0.1 or done == total:
            self._last = now
            self._status.update(f"stress: {done}/{total} cells")

    def stop(self) -> None:
        self._status.stop()


def _progress(silent: bool) -> _Status | None:
    if silent or not sys.stderr.isatty():
        return None
    return _Status()
