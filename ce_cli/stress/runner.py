"""Running a user's implementation for `ce-check stress`: a Python callable (`--impl
package.module:function`) or any program (`--impl-cmd 'CMD {logits} {labels} {grad} {loss}'`).

Whatever the implementation does (raise, crash, hang, print, write nothing or the wrong shape),
one case's trouble becomes that cell's `Outcome(error=...)` with the tail of what it printed:
never an exception out of here. Only a spec that cannot work at all (no such module, no such
program, a template without {grad}) is a usage error, `CeCheckError`, before anything runs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import multiprocessing
import os
import pickle
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io import limits
from ce_cli.io.loading import npy_file_header
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


# the longest wait ce-check asks of the system (select/poll refuse larger timeouts)
MAX_WAIT = 86400.0 * 20  # poll() takes a signed 32-bit count of milliseconds


def _seconds(timeout: float | None) -> float | None:
    return None if timeout is None else min(float(timeout), MAX_WAIT)


class _TailText(io.TextIOBase):
    """A text stream keeping only the last MAX_CAPTURE_BYTES characters written to it."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.parts.append(text)
        self.size += len(text)
        if self.size > 2 * limits.MAX_CAPTURE_BYTES:
            keep = "".join(self.parts)[-limits.MAX_CAPTURE_BYTES:]
            self.parts, self.size = [keep], len(keep)
        return len(text)

    def getvalue(self) -> str:
        return "".join(self.parts)[-limits.MAX_CAPTURE_BYTES:]


def _call(fn: Callable, kwargs: dict, logits: np.ndarray, labels: np.ndarray) -> tuple:
    """In the worker: ("ok", loss, grad, output) or ("crash" | "bad output", message, output)."""
    captured = _TailText()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), \
                np.errstate(all="ignore"):
            result = fn(logits, labels, **kwargs)
    except BaseException as exc:  # SystemExit from the user's code is a crash too
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        text = captured.getvalue() + "".join(traceback.format_exception(type(exc), exc, tb))
        return ("crash", f"crash: raised {type(exc).__name__}: {_one_line(exc)}", text)
    try:
        loss, grad = result
    except (TypeError, ValueError):
        return ("bad output", f"bad output: returned {type(result).__name__}, not (loss, grad)",
                captured.getvalue())
    try:
        pickle.dumps((loss, grad))
    except Exception:
        loss, grad = _plain(loss), _plain(grad)
    return ("ok", loss, grad, captured.getvalue())


def _plain(value: object) -> object:
    try:
        return np.asarray(value)
    except Exception:
        return repr(value)[:200]


def _serve(fn: Callable, kwargs: dict, conn: Connection) -> None:
    """The worker process: calls `fn` on each case received until the pipe closes. Its own
    stdout and stderr go to /dev/null (what the function prints is captured in Python)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    while True:
        try:
            logits, labels = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        conn.send(_call(fn, kwargs, logits, labels))


class _Worker:
    """A forked child process running the implementation, restarted after a crash or a timeout,
    so neither takes ce-check down nor hangs it (`os._exit`, a segfault, code that swallows
    every exception)."""

    def __init__(self, fn: Callable, kwargs: dict) -> None:
        self.fn, self.kwargs = fn, kwargs
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None

    def _start(self) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        ctx = multiprocessing.get_context("fork")
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(self.fn, self.kwargs, there), daemon=True)
        proc.start()
        there.close()
        self.proc, self.conn = proc, here
        return proc, here

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.kill()
            self.proc.join()
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def call(self, case: Case, timeout: float | None) -> tuple | None:
        """The worker's answer for `case`; None after a timeout; ("died", exitcode) if it died."""
        proc, conn = (self.proc, self.conn) if self.conn is not None else self._start()
        assert proc is not None
        try:
            conn.send((case.logits.copy(), case.labels.copy()))
            if not conn.poll(_seconds(timeout)):
                self.stop()
                return None
            return conn.recv()
        except (EOFError, OSError, pickle.PicklingError):
            proc.join(5)
            code = proc.exitcode
            self.stop()
            return ("died", code)


