"""Writing an output file safely: `--out-grad`, `--junit-xml`.

The rule (the README's *Inputs* section states it):

- the target must be a regular file or not exist yet; a directory, a device node (`/dev/null`),
  a FIFO or a socket is refused up front, before any work (nothing is written *through* it; to
  see an output on the terminal, write it to a file and print that);
- the bytes go to a temporary file beside the target, created with an unpredictable name and
  `O_CREAT|O_EXCL|O_NOFOLLOW` (`tempfile.mkstemp`), so a symlink or a file planted at a guessable
  name is never followed nor overwritten, and an input is never taken for the temporary file;
- they are written with `write()` (never through a memory map: a full disk is `ENOSPC`, an
  input error, not a SIGBUS), after a check that the file system has room for them;
- the temporary file is renamed over the target only when complete (a symlink at the target is
  replaced, not followed); on any error, Ctrl-C or SIGTERM it is removed.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import numpy as np

from ce_cli.errors import CeCheckError

# names of temporary files still open, removed on SIGTERM
_OPEN: set[str] = set()


def check_target(path: str | Path, param: str) -> Path:
    """Refuse, before any work, a target that is not a regular file (or absent) or whose folder
    is missing. `param` names the option in messages (`out_grad`)."""
    target = Path(path)
    where = f"`{param}` '{path}'"
    if str(path) in ("", ".") or target.name in ("", ".", ".."):
        raise CeCheckError(f"{where}: is a directory; name a file")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise CeCheckError(f"{where}: cannot write ({exc.strerror or exc})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CeCheckError(f"{where}: is a directory; name a file")
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise CeCheckError(f"{where}: is a {_kind(st.st_mode)}, not a regular file; ce-check "
                           "writes only regular files (it never writes through or replaces "
                           "a device, pipe or socket)")
    parent = target.parent
    if not parent.is_dir():
        raise CeCheckError(f"{where}: cannot write: folder '{parent}' does not exist")
    return target


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    return "socket" if stat.S_ISSOCK(mode) else "special file"


def npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """The .npy header (magic, version, dict, padding) of a C-order array of `shape`."""
    buf = io.BytesIO()
    meta = {"descr": dtype, "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, meta)
    except ValueError:  # a header over 64 KiB needs format 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, meta)
    return buf.getvalue()


def check_space(folder: Path, nbytes: int, where: str) -> None:
    """Refuse when the file system of `folder` has less than `nbytes` free for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return  # no statistics: ENOSPC on write still reports it
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise CeCheckError(f"{where}: not enough space on the device ({nbytes} bytes needed, "
                           f"{free} free)")


class AtomicFile:
    """A temporary file beside `target`, written with `write`/`pwrite`, renamed over `target` by
    `commit` and removed by `discard` (see the module docstring)."""

    def __init__(self, target: str | Path, param: str, size_hint: int = 0) -> None:
        self.target = check_target(target, param)
        self.where = f"`{param}` '{target}'"
        check_space(self.target.parent, size_hint, self.where)
        prefix = f".{self.target.name[:100]}."
        import tempfile  # here: a run without --out-grad never loads it (start-up)

        try:
            self.fd, self.tmp = tempfile.mkstemp(prefix=prefix, suffix=".partial",
                                                 dir=self.target.parent)
        except OSError as exc:
            raise self._error(exc) from None
        _OPEN.add(self.tmp)
        self.closed = False

    def _error(self, exc: OSError) -> CeCheckError:
        return CeCheckError(f"{self.where}: cannot write ({exc.strerror or exc})")

    def write(self, data: bytes | memoryview) -> None:
        """Append `data` (the whole of it: short writes are continued)."""
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Write `data` at `offset` (the whole of it)."""
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None

    def commit(self) -> None:
        """Flush to disk and rename over the target."""
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.closed = True
            os.replace(self.tmp, self.target)
        except OSError as exc:
            self.discard()
            raise self._error(exc) from None
        _OPEN.discard(self.tmp)

    def discard(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        _OPEN.discard(self.tmp)


@contextlib.contextmanager
def atomic_output(target: str | Path, param: str, size_hint: int = 0) -> Iterator[AtomicFile]:
    """An `AtomicFile` committed when the block ends normally, discarded on any exception."""
    out = AtomicFile(target, param, size_hint)
    with removed_on_sigterm():
        try:
            yield out
        except BaseException:
            out.discard()
            raise
        out.commit()


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    for name in list(_OPEN):
        with contextlib.suppress(OSError):
            os.unlink(name)
    _OPEN.clear()
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def removed_on_sigterm() -> Iterator[None]:
    """While the block runs (on the main thread), SIGTERM removes the open temporary files and
    exits 143, as Ctrl-C (KeyboardInterrupt) already unwinds through `discard`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def install_sigterm_cleanup() -> None:
    """SIGTERM removes open temporary files (for writers that live across calls, like
    `OutGradStage`); a no-op off the main thread or where SIGTERM is already handled."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
