"""The two-class bridge: softmax CE over two classes is sigmoid BCE on their difference."""

from __future__ import annotations

import numpy as np

from ce_cli.kernels.numerics import EPS, sigmoid
from ce_cli.verify.compare import Comparison
from ce_cli.verify.reference import softmax_reference
from ce_cli.verify.results import CheckResult
from ce_cli.verify.tolerance import Tolerance

BRIDGE_ELEMENTS = 1 << 14
# the note of a bridge checked on the plain loss of a problem with training-code options
WITHOUT_OPTIONS = "identity checked on the plain loss, without the options"


def two_class_bridge(problem, worst: int = 5, note: str = "") -> CheckResult:
    """Softmax CE over [0, x] with targets [1 - y, y] against sigmoid BCE(x, y), element by
    element (the first 2^14 elements): losses, d/dz1 against s(x) - y, -d/dz0 against the same.
    Both sides are float64 references, so the rule is 1e-12 relative."""
    K = problem.n_classes
    rows = max(1, min(problem.n_rows, BRIDGE_ELEMENTS // K))
    ev = problem.evaluate_rows(problem.z[:rows], np.arange(rows))
    x = np.asarray(problem.z[:rows], dtype=np.float64).reshape(-1)
    y = np.asarray(problem.targets[:rows], dtype=np.float64).reshape(-1)
    pair = np.stack([np.zeros_like(x), x], axis=1)
    ce = softmax_reference(pair, np.stack([1.0 - y, y], axis=1), reduction="none")
    scale = problem.grad_scale
    bce = np.stack([ev.items.reshape(-1), ev.grad.reshape(-1) / scale, ev.grad.reshape(-1) / scale], 1)
    mine = np.stack([ce.per_sample, ce.grad[:, 1], -ce.grad[:, 0]], axis=1)
    # both sides are float64 references: 1e-12 relative, plus their own rounding. CE's targets
    # [1 - y, y] and their sum Q round, so dz1 = Q a1 - y errs by eps*(s + y), dz0 = Q a0 - (1 - y)
    # by eps*((1 - s) + (1 - y)); the loss by eps*(|loss| + |x|)
    s_x = sigmoid(x)
    with np.errstate(over="ignore"):
        floor = 8.0 * EPS * np.stack([np.abs(bce[:, 0]) + np.abs(x), s_x + y, (1.0 - s_x) + (1.0 - y)],
                                     1)
    tol = Tolerance("f64", EPS, 2.0**-1074, rtol=1e-12, atol=0.0, floor_factor=8.0)
    layout = problem.layout
    parts = ("loss", "d/dz1", "-d/dz0")

    def index_of(i, part):
        return layout.original_index(*divmod(int(i), K)) + (parts[part],)

    cmp = Comparison("two_class_bridge", tol, index_of, expected_label="sigmoid BCE",
                     got_label="softmax CE [0, z]", n_worst=worst,
                     note=note or f"{x.size} elements: CE([0, z]) = BCE(z), d/dz1 = s(z) - y = -d/dz0")
    cmp.update(0, bce, mine, floor)
    return cmp.result()
