"""Running a user's implementation for `ce-check stress`: a Python callable (`--impl
package.module:function`) or any program (`--impl-cmd 'CMD {logits} {labels} {grad} {loss}'`).

Whatever the implementation does (raise, crash, hang, print, write nothing or the wrong shape),
one case's trouble becomes that cell's `Outcome(error=...)` with the tail of what it printed:
never an exception out of here. Only a spec that cannot work at all (no such module, no such
program, a template without {grad}) is a usage error, `CeCheckError`, before anything runs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.stress.dtypes import DTYPE_NAMES, as_storable
from ce_cli.stress.judge import Case, Outcome

DEFAULT_TIMEOUT = 30.0
TAIL_LINES = 20
TAIL_CHARS = 2000
PLACEHOLDERS = ("logits", "labels", "grad", "loss", "dtype", "reduction")
REQUIRED = ("logits", "labels", "grad")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


def tail(text: str | bytes | None, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last `lines` lines (at most `chars` characters) of a program's output."""
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out if len(out) <= chars else "..." + out[-chars:]


# ---------------------------------------------------------------------------------------------
# --impl package.module:function


def load_callable(spec: str) -> Callable:
    """Import `package.module:function` (the current directory first on sys.path)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CeCheckError(f"--impl: '{spec}' is not package.module:function")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CeCheckError(f"--impl: cannot import '{module_name}': {exc}") from None
    except Exception as exc:  # the user's module failed while importing
        raise CeCheckError(f"--impl: importing '{module_name}' raised {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CeCheckError(f"--impl: module '{module_name}' has no attribute '{attr}'") from None
    if not callable(obj):
        raise CeCheckError(f"--impl: '{spec}' is a {type(obj).__name__}, not a callable")
    return obj


class _Timeout(BaseException):
    """Raised into the implementation by SIGALRM; a BaseException so `except Exception` in the
    user's code does not swallow it."""


@contextlib.contextmanager
def _alarm(seconds: float | None):
    """SIGALRM after `seconds` (main thread on POSIX only; elsewhere no limit)."""
    if not (seconds and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()):
        yield
        return

    def handler(_signum, _frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def python_runner(fn: Callable, timeout: float | None = DEFAULT_TIMEOUT,
                  kwargs: dict | None = None) -> Callable[[Case], Outcome]:
    """Call `fn(logits, labels)` per case; what it prints is captured, not shown."""
    kwargs = kwargs or {}

    def run(case: Case) -> Outcome:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), \
                    np.errstate(all="ignore"), _alarm(timeout):
                result = fn(case.logits.copy(), case.labels.copy(), **kwargs)
        except _Timeout:
            return Outcome(error=f"timeout: no result after {timeout:g} s", reason="timeout",
                           stderr_tail=tail(captured.getvalue()))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from the user's code is a crash too
            # the traceback from the user's frames on (ce-check's own call frame left out)
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            text = captured.getvalue() + "".join(traceback.format_exception(type(exc), exc, tb))
            return Outcome(error=f"crash: raised {type(exc).__name__}: {_one_line(exc)}",
                           reason="crash", stderr_tail=tail(text))
        try:
            loss, grad = result
        except (TypeError, ValueError):
            return Outcome(error=f"bad output: returned {type(result).__name__}, not (loss, grad)",
                           reason="bad output", stderr_tail=tail(captured.getvalue()))
        return Outcome(loss=loss, grad=grad, stderr_tail=tail(captured.getvalue()))

    return run


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


# ---------------------------------------------------------------------------------------------
# --impl-cmd 'CMD {logits} {labels} {grad} {loss}'


@dataclass(frozen=True)
class CommandTemplate:
    """A shlex-split command line with {logits} {labels} {grad} [{loss}] [{dtype}] [{reduction}]
    placeholders. It is not run through a shell (use `sh -c '...'` for pipes)."""

    text: str
    argv: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> CommandTemplate:
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:
            raise CeCheckError(f"--impl-cmd: cannot split '{text}': {exc}") from None
        if not argv:
            raise CeCheckError("--impl-cmd: empty command")
        used = {m for tok in argv for m in _PLACEHOLDER.findall(tok)}
        missing = [p for p in REQUIRED if p not in used]
        if missing:
            raise CeCheckError("--impl-cmd: the command needs the placeholders {logits} {labels} "
                               "{grad} (and optionally {loss}); missing "
                               + " ".join("{" + m + "}" for m in missing))
        program = argv[0]
        if not _PLACEHOLDER.search(program) and shutil.which(program) is None:
            raise CeCheckError(f"--impl-cmd: program '{program}' not found (not on PATH, not an "
                               "executable file)")
        return cls(text, argv)

    @property
    def wants_loss(self) -> bool:
        return any("{loss}" in tok for tok in self.argv)

    @property
    def name(self) -> str:
        return Path(self.argv[0]).name

    def render(self, values: dict[str, str]) -> list[str]:
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], tok) for tok in self.argv]


