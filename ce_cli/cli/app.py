"""The `ce-check` command line: parse, load, call the library, render, exit."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from ce_cli import __version__
from ce_cli.enums import FDMode, Precision, Reduction
from ce_cli.errors import CeCheckError
from ce_cli.exitcodes import ExitCode
from ce_cli.io.limits import fd_full_cost, fd_full_refusal, one_line, quoted
from ce_cli.report.console import drop_stdout, ensure_std_streams, stderr_console
from ce_cli.report.emit import emit

if TYPE_CHECKING:  # numpy, the loaders and the library load in the commands: `--help` needs none
    from ce_cli.io.inputs import InputSpec
    from ce_cli.verify.options import CheckOptions
    from ce_cli.verify.results import Report

# Click's exception classes, from wherever this Typer takes Click (vendored or the package)
_click_exceptions = sys.modules[typer.BadParameter.__module__]

EPILOG = ("Exit codes: 0 every check passed; 1 a check failed; 2 usage or input error; "
          "3 internal error.")


def epilog(*examples: str, exit_codes: str = EPILOG) -> str:
    """A command's epilog: its examples, one a line (Click keeps `\\b` paragraphs as they are),
    then the exit codes."""
    lines = "\n".join(f"  {e}" for e in examples)
    return f"\b\nExamples:\n{lines}\n\n{exit_codes}"


# The commands in the order `ce-check --help` lists them, with the one line it shows for each
# (each command module passes its line as short_help). Command NAME lives in ce_cli/cli/NAME.py
# and is built only when invoked: the list is written from here (building all six took ~20 ms of
# every `--help`).
COMMANDS = {
    "grad": "Softmax cross-entropy: check your loss and gradient.",
    "binary": "Sigmoid binary cross-entropy: check loss and gradient.",
    "linear": "Fused linear cross-entropy: check dL/dH, dL/dW, dL/db.",
    "explain": "Derive dC/dz = a - y step by step on one sample.",
    "stress": "Numerical-stability sweep: scenarios x scales x dtypes.",
    "batch": "Run every case of a JSON-lines manifest (for CI).",
}


def build_command(name: str) -> Any:
    """The Click command `name` of COMMANDS, built as Typer builds a group's commands (importing
    its module registers it on `app`)."""
    importlib.import_module(f"ce_cli.cli.{name}")
    for info in app.registered_commands:
        if info.callback and (info.name or typer.main.get_command_name(info.callback.__name__)) == name:
            return typer.main.get_command_from_info(
                info, pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=app.rich_markup_mode)
    raise LookupError(f"ce_cli.cli.{name} registers no command {name!r}")


class LazyCommands(MutableMapping[str, Any]):
    """A group's commands by name: those built, then those of COMMANDS, built on first look-up.
    Listing the names (`ce-check --help`, a mistyped command's "did you mean") builds none."""

    def __init__(self, built: Mapping[str, Any]) -> None:
        self._built = dict(built)
        self._names = list(dict.fromkeys([*COMMANDS, *self._built]))

    def is_built(self, name: str) -> bool:
        return name in self._built

    def short_help(self, name: str, limit: int) -> str:
        """The line the group's help shows for `name`, without building it."""
        return self._built[name].get_short_help_str(limit) if name in self._built else COMMANDS[name]

    def __getitem__(self, name: str) -> Any:
        if name not in self._built and name in COMMANDS:
            self._built[name] = build_command(name)
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._built[name] = command
        if name not in self._names:
            self._names.append(name)

    def __delitem__(self, name: str) -> None:
        self._names.remove(name)
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class OneLineErrors(TyperGroup):
    """Usage errors print one line, `ce-check: error: ...`, exit 2, like input errors (and with
    --json, the error object on stdout too). Commands are built when invoked (LazyCommands)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = LazyCommands(self.commands)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Click's command list, each line from LazyCommands.short_help (building none)."""
        commands = self.commands
        assert isinstance(commands, LazyCommands)
        names = [name for name in self.list_commands(ctx)
                 if not (commands.is_built(name) and commands[name].hidden)]
        if names:
            limit = formatter.width - 6 - max(len(name) for name in names)
            with formatter.section("Commands"):
                formatter.write_dl([(name, commands.short_help(name, limit)) for name in names])

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        if not standalone_mode:
            return super().main(*args, **kwargs)
        argv = list(args[0] if args and args[0] is not None else kwargs.get("args") or sys.argv[1:])
        try:
            code = super().main(*args, **kwargs)
        except _click_exceptions.ClickException as exc:
            no_args_help = getattr(_click_exceptions, "NoArgsIsHelpError", ())
            if isinstance(exc, _click_exceptions.UsageError) and not isinstance(exc, no_args_help):
                hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
                fail_input(usage_message(exc) + hint, code="usage", json_out="--json" in argv)
            else:
                exc.show()
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else ExitCode.OK)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            plain_arguments(command)
        return command


