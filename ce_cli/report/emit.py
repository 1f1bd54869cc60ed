"""One emit path for every command: warnings on stderr, then one JSON document or tables on
stdout, or nothing with -q; a reader that closes the pipe early is not an error."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol

from ce_cli.errors import as_flags
from ce_cli.report.console import drop_stdout, stderr_console, stdout_console
from ce_cli.report.format import json_text

if TYPE_CHECKING:
    from rich.console import Console


class Output(Protocol):
    """What a command hands to `emit`: its result as a JSON-ready dict and as Rich output."""

    warnings: tuple[str, ...]

    def to_dict(self) -> dict: ...

    def render(self, console: Console) -> None: ...


NOTE = "note: "


def message_line(text: str) -> str:
    """A warning as `warning: ...`; a message that starts with `note: ` (information about a
    valid input, nothing to fix) stays a note. Parameters are named as flags."""
    return as_flags(text) if text.startswith(NOTE) else f"warning: {as_flags(text)}"


def emit(output: Output, *, json_out: bool, quiet: bool) -> None:
    """Warnings (`ce-check: warning: ...`) and notes (`ce-check: note: ...`, parameters named as flags) on stderr, then JSON or
    tables on stdout."""
    if quiet:
        return
    try:
        if output.warnings:
            err = stderr_console()
            for w in output.warnings:
                err.print(f"ce-check: {message_line(w)}", markup=False, soft_wrap=True)
        if json_out:
            sys.stdout.write(json_text(output.to_dict()) + "\n")
            sys.stdout.flush()
        else:
            output.render(stdout_console())
    except BrokenPipeError:
        drop_stdout()
