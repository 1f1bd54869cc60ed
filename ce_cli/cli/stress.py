"""`ce-check stress`: numerical-stability stress tests, registered on the `ce-check` app.

Built-in sweep (textbook softmax CE / sigmoid BCE forms, a report: exit 0), or the user's
implementation: `--impl package.module:function` or `--impl-cmd 'CMD {logits} {labels} {grad}
{loss}'` (exit 1 when a cell fails). The grid and the verdicts come from `ce_cli.stress.sweep`.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ce_cli.cli.app import JsonOpt, QuietOpt, app, guarded
from ce_cli.enums import Reduction
from ce_cli.report.console import drop_stdout, stderr_console, stdout_console
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.stress.runner import (DEFAULT_TIMEOUT, CommandTemplate, command_runner, load_callable,
                                python_runner)
from ce_cli.stress.render import render_stress, stress_to_json
from ce_cli.stress.sweep import (BUILTINS, DTYPE_NAMES, SCENARIOS, Case, Cell, Outcome, StressReport, grid,
                           parse_dtypes, parse_scales, parse_scenarios, python_rerun, run_builtin,
                           run_cells, save_reproducer, shrink)

STRESS_EPILOG = ("Exit codes: the built-in sweep 0 (a report); with --impl or --impl-cmd 0 every "
                 "cell passed, 1 a cell failed; 2 usage error; 3 internal error.")


class Kind(str, Enum):
    multiclass = "multiclass"
    binary = "binary"


def _names(kind: str) -> str:
    return ", ".join(s.name for s in SCENARIOS[kind])


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


@app.command(epilog=STRESS_EPILOG)
@guarded
def stress(
    impl: Annotated[Optional[str], typer.Option("--impl", help=IMPL_HELP, show_default=False)] = None,
    impl_cmd: Annotated[Optional[str], typer.Option("--impl-cmd", help=IMPL_CMD_HELP,
                                                    show_default=False)] = None,
    kind: Annotated[Kind, typer.Option(
        "--kind", help="multiclass (softmax CE) or binary (sigmoid BCE).")] = Kind.multiclass,
    dtypes: Annotated[Optional[str], typer.Option(
        "--dtypes", help="Comma-separated dtypes to run: f16, bf16, f32, f64 (default all; bf16 "
        "needs the optional ml_dtypes package).", show_default=False)] = None,
    scales: Annotated[Optional[str], typer.Option(
        "--scales", help="Comma-separated logit scales (default 1,10,30,100,1e3,1e4).",
        show_default=False)] = None,
    scenarios: Annotated[Optional[str], typer.Option(
        "--scenarios", help=f"Comma-separated scenarios (multiclass: {_names('multiclass')}; "
        f"binary: {_names('binary')}).", show_default=False)] = None,
    reduction: Annotated[Reduction, typer.Option(
        "--reduction", help="What your implementation returns: mean, sum or none (per-sample "
        "losses; the gradient is that of their sum).")] = Reduction.mean,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="Seconds per case before your implementation counts as hung.")] = DEFAULT_TIMEOUT,
    save_failures: Annotated[Optional[Path], typer.Option(
        "--save-failures", help="Write a reproducer folder per failing cell here (inputs, expected "
        "loss and gradient as .npy, command.sh).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the scenarios' logits.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Numerical-stability stress tests: a grid of scenarios x logit scales x dtypes, every cell
    judged against the float64 reference of the same rounded inputs with the tolerance model of
    `grad`. Without --impl/--impl-cmd: the built-in textbook implementations and where each breaks."""
    if impl is not None and impl_cmd is not None:
        raise CeCheckError("--impl and --impl-cmd: give one of them, not both")
    if not (math.isfinite(timeout) and timeout > 0):
        raise CeCheckError(f"--timeout: must be a number of seconds > 0, got {timeout}")
    kind_name, red = kind.value, reduction.value
    dtype_list, notes = parse_dtypes(dtypes)
    scale_list = parse_scales(scales)
    scenario_list = parse_scenarios(kind_name, scenarios)
    if save_failures is not None:
        if save_failures.exists() and not save_failures.is_dir():
            raise CeCheckError(f"--save-failures '{save_failures}': exists and is not a folder")

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="ce-check-stress-") as tmp:
        if impl_cmd is not None:
            template = CommandTemplate.parse(impl_cmd)
            mode = "impl-cmd"
            runner = command_runner(template, Path(tmp), reduction=red, timeout=timeout)

            def rerun(case: Case, folder: Path) -> str:
                # run from where ce-check ran (the command may name files relative to it)
                values = {name: str(folder / f"{name}.npy") for name in ("logits", "labels", "grad", "loss")}
                values.update(dtype=_dtype_name(case.dtype), reduction=red)
                return f"cd {shlex.quote(cwd)} || exit 2\n{shlex.join(template.render(values))}"

            impls = [(_impl_cmd_name(template), runner, rerun)]
        elif impl is not None:
            fn = load_callable(impl)
            mode = "impl"
            impls = [(impl, python_runner(fn, timeout),
                      lambda case, folder: python_rerun(impl, cwd, kind_name, case.dtype, folder))]
        else:
            mode = "builtin"
            impls = [(b.name, run_builtin(b.fn, red),
                      lambda case, folder, spec=b.spec: python_rerun(spec, cwd, kind_name, case.dtype,
                                                                     folder, {"reduction": red}))
                     for b in BUILTINS[kind_name]]

        t0 = time.perf_counter()
        cases, skipped = grid(kind_name, scenario_list, scale_list, dtype_list, seed)
        saved: list[str] = []
        by_name = {name: (run, rerun) for name, run, rerun in impls}

        def on_cell(cell: Cell, case: Case, outcome: Outcome) -> None:
            if save_failures is None or cell.ok:
                return
            run, rerun = by_name[cell.impl]
            small = None if cell.reason == "timeout" else shrink(kind_name, case, cell, run, red)
            note = ""
            if small is not None:
                n_rows = case.logits.shape[0]
                row, case, outcome, cell = small
                note = f"row {row} of the cell's {n_rows} rows, which fails on its own"
            folder = save_reproducer(save_failures, kind_name, red, case, cell, outcome,
                                     functools.partial(rerun, case), note)
            saved.append(str(folder))

        status = _progress(quiet or json_out)
        try:
            cells = run_cells(kind_name, [(n, r) for n, r, _ in impls], cases, red, on_cell=on_cell,
                              progress=status.update if status else None)
        finally:
            if status:
                status.stop()
    report = StressReport(kind_name, mode, tuple(n for n, _, _ in impls), red, dtype_list, scale_list,
                          scenario_list, tuple(cells), tuple(notes + skipped),
                          time.perf_counter() - t0, tuple(saved))
    _emit(report, json_out=json_out, quiet=quiet)
    if mode == "builtin" or report.ok:
        raise typer.Exit(ExitCode.OK)
    raise typer.Exit(ExitCode.CHECK_FAILED)


def _dtype_name(dtype: str) -> str:
    return DTYPE_NAMES[dtype]


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


def _emit(report: StressReport, *, json_out: bool, quiet: bool) -> None:
    if quiet:
        return
    try:
        if json_out:
            sys.stdout.write(stress_to_json(report) + "\n")
            sys.stdout.flush()
        else:
            render_stress(report, stdout_console())
    except BrokenPipeError:
        drop_stdout()
