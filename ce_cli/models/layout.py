"""Map user layouts to the canonical (N, C) row matrix and back.

Class axis last by default: (C,), (N, C), (B, T, V). With `class_axis=1`, PyTorch's
(N, C, d1, ...) layout. Rows are the flattened batch positions in C order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ce_cli.errors import CeCheckError


@dataclass(frozen=True)
class Layout:
    """Where the class axis sits in the user's logits, and how rows map back to indices."""

    shape: tuple[int, ...]
    class_axis: int

    @property
    def n_classes(self) -> int:
        return self.shape[self.class_axis]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.shape[: self.class_axis] + self.shape[self.class_axis + 1 :]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.batch_shape, dtype=np.int64))

    def original_index(self, row: int, col: int) -> tuple[int, ...]:
        """The index in the user's array of entry (row, col) of the (N, C) matrix."""
        batch = tuple(int(i) for i in np.unravel_index(int(row), self.batch_shape)) if self.batch_shape else ()
        return batch[: self.class_axis] + (int(col),) + batch[self.class_axis :]

    def batch_index(self, row: int) -> tuple[int, ...]:
        """The index in the batch shape (the labels' shape) of row `row`."""
        if not self.batch_shape:
            return ()
        return tuple(int(i) for i in np.unravel_index(int(row), self.batch_shape))

    def to_rows(self, arr: np.ndarray) -> np.ndarray:
        """(..., C, ...) with this layout's shape -> (N, C); a view when the class axis is last."""
        moved = arr if self.class_axis == arr.ndim - 1 else np.moveaxis(arr, self.class_axis, -1)
        return moved.reshape(self.n_rows, self.n_classes)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        moved_shape = self.batch_shape + (self.n_classes,)
        return np.moveaxis(rows.reshape(moved_shape), -1, self.class_axis)


def make_layout(shape: tuple[int, ...], class_axis: int, source: str) -> Layout:
    """Validate the logits' shape and class axis (negative counts from the end)."""
    if len(shape) == 0:
        raise CeCheckError(f"{source}: scalar logits (shape ()); expected (C,), (N, C) or more axes")
    axis = 0 if len(shape) == 1 else class_axis
    if not -len(shape) <= axis < len(shape):
        raise CeCheckError(f"{source}: shape {shape} has no axis {class_axis} (`class_axis`)")
    axis %= len(shape)
    layout = Layout(tuple(int(s) for s in shape), axis)
    if layout.n_classes == 0:
        raise CeCheckError(f"{source}: shape {shape}: zero classes along axis {axis}")
    if layout.n_rows == 0:
        raise CeCheckError(f"{source}: shape {shape}: empty batch")
    return layout


def match_batch(arr: np.ndarray, layout: Layout, source: str, what: str) -> np.ndarray:
    """Reshape `arr` (labels, per-sample losses) with the batch shape to (N,).

    Accepts the batch shape itself, a trailing singleton column (one-column CSV), for a
    one-axis batch a single row (one-line CSV) or, for a multi-axis batch, the flattened (N,) vector.
    """
    shape = arr.shape
    batch = layout.batch_shape
    if (shape == batch or shape == batch + (1,) or (len(batch) == 1 and shape == (1,) + batch)
            or (len(batch) > 1 and shape == (layout.n_rows,))):
        return arr.reshape(layout.n_rows)
    if not batch and arr.size == 1:
        return arr.reshape(1)
    expected = f"{batch}" if batch else "a scalar"
    raise CeCheckError(
        f"{source}: shape {shape} does not match the logits {layout.shape}: "
        f"{what} should have shape {expected} (class axis {layout.class_axis} removed)"
        + _other_axis_hint(shape, layout)
    )


def _other_axis_hint(shape: tuple[int, ...], layout: Layout) -> str:
    """`; with class_axis=1 it fits` when the labels match the logits with the classes on the
    other usual axis (PyTorch's (N, C, d1, ...) versus class axis last)."""
    full = layout.shape
    for axis, flag in ((1, "`class_axis=1`"), (len(full) - 1, "`class_axis=-1` (the default)")):
        if axis == layout.class_axis or not 0 < axis < len(full):
            continue
        if tuple(shape) == full[:axis] + full[axis + 1:]:
            return f"; with {flag} the classes are axis {axis} and the shapes fit"
    return ""
