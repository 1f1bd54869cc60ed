"""`ce-check stress`: where an implementation breaks, over scenarios x logit scales x dtypes.

Modules, bottom up: dtypes (names, bfloat16, analytic thresholds) -> scenarios (the inputs and
the option parsers) -> builtins (textbook implementations) -> judge (one cell's verdict) ->
grid (every cell, breaking points) -> reproducer (--save-failures); runner runs a user's
--impl / --impl-cmd; render shows a report.

The built-in textbook implementations are importable here, as the README shows:
`--impl ce_cli.stress:naive_softmax_ce`; so is the sweep as a library call, `builtin_sweep`.
"""

from ce_cli.stress.builtins import (log_softmax_ce, naive_sigmoid_bce, naive_softmax_ce,
                                    shifted_softmax_ce, stable_sigmoid_bce)
from ce_cli.stress.dtypes import parse_dtypes, thresholds
from ce_cli.stress.grid import StressReport, builtin_sweep
from ce_cli.stress.judge import make_case
from ce_cli.stress.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "StressReport", "builtin_sweep", "log_softmax_ce", "make_case",
           "naive_sigmoid_bce", "naive_softmax_ce", "parse_dtypes", "shifted_softmax_ce",
           "stable_sigmoid_bce", "thresholds"]
