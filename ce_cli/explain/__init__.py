"""`ce-check explain`: the derivation of dC/dz = a - y, verified number by number on one sample.

Multiclass (softmax cross-entropy), logits z in R^C, target y (one-hot or probabilities):

    a = softmax(z),  J[j, i] = da_j/dz_i = a_i (1{i=j} - a_j),  dC/da_j = -y_j / a_j
    dC/dz_i = sum_j J[j, i] dC/da_j = -y_i + a_i sum_j y_j = a_i - y_i   when sum y = 1

Binary (sigmoid BCE), one logit z and a label y in [0, 1]:

    s = sigmoid(z),  s' = s (1 - s),  dC/ds = -y/s + (1 - y)/(1 - s),  dC/dz = s' dC/ds = s - y

Modules, top to bottom: sample (which sample), softmax and binary (the derivations and their
checks), mse (--compare-mse), steps (--steps), display (what the tables show), render (the one
Output for `emit`); below them results (the dataclasses) and common (shared stable pieces and
check helpers). Pure numpy up to render.
"""

from ce_cli.explain.binary import explain_binary
from ce_cli.explain.common import KAPPA
from ce_cli.explain.mse import SATURATION_OFFSETS, compare_mse
from ce_cli.explain.results import Explanation, MseComparison, SaturationRow, StepCurve
from ce_cli.explain.sample import Sample, binary_sample, parse_row, softmax_sample
from ce_cli.explain.softmax import FULL_C, explain_softmax
from ce_cli.explain.steps import step_curve

__all__ = ["FULL_C", "KAPPA", "SATURATION_OFFSETS", "Explanation", "MseComparison", "SaturationRow",
           "Sample", "StepCurve", "binary_sample", "compare_mse", "explain_binary", "explain_softmax",
           "parse_row", "softmax_sample", "step_curve"]
