"""The plan of a sharded run: the shards' files, each shard placed along the split axis, the
merged report's shape, and the `Mapper` that runs each step over the shards (a plain loop
here, Dask tasks in `ce_cli.distributed`).

describe: each shard's logits shape; the plan gives every shard its offset along the split
axis (axis 0 for rows, the class axis for the vocabulary), in the order the files are given.
Sigmoid BCE shards split rows (axis 0) or columns (`cols`, the last axis; 1-D logits are one
row, so their shards are always columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.verify.results import Report


AXES = {"softmax": ("rows", "vocab"), "binary": ("rows", "cols")}


@dataclass(frozen=True)
class ShardFiles:
    """One shard's files as given: its logits, its labels (rows: its own, or the one file of all
    rows it is sliced from; vocabulary: the one file of global ids) and its gradient."""

    logits: str
    labels: str
    grad: str | None = None


@dataclass(frozen=True)
class Shard:
    """A shard placed in the batch: `offset` and `size` along the split axis (axis 0 for
    rows, the class axis for the vocabulary and binary columns); `labels_range` the part of a
    shared labels file along that axis; `kind` softmax or binary; `extent` the batch's size
    along the split axis (the vocabulary's V)."""

    index: int
    files: ShardFiles
    axis: str
    offset: int
    size: int
    shape: tuple[int, ...]
    labels_range: tuple[int, int] | None = None
    kind: str = "softmax"
    extent: int = 0

    @property
    def name(self) -> str:
        return self.files.logits


@dataclass(frozen=True)
class ShardPlan:
    """Which files, split along which axis, and the global logits shape they make."""

    axis: str
    shards: tuple[Shard, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardSummary:
    """One shard's line of the report."""

    index: int
    source: str
    offset: int
    size: int
    ok: bool
    verdict: str
    mismatches: int
    loss: float


@dataclass(frozen=True)
class ShardedReport:
    """The merged report (the single-process report's equal) and one summary per shard."""

    axis: str
    report: Report
    shards: tuple[ShardSummary, ...]


class Mapper(Protocol):
    """Runs `fn(item, *shared)` for every item (results in order); `reduce` maps then combines,
    returning a handle `map` accepts in `shared` (the value, or a future on a cluster)."""

    def map(self, fn: Callable[..., Any], items: Sequence[Any], shared: tuple = (),
            progress: Callable[[int, int], None] | None = None) -> list: ...

    def reduce(self, fn: Callable[..., Any], items: Sequence[Any],
               combine: Callable[[list], Any]) -> Any: ...


class LocalMapper:
    """The single-process path: one shard after the other, in this process."""

    def map(self, fn: Callable[..., Any], items: Sequence[Any], shared: tuple = (),
            progress: Callable[[int, int], None] | None = None) -> list:
        out = []
        for i, item in enumerate(items):
            out.append(fn(item, *shared))
            if progress is not None:
                progress(i + 1, len(items))
        return out

    def reduce(self, fn: Callable[..., Any], items: Sequence[Any],
               combine: Callable[[list], Any]) -> Any:
        return combine(self.map(fn, items))


def one_or_per_shard(label: str, count: int, n: int, what: str = "logits") -> None:
    """A batch-shaped input comes as one file for the batch or one file per shard."""
    if count not in (1, n):
        raise CeCheckError(f"{label}: {count} files for {n} {what} shards (give one per shard, "
                           "or one file for the whole batch)")


def pair_files(logits: Sequence[str], labels: Sequence[str],
               grads: Sequence[str] | None) -> list[ShardFiles]:
    """Pair the i-th logits, labels and gradient files; one labels file serves every shard."""
    one_or_per_shard("labels", len(labels), len(logits))
    if grads is not None and len(grads) != len(logits):
        raise CeCheckError(f"`grad`: {len(grads)} files for {len(logits)} logits shards")
    return [ShardFiles(z, labels[i] if len(labels) > 1 else labels[0],
                       grads[i] if grads is not None else None) for i, z in enumerate(logits)]


def detect_axis(shapes: Sequence[tuple[int, ...]], label_shapes: Sequence[tuple[int, ...]],
                kind: str = "softmax") -> str:
    """rows when each shard has its own labels or one labels file covers the rows of all
    shards; vocab when one labels file has each shard's own batch shape. Binary: cols when
    one labels file covers the shards' columns, or the shards share their rows and differ in
    their columns."""
    if kind == "binary":
        return _detect_binary_axis(shapes, label_shapes)
    if len(label_shapes) > 1 or len(shapes) == 1 or not label_shapes[0]:
        return "rows"
    batch = label_shapes[0]
    if batch[0] != sum(s[0] for s in shapes) and all(s[:-1] == batch for s in shapes):
        return "vocab"
    return "rows"


def _detect_binary_axis(shapes: Sequence[tuple[int, ...]],
                        label_shapes: Sequence[tuple[int, ...]]) -> str:
    if any(len(s) < 2 for s in shapes):
        return "cols"
    if len(label_shapes) == 1 and len(shapes) > 1 and label_shapes[0]:
        return "cols" if label_shapes[0][-1] == sum(s[-1] for s in shapes) else "rows"
    if all(s[:-1] == shapes[0][:-1] for s in shapes) and len({s[-1] for s in shapes}) > 1:
        return "cols"
    return "rows"


def make_plan(files: Sequence[ShardFiles], shapes: Sequence[tuple[int, ...]],
              label_shapes: Sequence[tuple[int, ...]], axis: str | None,
              kind: str = "softmax") -> ShardPlan:
    """Offsets along the split axis, in the order given; shapes must agree off that axis."""
    if not files:
        raise CeCheckError("`shards`: no shard given")
    axis = _resolve_axis(axis or detect_axis(shapes, label_shapes, kind), shapes, kind)
    _check_shapes(files, shapes, axis, kind)
    split = 0 if axis == "rows" else -1
    offsets = np.concatenate([[0], np.cumsum([s[split] for s in shapes])]).astype(int).tolist()
    shared = len({f.labels for f in files}) == 1 and len(files) > 1 and \
        (axis == "rows" or kind == "binary")
    shards = tuple(Shard(i, f, axis, offsets[i], shapes[i][split], tuple(shapes[i]),
                         (offsets[i], offsets[i + 1]) if shared else None, kind, offsets[-1])
                   for i, f in enumerate(files))
    rest = _off_axis(shapes[0], axis)
    shape = (offsets[-1],) + rest if axis == "rows" else rest + (offsets[-1],)
    return ShardPlan(axis, shards, shape)


def _resolve_axis(axis: str, shapes: Sequence[tuple[int, ...]], kind: str) -> str:
    if axis not in AXES[kind]:
        raise CeCheckError(f"`shards`: unknown split '{axis}' (use {', '.join(AXES[kind])} or auto)")
    if kind == "binary" and len(shapes[0]) == 1:
        return "cols"  # 1-D logits are one row: its entries are the columns
    return axis


def _off_axis(shape: tuple[int, ...], axis: str) -> tuple[int, ...]:
    return tuple(shape[1:]) if axis == "rows" else tuple(shape[:-1])


def _check_shapes(files: Sequence[ShardFiles], shapes: Sequence[tuple[int, ...]], axis: str,
                  kind: str) -> None:
    for f, shape in zip(files, shapes):
        if len(shape) < (1 if kind == "binary" else 2):
            raise CeCheckError(f"logits file '{f.logits}': shape {shape}; a shard needs "
                               "(rows, ..., classes) logits")
        if _off_axis(shape, axis) != _off_axis(shapes[0], axis):
            raise CeCheckError(f"logits file '{f.logits}': shape {shape} does not match the "
                               f"first shard's {shapes[0]} off the split axis ({axis})")
