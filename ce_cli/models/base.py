"""What every loss model is: logits as (N, C) rows, targets, a reduction, and a kernel that
evaluates rows (kernels/). `LossModel` spells out the interface the checks use."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ce_cli.enums import Reduction
from ce_cli.errors import CeCheckError
from ce_cli.io.bfloat16 import as_array
from ce_cli.kernels.base import ChunkEval
from ce_cli.models.layout import Layout

REDUCTIONS = tuple(r.value for r in Reduction)


class LossModel(Protocol):
    """A validated problem: the checks (verify/) see nothing else of a model."""

    z: Any                 # (N, C) logits in the user's dtype, maybe memory-mapped
    layout: Layout
    reduction: str
    source: str

    @property
    def n_rows(self) -> int: ...
    @property
    def n_classes(self) -> int: ...
    @property
    def valid(self) -> np.ndarray: ...
    @property
    def target_kind(self) -> str: ...
    @property
    def grad_scale(self) -> float: ...
    @property
    def max_target_weight(self) -> float: ...
    @property
    def per_sample_shape(self) -> tuple[int, ...]: ...
    @property
    def per_sample_cols(self) -> tuple[int, ...]: ...
    @property
    def kernel_name(self) -> str: ...

    def reduce(self, row_loss_sum: float) -> float: ...
    def evaluate(self, start: int, stop: int, *, grad: bool = True,
                 floor_coef: float | None = None, lse_weight: float = 1.0) -> ChunkEval: ...
    def evaluate_rows(self, z_rows: np.ndarray, rows: np.ndarray, *, grad: bool = True,
                      floor_coef: float | None = None, lse_weight: float = 1.0) -> ChunkEval: ...
    def target_columns(self, rows: np.ndarray) -> np.ndarray: ...
    def per_sample(self, ev: ChunkEval) -> np.ndarray: ...
    def loss_floor(self, ev: ChunkEval, coef: float, rows: np.ndarray) -> np.ndarray: ...
    def per_sample_index(self, row: int, col: int) -> tuple[int, ...]: ...
    def match_per_sample(self, arr: np.ndarray, source: str) -> np.ndarray: ...
    def fd_error_bound(self, rows: np.ndarray, cols: np.ndarray, z_entry: np.ndarray,
                       h: np.ndarray, ev: ChunkEval) -> np.ndarray: ...
    def directional_error_bound(self, ep: ChunkEval, em: ChunkEval,
                                delta: np.ndarray) -> np.ndarray: ...


class RowMatrix:
    """Shared by the loss models (frozen dataclasses with a field `z`: the logits as (N, C) rows)."""

    z: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.z.shape[0]

    @property
    def n_classes(self) -> int:
        return self.z.shape[1]

    def evaluate(self, start: int, stop: int, *, grad: bool = True,
                 floor_coef: float | None = None, lse_weight: float = 1.0) -> ChunkEval:
        """Rows [start, stop) of the problem."""
        return self.evaluate_rows(self.z[start:stop], np.arange(start, stop), grad=grad,  # type: ignore[attr-defined]
                                  floor_coef=floor_coef, lse_weight=lse_weight)


def as_numeric_inputs(logits, labels, reduction: str, source: str, labels_source: str):
    """The checks every loss model starts with: numeric arrays and a known reduction."""
    logits, labels = as_array(logits), as_array(labels)
    if logits.dtype.kind not in "biuf":
        raise CeCheckError(f"{source}: dtype {logits.dtype} is not numeric")
    if labels.dtype.kind not in "biuf":
        raise CeCheckError(f"{labels_source}: dtype {labels.dtype} is not numeric")
    if reduction not in REDUCTIONS:
        raise CeCheckError(f"`reduction`: unknown value '{reduction}' (use mean, sum or none)")
    return logits, labels
