"""Rich consoles for stdout (data) and stderr (messages): NO_COLOR honoured, a closed pipe
raised as BrokenPipeError (Rich would exit 1, which reads as a failed check)."""

from __future__ import annotations

import io
import os
import sys

from rich.console import Console


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


def drop_stdout() -> None:
    """The reader closed the pipe: send what is left to /dev/null; the exit code still tells."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
