"""`ce-check stress`: where an implementation breaks, over scenarios x logit scales x dtypes.

The built-in textbook implementations are importable here, as the README shows:
`--impl ce_cli.stress:naive_softmax_ce`.
"""

from ce_cli.stress.sweep import (log_softmax_ce, naive_sigmoid_bce, naive_softmax_ce,
                                 shifted_softmax_ce, stable_sigmoid_bce)

__all__ = ["log_softmax_ce", "naive_sigmoid_bce", "naive_softmax_ce", "shifted_softmax_ce",
           "stable_sigmoid_bce"]