def plain_arguments(command: Any) -> None:
    """Arguments with a metavar show as `LOGITS` in the usage line (`[LOGITS]` when optional),
    not `{LOGITS}`, and without a `<str>` type in the help (the help text says what it is)."""
    for param in command.params:
        if param.param_type_name != "argument" or param.metavar is None:
            continue
        shown = param.metavar if param.required else f"[{param.metavar}]"
        if hasattr(param, "_usage_display_name"):  # Typer >= 0.29
            param._usage_display_name = lambda shown=shown: shown
            param.display_type_rich = lambda ctx=None: None
        else:  # Typer < 0.29 names the argument in make_metavar(ctx, usage=...)
            param.make_metavar = (lambda ctx=None, usage=False, shown=shown, name=param.metavar:
                                  shown if usage else name)


# How Typer words a bad value. Typer >= 0.29 validates through pydantic ("Value error, 'x' is not
# one of ...", "Input should be a valid integer"); earlier Typer through Click ("'x' is not one of
# 'a', 'b'", "'x' is not a valid int", "-1 is not in the range x>=0"). Both read the same here.
_CHOICE = re.compile(r"^(?:Value error, )?'(.*)' is not one of (.*?)\.?$")
_SHOULD = re.compile(r"^Input should be (.*?)(?:, unable to .*)?\.?$")
_NOT_VALID = re.compile(r"^'.*' is not a valid (\w+)(?:\..*)?$")
_NOT_IN_RANGE = re.compile(r"^.* is not in the range (.*?)\.?$")
_PLAIN_SHOULD = {"a valid integer": "a whole number", "a valid int": "a whole number",
                 "a valid number": "a number", "a valid float": "a number",
                 "a valid boolean": "true or false"}


def usage_message(exc: Any) -> str:
    """A Click/Typer usage error in plain words: the flag, what was wrong, what is allowed (no
    validator phrasing such as `Value error, ...` or `Input should be ...`)."""
    param = getattr(exc, "param", None)
    message = str(getattr(exc, "message", "") or "")
    if (isinstance(exc, _click_exceptions.MissingParameter) and param is not None
            and param.param_type_name == "argument" and param.metavar):
        return f"missing argument '{param.metavar}': the {param.name} file"
    if param is None or isinstance(exc, _click_exceptions.MissingParameter):
        text = exc.format_message().rstrip(".")
        return text[0].lower() + text[1:] if text else text
    flag = param.opts[0] if param.param_type_name == "option" else param.human_readable_name
    if m := _CHOICE.match(message):
        allowed = [c.strip().strip("'") for c in m[2].split(",")]
        return f"{flag}: '{m[1]}' is not one of {', '.join(allowed[:-1])} or {allowed[-1]}" \
            if len(allowed) > 1 else f"{flag}: use {allowed[0]}"
    wanted = expected_value(message)
    return f"{flag}: {message.rstrip('.')}" if wanted is None else f"{flag}: expected {wanted}"


