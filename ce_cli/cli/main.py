"""The console-script entry point: registers the commands it needs on the shared app, runs it.

Each command lives in its own module and registers itself on import, so `ce-check grad` imports
neither explain nor stress nor batch (start-up time is part of every run)."""

from __future__ import annotations

import importlib
import os
import sys

from ce_cli.cli.app import app

COMMANDS = ("grad", "binary", "linear", "explain", "stress", "batch")
# commands that multiply no large matrices and start no process of yours (stress does; batch and
# linear run linear checks, which need BLAS threads)
NO_BLAS_POOL = ("grad", "binary", "explain")
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def register_commands(names: tuple[str, ...] = COMMANDS) -> None:
    """Import the command modules `names` (each registers itself on `app`)."""
    for name in names:
        importlib.import_module(f"ce_cli.cli.{name}")


def main() -> None:
    """Console-script entry point: only the command asked for is imported; `--help` and
    anything else register them all (in the order of COMMANDS)."""
    asked = sys.argv[1] if len(sys.argv) > 1 else None
    if asked in NO_BLAS_POOL and not any(v in os.environ for v in BLAS_THREAD_VARS):
        # OpenBLAS starts its thread pool when numpy loads and busy-waits it for ~0.1 s, taking
        # a core from ce-check's own threads (CE_CHECK_THREADS); these commands never use it
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
    register_commands((asked,) if asked in COMMANDS else COMMANDS)
    app(prog_name="ce-check")
