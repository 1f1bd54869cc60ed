"""The console-script entry point: runs the shared app, whose group builds only the command
invoked (app.LazyCommands).

Each command lives in its own module and registers itself on import, so `ce-check grad` imports
neither explain nor stress nor batch, and `ce-check --help` imports none of them (start-up time
is part of every run)."""

from __future__ import annotations

import gc
import importlib
import os
import sys

from ce_cli.cli.app import COMMANDS, app

# commands that multiply no large matrices and start no process of yours (stress does; batch and
# linear run linear checks, which need BLAS threads)
NO_BLAS_POOL = ("grad", "binary", "explain")
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def register_commands(names: tuple[str, ...] = tuple(COMMANDS)) -> None:
    """Import the command modules `names` (each registers itself on `app`): a group built from
    `app` then holds them built (the tests' CliRunner does this; the console script does not)."""
    for name in names:
        importlib.import_module(f"ce_cli.cli.{name}")


def main() -> None:
    """Console-script entry point: only the command asked for is imported and built; `--help`
    lists them all from COMMANDS without either."""
    # the imports and typer's set-up make ~10^5 objects, none of them garbage: at the default
    # threshold (700) the collector scans them again and again (~7 ms of a grad run); one
    # collection every 10^5 allocations still reclaims any cycle a long batch makes
    gc.set_threshold(100_000, 20, 100)
    asked = sys.argv[1] if len(sys.argv) > 1 else None
    if asked in NO_BLAS_POOL and not any(v in os.environ for v in BLAS_THREAD_VARS):
        # OpenBLAS starts its thread pool when numpy loads and busy-waits it for ~0.1 s, taking
        # a core from ce-check's own threads (CE_CHECK_THREADS); these commands never use it
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        app(prog_name="ce-check")
    finally:
        # The interpreter's collections at exit would scan every object the imports made
        # (~10 ms a run); frozen, they are left to the OS, as any object alive at exit may be
        gc.freeze()