def expected_value(message: str) -> str | None:
    """What a bad value should have been ("a whole number", ">= 0"), from either Typer's wording;
    None for any other message."""
    if m := _SHOULD.match(message):
        wanted = m[1].replace("greater than or equal to", ">=").replace("less than or equal to", "<=")
    elif m := _NOT_VALID.match(message):
        wanted = f"a valid {m[1]}"
    elif m := _NOT_IN_RANGE.match(message):  # Click's "x>=0", "x<=1", "0<=x<=1"
        wanted = re.sub(r"^x([<>]=?)", r"\1 ", m[1])
    else:
        return None
    return _PLAIN_SHOULD.get(wanted, wanted)


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


ERROR_CODES = {
    "usage": "a flag or argument the command line does not accept",
    "input": "an input file or value that cannot be checked (shape, dtype, values, options)",
    "io": "a file or stream the system refuses (missing, permissions, disk full)",
    "memory": "the input does not fit in memory",
    "overflow": "values too large for float64 arithmetic",
    "internal": "a bug in ce-check (exit 3)",
}


def fail_input(message: str, *, code: str = "input", json_out: bool = False) -> typer.Exit:
    """One stderr line `ce-check: error: ...`; with --json also `{"ok": false, "error": {...}}`
    on stdout (one line), so a pipeline reading stdout always gets a JSON document."""
    text = one_line(message)
    stderr_line(f"ce-check: error: {text}")
    if json_out:
        write_json_error(code, text)
    return typer.Exit(ExitCode.INTERNAL_ERROR if code == "internal"
                      else ExitCode.USAGE_OR_INPUT_ERROR)


def stderr_line(text: str) -> None:
    """`text` as one line on stderr, control characters escaped. Plain text: what Rich's console
    would write, without loading Rich (an error in a --json run loads none of it)."""
    ensure_std_streams()
    sys.stderr.write(one_line(text) + "\n")
    sys.stderr.flush()


