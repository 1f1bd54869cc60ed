"""One emit path for every command: warnings on stderr, then JSON or tables on stdout, or
nothing with -q; a reader that closes the pipe early does not turn into an error."""

from __future__ import annotations

import sys

from ce_cli.report.console import drop_stdout, stderr_console, stdout_console
from ce_cli.report.render import render_table, to_json


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
        drop_stdout()
