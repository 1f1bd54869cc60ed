"""Rich consoles for stdout (data) and stderr (messages): NO_COLOR honoured, a closed pipe
raised as BrokenPipeError (Rich would exit 1, which reads as a failed check), markup off (a
path or name holding `[red]` or `[/x]` is printed as it is, never parsed), text the terminal's
encoding cannot carry (a lone surrogate) escaped, not fatal."""

from __future__ import annotations

import functools
import io
import os
import sys
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # Rich loads with the first console (`ce-check --help` and --json need none)
    from rich.console import Console


@functools.cache
def pipe_console_class() -> type[Console]:
    """PipeConsole, a Rich Console subclass, defined on first use."""
    from rich.console import Console

    class PipeConsole(Console):
        """Rich exits 1 on a closed pipe (`| head`), which reads as a failed check; raise instead."""

        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    return PipeConsole


def _color_system() -> Literal["auto"] | None:
    """NO_COLOR (https://no-color.org) turns off every escape code, bold included."""
    return None if os.environ.get("NO_COLOR") else "auto"


def stdout_console() -> Console:
    ensure_std_streams()
    return pipe_console_class()(highlight=False, soft_wrap=False, emoji=False, markup=False,
                       color_system=_color_system())


def stderr_console() -> Console:
    ensure_std_streams()
    return pipe_console_class()(stderr=True, highlight=False, emoji=False, soft_wrap=True, markup=False,
                       color_system=_color_system())


def ensure_std_streams() -> None:
    """A closed stdout or stderr (`>&-`: Python sets it to None) becomes /dev/null, so output
    is dropped and the exit code still tells; text they cannot encode is escaped."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
        elif hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, io.UnsupportedOperation):
                pass


def drop_stdout() -> None:
    """The reader closed the pipe: send what is left to /dev/null; the exit code still tells."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