@dataclass(frozen=True)
class ProcessResult:
    returncode: int     # set by communicate() / wait() before a result is made
    stdout: bytes
    stderr: bytes
    timed_out: bool


def run_process(argv: list[str], timeout: float | None, cwd: str | None = None,
                env: dict | None = None) -> ProcessResult:
    """Run `argv` in its own process group; on timeout kill the whole group."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return ProcessResult(proc.returncode, out, err, False)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a grandchild outside the group holds the pipes open
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:  # always set (PIPE); for the type checker
                    pipe.close()
            proc.wait()
            out, err = b"", b""
        return ProcessResult(proc.returncode, out, err, True)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): leave nothing running
            _kill_group(proc)
            proc.wait()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def command_runner(template: CommandTemplate, workdir: Path, *, reduction: str,
                   timeout: float | None = DEFAULT_TIMEOUT) -> Callable[[Case], Outcome]:
    """Per case: write logits.npy and labels.npy to a fresh folder under `workdir`, run the
    command with the paths substituted, read grad.npy (and loss.npy)."""
    counter = iter(range(1, 1 << 62))
    env = dict(os.environ)

    def run(case: Case) -> Outcome:
        folder = workdir / f"case-{next(counter):05d}"
        folder.mkdir(parents=True)
        paths = write_inputs(folder, case)
        values = {"logits": str(paths["logits"]), "labels": str(paths["labels"]),
                  "grad": str(folder / "grad.npy"), "loss": str(folder / "loss.npy"),
                  "dtype": DTYPE_NAMES[case.dtype], "reduction": reduction}
        argv = template.render(values)
        env.update(CE_CHECK_DTYPE=DTYPE_NAMES[case.dtype], CE_CHECK_REDUCTION=reduction)
        try:
            return _run_case(argv, values, env)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # outputs are read into memory by then

    def _run_case(argv: list[str], values: dict[str, str], env: dict) -> Outcome:
        try:
            res = run_process(argv, timeout, env=env)
        except OSError as exc:
            return Outcome(error=f"crash: cannot run '{argv[0]}': {exc.strerror or exc}", reason="crash")
        text = tail(res.stderr) or tail(res.stdout)
        if res.timed_out:
            return Outcome(error=f"timeout: killed after {timeout:g} s", reason="timeout",
                           stderr_tail=text)
        if res.returncode != 0:
            how = (f"killed by {_signal_name(res.returncode)}" if res.returncode < 0
                   else f"exit status {res.returncode}")
            return Outcome(error=f"crash: {how}", reason="crash", stderr_tail=text)
        grad, err = read_output(Path(values["grad"]), "gradient", "{grad}")
        loss = None
        if not err and template.wants_loss:
            loss, err = read_output(Path(values["loss"]), "loss", "{loss}")
        if err:
            return Outcome(error=err, reason="bad output", stderr_tail=text)
        return Outcome(loss=loss, grad=grad, stderr_tail=text, loss_expected=template.wants_loss)

    return run


def write_inputs(folder: Path, case: Case) -> dict[str, Path]:
    paths = {"logits": folder / "logits.npy", "labels": folder / "labels.npy"}
    np.save(paths["logits"], as_storable(case.logits))
    np.save(paths["labels"], as_storable(case.labels))
    return paths


def read_output(path: Path, what: str, placeholder: str) -> tuple[np.ndarray | None, str]:
    if not path.exists():
        return None, f"bad output: no {what} written to {placeholder} ({path.name})"
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return None, f"bad output: {what} file {path.name} is not a readable .npy ({_one_line(exc)})"
    if isinstance(arr, np.lib.npyio.NpzFile):
        return None, f"bad output: {what} file {path.name} is an .npz archive, not an .npy array"
    return arr, ""