def python_runner(fn: Callable, timeout: float | None = DEFAULT_TIMEOUT,
                  kwargs: dict | None = None) -> Callable[[Case], Outcome]:
    """Call `fn(logits, labels)` per case in a child process (see `_Worker`); what it prints is
    captured (its last MAX_CAPTURE_BYTES), not shown."""
    worker = _Worker(fn, kwargs or {})
    atexit.register(worker.stop)

    def run(case: Case) -> Outcome:
        answer = worker.call(case, timeout)
        if answer is None:
            return Outcome(error=f"timeout: no result after {timeout:g} s", reason="timeout")
        if answer[0] == "died":
            code = answer[1]
            how = (f"killed by {_signal_name(code)}" if code is not None and code < 0
                   else f"exit status {code}")
            return Outcome(error=f"crash: the implementation's process died ({how})",
                           reason="crash")
        if answer[0] == "ok":
            _, loss, grad, text = answer
            return Outcome(loss=loss, grad=grad, stderr_tail=tail(text))
        reason, message, text = answer
        return Outcome(error=message, reason=reason, stderr_tail=tail(text))

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
        """The argv with the placeholders filled in: as they are in arguments the program gets
        directly, `shlex.quote`d in a shell's `-c` script (`sh -c '... {grad}'`), so no path
        (a TMPDIR or --save-failures folder with `;` or `$(...)`) is ever run as code."""
        code = _shell_code_tokens(self.argv)
        return [_PLACEHOLDER.sub(
            lambda m: shlex.quote(values[m.group(1)]) if i in code else values[m.group(1)], tok)
            for i, tok in enumerate(self.argv)]


SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "busybox",
                    "fish", "csh", "tcsh"})
_SHELL_C = re.compile(r"-[A-Za-z]*c[A-Za-z]*")


def _shell_code_tokens(argv: tuple[str, ...]) -> set[int]:
    """Indexes of the tokens a shell runs as code: the one after `-c` (or `-ec`, `-lc`, ...)
    once a shell (sh, bash, ...) is on the command line."""
    code: set[int] = set()
    shell = False
    for i, tok in enumerate(argv):
        shell = shell or Path(tok).name in SHELLS
        if shell and _SHELL_C.fullmatch(tok) and i + 1 < len(argv):
            code.add(i + 1)
    return code


@dataclass(frozen=True)
class ProcessResult:
    returncode: int     # set by wait() before a result is made
    stdout: bytes       # the last MAX_CAPTURE_BYTES of each
    stderr: bytes
    timed_out: bool


class _TailReader(threading.Thread):
    """Drains a pipe, keeping only its last MAX_CAPTURE_BYTES (`yes` costs CPU, not memory)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.pipe, self.data = pipe, bytearray()

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.pipe.read1(1 << 16):  # type: ignore[attr-defined]
                self.data += chunk
                if len(self.data) > 2 * limits.MAX_CAPTURE_BYTES:
                    del self.data[:-limits.MAX_CAPTURE_BYTES]

    def tail(self) -> bytes:
        self.join(5)  # a grandchild outside the group may hold the pipe open: do not wait on it
        return bytes(self.data[-limits.MAX_CAPTURE_BYTES:])


def run_process(argv: list[str], timeout: float | None, cwd: str | None = None,
                env: dict | None = None) -> ProcessResult:
    """Run `argv` in its own process group, capturing the tail of its stdout and stderr; when it
    exits, times out or is interrupted, kill the whole group (no background child outlives it)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None  # PIPE
    readers = [_TailReader(proc.stdout), _TailReader(proc.stderr)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        proc.wait(timeout=_seconds(timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)  # always: after a timeout, Ctrl-C, and a clean exit alike
        proc.wait()
    out, err = readers[0].tail(), readers[1].tail()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    return ProcessResult(proc.returncode, out, err, timed_out)


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
    """The implementation's output file: a regular .npy (not a symlink, a FIFO, ...), whose
    header's shape the file really holds; anything else fails the cell, never the run."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, f"bad output: no {what} written to {placeholder} ({path.name})"
    except OSError as exc:
        return None, f"bad output: cannot read {what} file {path.name} ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return None, f"bad output: {what} file {path.name} is not a regular file"
    try:
        with path.open("rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                return None, (f"bad output: {what} file {path.name} is an .npz archive, not an "
                              ".npy array")
        npy_file_header(path, f"{what} file {path.name}")
        arr = np.load(path, allow_pickle=False)
    except CeCheckError as exc:
        return None, f"bad output: {_one_line(exc)}"
    except (OSError, ValueError, EOFError, MemoryError) as exc:
        return None, f"bad output: {what} file {path.name} is not a readable .npy ({_one_line(exc)})"
    return arr, ""