def write_json_error(code: str, message: str) -> None:
    """The error object on stdout; a closed stdout is not a second error."""
    try:
        sys.stdout.write(json.dumps({"ok": False, "error": {"code": code, "message": message}})
                         + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        drop_stdout()


def input_specs(texts: dict[str, str | None]) -> dict[str, InputSpec]:
    """The inputs given on the command line (None: not given), parsed by the one rule."""
    from ce_cli.io.inputs import InputSpec

    return {role: InputSpec.parse(text, role, strict=True)
            for role, text in texts.items() if text is not None}


def load_inputs(texts: dict[str, str | None]) -> dict[str, Any]:
    """Load each named input (None where not given); at most one may come from stdin."""
    from ce_cli.io.inputs import load_all

    arrays = load_all(input_specs(texts)).arrays
    return {role: arrays.get(role) for role in texts}


def source_name(role: str, text: str | None) -> str:
    """How reports name an input given on the command line (the role alone when not given)."""
    from ce_cli.io.inputs import InputSpec

    return role if text is None else InputSpec.parse(text, role, strict=True).source


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Input and environment errors exit 2 with one line (a bad input, a file the system refuses,
    a full disk or a full /dev/full stdout, memory too small for the input); anything unexpected
    exits 3, never 1 (a failed check)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ensure_std_streams()
        as_json = bool(kwargs.get("json_out"))
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except CeCheckError as exc:
            raise fail_input(exc.as_flags(), json_out=as_json) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(ExitCode.OK) from None
        except OSError as exc:
            if exc.filename is None:  # stdout failed: its buffer must not fail again at exit
                drop_stdout()
            raise fail_input(os_error_message(exc), code="io",
                             json_out=as_json and exc.filename is not None) from None
        except OverflowError as exc:  # e.g. an exact sum of float64 losses past float64 max
            raise fail_input(f"values too large: float64 overflow ({_one_line(exc)}); rescale "
                             "the inputs", code="overflow", json_out=as_json) from None
        except MemoryError:
            raise fail_input("out of memory: the input is too large for this machine's memory "
                             "(see the limits in the README's Inputs section)", code="memory",
                             json_out=as_json) from None
        except Exception as exc:
            if os.environ.get("CE_CHECK_DEBUG"):
                raise
            message = (f"{type(exc).__name__}: {_one_line(exc)} "
                       "(set CE_CHECK_DEBUG=1 for the traceback; please report it)")
            stderr_line(f"ce-check: internal error: {message}")
            if as_json:
                write_json_error("internal", message)
            raise typer.Exit(ExitCode.INTERNAL_ERROR) from None

    return wrapper


def os_error_message(exc: OSError) -> str:
    """An OSError in one line: what failed, on which file (standard output when none)."""
    where = quoted(str(exc.filename), 200) if exc.filename is not None else "standard output"
    return f"{where}: {exc.strerror or type(exc).__name__}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:300] + "..."


LOGITS_HELP = "Logits: .npy, .npz (FILE.npz:KEY), CSV/TSV, or '-' for stdin. Class axis last by default."
LABELS_HELP = ("Labels: class indices with the batch shape, or probability rows with the logits' shape "
               "(one-hot or soft targets).")


GradOpt = Annotated[Optional[str], typer.Option(
    "--grad", metavar="FILE", help="Your gradient w.r.t. the logits (any float dtype, the logits' shape).")]
LossOpt = Annotated[Optional[str], typer.Option(
    "--loss", metavar="FILE|NUMBER", help="Your loss: a file (scalar, or per-sample with --reduction none) or a number.")]
ReductionOpt = Annotated[Reduction, typer.Option(
    "--reduction", metavar="mean|sum|none", help="mean, sum or none (gradient of the sum).")]
RtolOpt = Annotated[Optional[float], typer.Option(
    "--rtol", metavar="FLOAT", help="Relative tolerance (default 2*eps of the compared precision).")]
AtolOpt = Annotated[Optional[float], typer.Option(
    "--atol", metavar="FLOAT", help="Absolute tolerance added to the error floor (default 0).")]
PrecisionOpt = Annotated[Optional[Precision], typer.Option(
    "--precision", metavar="PRECISION", help="Precision your gradient was computed in (default: its storage's; f32 on a bf16 gradient: computed in f32, rounded to bf16 once).")]
FloorOpt = Annotated[Optional[float], typer.Option(
    "--floor-factor", metavar="K", help="k in the error floor k*eps*(...); 0 disables the floor (default 4).")]
NormaliserOpt = Annotated[Optional[float], typer.Option(
    "--normaliser-rtol", metavar="FLOAT", help="Largest common factor allowed on a row of your gradient's softmax "
    "terms, an error in its normaliser (default 0.5*eps*(C-1) + 4*eps: a sum of C terms, in float32 "
    "for 16-bit values).")]
StrictSubnormalsOpt = Annotated[bool, typer.Option(
    "--strict-subnormals", help="Fail entries your gradient flushed to zero (default: results below "
    "the precision's smallest normal may be 0, as XLA, TensorFlow and GPU kernels return).")]
FDOpt = Annotated[FDMode, typer.Option(
    "--fd", metavar="MODE", help="Finite differences: auto, full, directional, sample or off.")]
SamplesOpt = Annotated[int, typer.Option("--samples", metavar="N", help="Entries checked by --fd sample.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, metavar="SEED", help="Seed for sampled finite differences.")]
WorstOpt = Annotated[int, typer.Option("--worst", metavar="N", help="Worst entries shown per check.")]
EmptyMeanOpt = Annotated[str, typer.Option("--empty-mean", metavar="nan|zero", help="'mean' when every target is ignored (0/0): nan as PyTorch, or zero as Liger, Keras and Paddle return it.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, metavar="N", help="Kernel threads (default: CE_CHECK_THREADS, else the cores this process may use); the report is the same for any N.")]
OutGradOpt = Annotated[Optional[Path], typer.Option(
    "--out-grad", metavar="FILE", help="Write the float64 reference gradient here (.npy).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of tables.")]
FDBudgetOpt = Annotated[Optional[float], typer.Option(
    "--fd-budget", metavar="SECONDS", help="Seconds --fd full may take (default "
    "10): a longer run is refused with its estimated cost.", show_default=False)]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also show every check's tolerance rule and worst entries.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; only the exit code tells.")]


PROGRESS_AFTER = 2.0  # seconds: shorter runs never show a bar


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar on stderr for runs past PROGRESS_AFTER seconds, only on a terminal.

    Yields the `progress(done_rows, total_rows)` callback for check_grad/check_binary.
    """
    if not enabled or not _may_be_terminal():
        yield None
        return
    console = stderr_console()
    if not console.is_terminal:
        yield None
        return
    start = time.monotonic()
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        if "bar" not in state:
            if elapsed < PROGRESS_AFTER:
                return
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            bar = Progress(TextColumn("ce-check"), BarColumn(), TaskProgressColumn(),
                           TextColumn("{task.fields[eta]}"), console=console, transient=True)
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task("rows", total=total, eta="")
        state["bar"].update(state["task"], completed=done, eta=eta_text(elapsed, done, total))

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].stop()


def _may_be_terminal() -> bool:
    """False when Rich would surely not see a terminal on stderr (no tty, neither TTY_COMPATIBLE=1
    nor FORCE_COLOR): a piped or --json run then never loads Rich for a bar it would not show."""
    if os.environ.get("TTY_COMPATIBLE") == "1" or os.environ.get("FORCE_COLOR"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def eta_text(elapsed: float, done: int, total: int) -> str:
    """Time left, from the rate since the start (Rich's own column waits for several samples,
    which a run of few large chunks never gives)."""
    if done <= 0 or total <= done:
        return ""
    left = elapsed * (total - done) / done
    return f"{int(left // 60)}:{int(left % 60):02d} left"


FD_DEFAULT_BUDGET = 10.0  # seconds --fd full may take without --fd-budget


def fd_rate(n_classes: int, elements: int = 1 << 21, elementwise: bool = False) -> float:
    """Element evaluations per second here: a short calibration. The numpy kernel: the
    log-sum-exp of a block of rows of C classes (what each --fd full evaluation does); the
    compiled kernel: --fd full itself on rows of C classes (2^14 entries, at least one row:
    each row is evaluated once and its steps taken from its own sums); `elementwise` (binary):
    --fd full itself on a chunk of 2^18 elements, two evaluations each with their bounds."""
    import numpy as np

    from ce_cli.kernels.compiled import kernel

    problem: Any = None  # a problem whose own --fd full is timed, or None
    if elementwise:
        from ce_cli.kernels.allocator import keep_chunk_buffers
        from ce_cli.models.sigmoid import build_sigmoid_bce

        keep_chunk_buffers()  # as the check will: without it each chunk's buffers fault in anew
        x = np.linspace(-3.0, 3.0, 1 << 18).reshape(8, -1)  # a chunk of the stream
        problem = build_sigmoid_bce(x, (x > 0).astype(np.float64))[0]
        count = 2 * x.size
    elif kernel() is not None:
        from ce_cli.models.softmax import build_softmax_ce

        rows = max(1, (1 << 14) // max(1, n_classes))
        z = np.linspace(-3.0, 3.0, rows * n_classes).reshape(rows, n_classes)
        problem = build_softmax_ce(z, np.zeros(rows, dtype=np.int64))[0]
        count = 2 * rows * n_classes ** 2
    if problem is not None:
        from ce_cli.verify.finite_diff import fd_full

        def work() -> None:
            fd_full(problem, 0, problem.n_rows)
    else:
        rows = max(1, elements // max(1, n_classes))
        z = np.linspace(-3.0, 3.0, rows * n_classes).reshape(rows, n_classes)
        count = z.size

        def work() -> None:
            np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
    best = math.inf
    for _ in range(3):  # the best of three: a shared machine's hiccup is not the rate
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return count / max(best, 1e-6)


def fd_cost_guard(shape: tuple[int, ...], class_axis: int, budget: float | None,
                  quiet: bool, elementwise: bool = False) -> None:
    """Before an explicit --fd full: its cost (loss evaluations, estimated seconds from a short
    calibration) on stderr; refused above `budget` seconds (default FD_DEFAULT_BUDGET). Inputs
    past the hard element limit (io/limits.py) are left to its own refusal. `elementwise`: a
    loss of per-element terms (binary), 2 evaluations per element."""
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise CeCheckError(f"--fd-budget: must be a number of seconds > 0, got {budget}")
    if fd_full_refusal(shape, class_axis, elementwise) is not None or not shape:
        return
    n_classes = shape[class_axis] if -len(shape) <= class_axis < len(shape) else 1
    n_rows = math.prod(shape) // max(1, n_classes)
    cost = fd_full_cost(n_rows, n_classes, elementwise)
    seconds = cost / fd_rate(n_classes, elementwise=elementwise)
    limit = FD_DEFAULT_BUDGET if budget is None else budget
    what = (f"--fd full: {2 * n_rows * n_classes:,} "
            f"{'element' if elementwise else f'row over {n_classes:,} classes'} loss evaluations "
            f"({cost:.2g} element evaluations), about {seconds:.0f} s here")
    if seconds > limit:
        raise CeCheckError(f"{what}: over the budget of {limit:g} s; add --fd-budget "
                           f"{math.ceil(seconds * 2)} to run it, or use "
                           f"--fd {'sample' if elementwise else 'directional'}")
    if seconds > 1.0 and not quiet:
        stderr_line(f"ce-check: note: {what}")


def check_settings(**flags: Any) -> CheckOptions:
    """The one place the command line's flags become the check's settings."""
    from ce_cli.verify.options import CheckOptions

    return CheckOptions.build(**flags)


def run_check(check: Callable[..., Report], inputs: dict[str, str | None], *, out_grad: Path | None,
              json_out: bool, quiet: bool, vectors: tuple[str, ...] = (),
              verbose: bool = False, fd_budget: float | None = None, elementwise: bool = False,
              **flags: Any) -> NoReturn:
    """Load the inputs, call `check` (check_grad or check_binary) once, render, exit with the
    verdict.

    `inputs` are the input arguments by role (None: not given); `vectors` are roles whose
    one-row or one-column CSV is flattened to C values; `flags` are the check's settings;
    `elementwise`: the loss is a sum of per-element terms (binary: what --fd full costs).
    """
    import numpy as np

    from ce_cli.io.inputs import load_all, refuse_overwriting
    from ce_cli.io.output import check_target
    from ce_cli.report.render import CheckOutput

    specs = input_specs(inputs)
    if out_grad is not None:
        check_target(out_grad, "out_grad")  # before any work: a directory, device, FIFO
    refuse_overwriting(out_grad, specs)
    loaded = load_all(specs, vectors=vectors)
    options = check_settings(**flags, loss_atol=loaded.loss_atol)
    arrays = dict(loaded.arrays)
    logits, labels = arrays.pop("logits"), arrays.pop("labels")
    if options.fd is FDMode.full:
        fd_cost_guard(tuple(np.shape(logits)), options.class_axis, fd_budget, quiet, elementwise)
    with np.errstate(all="ignore"), progress_bar(enabled=not quiet) as progress:
        # over/underflow is expected and handled: no numpy warnings
        report = check(logits, labels, **arrays, out_grad=out_grad, sources=loaded.sources,
                       progress=progress, options=options)
    emit(CheckOutput(report, verbose=verbose), json_out=json_out, quiet=quiet)
    raise typer.Exit(ExitCode.OK if report.ok else ExitCode.CHECK_FAILED)
