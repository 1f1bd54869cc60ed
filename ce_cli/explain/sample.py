"""Choosing the one sample to explain: parse --row, pick the row of (C,), (N, C) or (B, T, V)
logits (binary: the element of logits of any shape) and its target. Pure: the CLI parses text,
this validates and picks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.limits import explain_classes_refusal
from ce_cli.models.layout import Layout, make_layout, match_batch


@dataclass(frozen=True)
class Sample:
    z: np.ndarray                     # (C,) float64 (binary: (1,))
    label: int | None
    target: np.ndarray | None         # (C,) probabilities (binary: (1,) soft label)
    where: str                        # e.g. "row 7 of logits file 'x.npy'"
    row: tuple[int, ...] | None       # the index of the sample in the input's batch shape


def parse_row(text: str) -> tuple[int, ...]:
    """'7' (a flat row index) or '1,2' / '(1, 2)' (an index into the batch shape)."""
    body = text.strip().strip("()[]")
    parts = [p for p in body.replace(",", " ").split()]
    if not parts:
        raise CeCheckError(f"--row: empty index {text!r}; expected I or a tuple such as 1,2")
    try:
        idx = tuple(int(p) for p in parts)
    except ValueError:
        raise CeCheckError(f"--row: not an integer index: {text!r}; expected I or a tuple such as 1,2") from None
    if any(i < 0 for i in idx):
        raise CeCheckError(f"--row: negative index {text!r}; indices count from 0")
    return idx


def _flat_index(idx: tuple[int, ...] | None, shape: tuple[int, ...], what: str, source: str,
                full_shape: tuple[int, ...]) -> int:
    """A flat index into `shape` (the batch shape) from a flat or full index; required when there
    is a choice. `full_shape` is the input's shape, for messages."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if idx is None:
        if n == 1:
            return 0
        hint = f" or --row i,j,... (an index into {shape})" if len(shape) > 1 else ""
        raise CeCheckError(f"{source}: shape {full_shape} holds {n} {what}s; pick one with --row I "
                           f"(0..{n - 1}){hint}")
    if len(idx) == 1:
        if idx[0] >= n:
            raise CeCheckError(f"--row {idx[0]}: out of range: {source} (shape {full_shape}) holds "
                               f"{n} {what}s")
        return idx[0]
    if len(idx) != len(shape) or any(i >= s for i, s in zip(idx, shape)):
        raise CeCheckError(f"--row {','.join(map(str, idx))}: not an index into {shape}, the {what} "
                           f"shape of {source} (shape {full_shape})")
    return int(np.ravel_multi_index(idx, shape))


def _numeric(arr: np.ndarray, source: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise CeCheckError(f"{source}: dtype {arr.dtype} is not numeric")
    return arr


def softmax_sample(logits: np.ndarray, row: tuple[int, ...] | None, *, labels: np.ndarray | None,
                   label: int | None, target: np.ndarray | None, logits_source: str,
                   labels_source: str) -> Sample:
    """Row `row` of (C,), (N, C) or (B, T, V) logits (class axis last) and its target."""
    logits = _numeric(logits, logits_source)
    layout = make_layout(logits.shape, -1, logits_source)
    refusal = explain_classes_refusal(layout.n_classes, logits_source)
    if refusal:  # before the row is copied to float64
        raise CeCheckError(refusal)
    r = _flat_index(row, layout.batch_shape, "sample", logits_source, layout.shape)
    z = np.asarray(layout.to_rows(logits)[r], dtype=np.float64)
    batch_index = layout.batch_index(r)
    where = (f"row {r}" + (f" {batch_index}" if len(batch_index) > 1 else "")
             + f" of {logits_source}") if layout.batch_shape else logits_source
    if labels is not None:
        labels = _numeric(labels, labels_source)
        if labels.shape == logits.shape and not (labels.ndim == 1 and layout.n_classes == 1):
            target = np.asarray(layout.to_rows(labels)[r], dtype=np.float64)
        else:
            label = _class_label(labels, layout, r, labels_source)
    return Sample(z, label, target, where, batch_index if layout.batch_shape else None)


def _class_label(labels: np.ndarray, layout: Layout, r: int, labels_source: str) -> int:
    """The class index of sample r, from labels with the batch shape."""
    batch_index = layout.batch_index(r)
    C = layout.n_classes
    y = match_batch(labels, layout, labels_source, "class-index labels")[r]
    yf = float(y)
    if not math.isfinite(yf) or yf != round(yf):
        raise CeCheckError(f"{labels_source}: label {y!r} of sample {batch_index} is not a whole "
                           "number (class indices must be integers; probability targets need "
                           "the logits' shape)")
    label = int(yf)
    if not 0 <= label < C:
        extra = " (PyTorch's ignore_index: that sample has no gradient to explain)" if label == -100 else ""
        raise CeCheckError(f"{labels_source}: label {label} of sample {batch_index} is out of "
                           f"range [0, {C}){extra}")
    return label


def binary_sample(logits: np.ndarray, row: tuple[int, ...] | None, *, labels: np.ndarray | None,
                  label: float | None, logits_source: str, labels_source: str) -> Sample:
    """Element `row` of logits of any shape, and its label."""
    logits = _numeric(logits, logits_source)
    if logits.size == 0:
        raise CeCheckError(f"{logits_source}: shape {logits.shape}: no logits")
    shape = tuple(logits.shape)
    r = _flat_index(row, shape, "logit", logits_source, shape)
    index = tuple(int(i) for i in np.unravel_index(r, shape)) if shape else ()
    z = np.array([float(logits.reshape(-1)[r])])
    if labels is not None:
        labels = _numeric(labels, labels_source)
        if labels.size != logits.size:
            raise CeCheckError(f"{labels_source}: shape {labels.shape} does not match the logits "
                               f"{shape}: binary labels need the logits' shape")
        label = float(labels.reshape(-1)[r])
    where = f"element {index} of {logits_source}" if logits.size > 1 else logits_source
    return Sample(z, None, np.array([label], dtype=np.float64), where, index if shape else None)
