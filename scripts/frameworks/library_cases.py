"""Shared by optax_cases.py and keras_cases.py (stdlib only, importable in either venv): the
committed fixture subset and the command line."""

from __future__ import annotations

import sys

import common


def fixture_keep(c: dict) -> bool:
    """The committed subset of --small: C = 10 (every std, both dtypes) and C = 1,000 at std 10
    in float32."""
    return c["C"] == 10 or (c["C"] == 1000 and c["scale"] == 10.0 and c["dtype"] == "f32")


def main(prog: str, cases, compute) -> None:
    """`prog OUTDIR [--small] [--only S] [--fixtures]`: write cases(small) with compute(outdir,
    small), `--fixtures` the committed subset only."""
    fixtures = "--fixtures" in sys.argv
    if fixtures:
        sys.argv.remove("--fixtures")
    args = common.parse_args(prog)
    common.run(cases(args.small), args, compute(args.outdir, args.small),
               fixture_keep if fixtures else None)
