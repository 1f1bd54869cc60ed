"""What every kernel returns, and what a kernel reads of a loss model.

A kernel evaluates rows of a loss model: the row losses, the gradient of the reduced loss and
the error floor a correct implementation has in a given precision (verify/tolerance.py). The
numpy kernels (numpy_softmax.py, numpy_sigmoid.py) are the reference; the compiled kernel
(compiled.py) serves what it can and hands the rest back (returns None).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import numpy as np


# eq=False: it holds arrays, whose == is elementwise (and not generating __eq__ saves start-up)
@dataclass(frozen=True, eq=False)
class ChunkEval:
    """Reference values for rows [start, stop)."""

    loss: np.ndarray          # (R,) unreduced row losses loss_n (0 for ignored rows)
    grad: np.ndarray | None   # (R, C) gradient of the reduced loss
    floor: np.ndarray | None  # (R, C) error floor of a correct implementation (see tolerance.py)
    lse: np.ndarray           # (R,) log-sum-exp of the row
    total_weight: np.ndarray  # (R,) Q_n = sum_c q_nc
    items: np.ndarray | None = None        # (R, C) per-element losses (elementwise models)
    item_weight: np.ndarray | None = None  # (R, C) per-element loss scale (elementwise models)
    row_max: np.ndarray | None = None      # (R,) m, softmax rows: lse = m + log1p(s1) ...
    log1p_s1: np.ndarray | None = None     # (R,) ... kept apart, so log a = (z - m) - log1p(s1)
    row_terms: np.ndarray | None = None    # (R, k) model-specific per-row values for error bounds
    # the gradient and floor at the picked columns only ((R, k); `picks` of evaluate_rows)
    pick_grad: np.ndarray | None = None
    pick_floor: np.ndarray | None = None
    # (R, k) the rows' losses with one entry set (`steps` of evaluate_rows); NaN: not served
    step_loss: np.ndarray | None = None
    # (items, item_weight) on demand: the compiled kernel skips writing them in the streaming pass
    deferred: Callable[[], tuple[np.ndarray, np.ndarray]] | None = field(
        default=None, compare=False, repr=False)

    def per_element(self) -> tuple[np.ndarray, np.ndarray]:
        """(items, item_weight) of an elementwise model, computed now (once) when deferred."""
        if self.items is None and self.deferred is not None:
            items, weight = self.deferred()
            object.__setattr__(self, "items", items)  # a cache: the values do not change
            object.__setattr__(self, "item_weight", weight)
        return (required(self.items, "per-element losses"),
                required(self.item_weight, "per-element weights"))

    def picked(self, picks: np.ndarray) -> ChunkEval:
        """This evaluation with the gradient and floor at columns `picks` ((R, k), -1: none, NaN
        there) in place of the (R, C) arrays."""
        rows, cols = np.arange(picks.shape[0])[:, None], np.maximum(picks, 0)

        def pick(v):
            return None if v is None else np.where(picks >= 0, v[rows, cols], np.nan)

        return replace(self, grad=None, floor=None, pick_grad=pick(self.grad),
                       pick_floor=pick(self.floor))

    def take_rows(self, idx: np.ndarray) -> ChunkEval:
        """The per-row values of rows `idx` (per-entry arrays dropped)."""
        def pick(v):
            return None if v is None else v[idx]

        return ChunkEval(loss=self.loss[idx], grad=None, floor=None, lse=self.lse[idx],
                         total_weight=self.total_weight[idx], row_max=pick(self.row_max),
                         log1p_s1=pick(self.log1p_s1), row_terms=pick(self.row_terms))


def required(a: np.ndarray | None, what: str = "array") -> np.ndarray:
    """`a`, which this caller asked the kernel for (a ChunkEval's optional fields)."""
    if a is None:
        raise ValueError(f"the kernel did not return the {what} it was asked for")
    return a


class RowStats(Protocol):
    """Where the compiled kernel folds its per-row comparison statistics (verify's Comparison)."""

    tol: Any
    extra_atol: float
    flush: dict[str, float] | None  # the flush rule's kernel arguments (ce_args.flush_min)

    def update_summary(self, row0: int, n_entries: int, rowmax: np.ndarray, mismatches: np.ndarray,
                       nonfinite: np.ndarray, max_abs: np.ndarray, max_rel: np.ndarray,
                       open_rows: Any, got: Any, flushed: np.ndarray | None = None) -> None: ...


def take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """a[rows], a view (no copy of a memory-mapped file) when the rows are consecutive."""
    if rows.size and rows[-1] - rows[0] == rows.size - 1 and np.all(np.diff(rows) == 1):
        return a[int(rows[0]):int(rows[-1]) + 1]
    return a[rows]
