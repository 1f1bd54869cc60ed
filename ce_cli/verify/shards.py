"""Sharded batches: a row-split (data-parallel ranks) or vocabulary-split (tensor-parallel ranks)
batch checked shard by shard, never concatenated, and the per-shard reports merged into one.

The run has three steps, each a map over the shards (`Mapper`: a plain loop here, Dask tasks in
`ce_cli.distributed`):

- describe: each shard's logits shape; the plan gives every shard its offset along the split
  axis (axis 0 for rows, the class axis for the vocabulary), in the order the files are given.
- pass 1: rows: each shard's denominator D_i (its non-ignored targets) -> D = sum D_i, the
  global denominator of 'mean'. Vocabulary: each shard's per-row max m_i and s1_i, the sum of
  exp(z - m_i) over its entries but its arg-max, in float64; merged as the kernel merges
  chunks: m = max m_i, s1 = s1_* + sum_{j != *} (1 + s1_j) exp(m_j - m) (* the shard holding
  m), lse = m + log1p(s1).
- pass 2: each shard checked on its own: row shards with the global denominator, vocabulary
  shards with `vocab_offset` and the global lse.

Sigmoid BCE (`kind="binary"`) needs no pass 1: every entry is independent, 'mean' divides by
the batch's entry count (known from the shapes), and shards split rows (axis 0) or columns
(`cols`, the last axis; 1-D logits are one row, so their shards are always columns). The
two-class bridge covers the batch's first 2^16 elements, as in one process: each shard checks
its part of them.

Merging (`merge_reports`): counts and totals add, maxima take the maximum, the worst entries are
re-ranked by |error| / allowed over the shards' own worst lists (each shard's top k holds the
global top k), with GLOBAL indices. The loss is `math.fsum` of the shards' losses, each an
exactly rounded sum of its rows (divided by D for 'mean'): for non-negative row losses it is
within (2 + n_shards) eps/2 relative of the single-process loss.

The batch's other inputs (`BatchInputs`): class weights (every shard reads the C values; pass 1
sums w_y s_n; vocabulary shards weigh each row by w_y), batch-shaped inputs (one file for the
batch, each shard its rows, or one per shard) and your loss: per sample, each shard compares its
own; reduced, each shard sums its rows' floors in its pass (`ShareStage`) and the client compares
your value once with the merged loss (`batch_checks`), as `LossStage` would on the batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ce_cli.enums import FDMode
from ce_cli.errors import CeCheckError
from ce_cli.io import limits
from ce_cli.io.inputs import InputSpec, Origin
from ce_cli.io.loading import is_array_file, read_stdin
from ce_cli.kernels.numerics import loss_sum
from ce_cli.models.sigmoid import SigmoidBCE, build_sigmoid_bce
from ce_cli.models.semantics import Semantics
from ce_cli.models.softmax import build_softmax_ce, class_weights
from ce_cli.verify.bridge import BRIDGE_ELEMENTS, WITHOUT_OPTIONS, two_class_bridge
from ce_cli.verify.checks import check_grad, refuse_softmax_only, shift_labels
from ce_cli.verify.finite_diff import choose_mode
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.pipeline import Inputs, Run, verify
from ce_cli.verify.results import CheckResult, Diagnosis, Entry, InputInfo, Report, verdict_line
from ce_cli.verify.allowance import normaliser_bound
from ce_cli.verify.compare import Comparison
from ce_cli.verify.stages import (LossStage, Stage, ZLossStage, reduced_check,
                                  with_normaliser)
from ce_cli.verify.tolerance import Tolerance, resolve_tolerance

AXES = {"softmax": ("rows", "vocab"), "binary": ("rows", "cols")}
ROW_CHUNK = 1 << 20  # float64 entries per chunk of pass 1


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
    shared labels file along that axis; `kind` softmax or binary."""

    index: int
    files: ShardFiles
    axis: str
    offset: int
    size: int
    shape: tuple[int, ...]
    labels_range: tuple[int, int] | None = None
    kind: str = "softmax"

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


@dataclass(frozen=True)
class BatchInputs:
    """The batch's inputs beside LOGITS, LABELS and --grad, as files (or URLs) the shards read.

    `weight`: one file of class weights (C values; binary: element weights broadcast to the
    logits, cut along the split axis where they span it). `arrays`: (role, files) of the
    batch-shaped inputs, `sample_weight`, `lse`, `z_loss_value` and `loss` (per sample with
    reduction none), each one file for the batch (a shard takes its rows) or one per shard.
    `loss` and `z_loss`: your reduced loss and z-loss (numbers, compared once with the merged
    reference), their dtypes setting the tolerance."""

    weight: str | None = None
    arrays: tuple[tuple[str, tuple[str, ...]], ...] = ()
    loss: float | None = None
    loss_dtype: str = "float64"
    loss_source: str = "loss"
    z_loss: float | None = None
    z_loss_dtype: str = "float64"
    z_loss_source: str = "z_loss_value"

    def files(self, role: str) -> tuple[str, ...]:
        return dict(self.arrays).get(role, ())


NO_INPUTS = BatchInputs()


@dataclass(frozen=True)
class ShardShare:
    """A shard's share of the batch's reduced comparisons: its rows' loss floors and Q_n
    (`LossStage`'s, summed), and its reduced z-loss and the z-loss rows' floors; with the
    problem's grad_scale and normaliser bound, the same in every shard."""

    loss_floor: float = 0.0
    loss_weight: float = 0.0
    z_loss: float = 0.0
    z_loss_floor: float = 0.0
    grad_scale: float = 1.0
    normaliser: float = 0.0


class ShareStage(Stage):
    """Collects a `ShardShare` in the shard's streaming pass (the single-process stages' own
    row floors), and leaves a passing placeholder where the merged check goes."""

    def __init__(self, problem: Any, tols: tuple[Tolerance | None, Tolerance | None],
                 options: CheckOptions) -> None:
        loss_tol, z_tol = tols
        self.problem = problem
        self.loss = (LossStage(problem, np.zeros(1), loss_tol, 0.0, 1, None,  # type: ignore[arg-type]
                               options.normaliser_rtol) if loss_tol is not None else None)
        self.z_loss = (ZLossStage(problem, np.zeros(1), z_tol, 1, 0.0, options.normaliser_rtol)
                       if z_tol is not None else None)

    def update(self, chunk: Any) -> None:
        for stage in (self.loss, self.z_loss):
            if stage is not None:
                stage.update(chunk)

    def finish(self) -> list[tuple[int, CheckResult]]:
        names = [n for n, st in (("loss_vs_reference", self.loss),
                                 ("z_loss_vs_reference", self.z_loss)) if st is not None]
        return [(2, CheckResult(name=n, ok=True, expected_label="reference", got_label="yours",
                                max_abs_err=0.0, max_rel_err=0.0, mismatches=0, total=0,
                                worst=(), rule="merged over the shards")) for n in names]

    def share(self) -> ShardShare:
        problem, out = self.problem, ShardShare(grad_scale=float(self.problem.grad_scale))
        if self.loss is not None:
            weight = self.loss.weight
            out = replace(out, loss_floor=math.fsum(self.loss.floor.reshape(-1).tolist()),
                          loss_weight=math.fsum(weight.tolist()) if weight is not None else 0.0,
                          normaliser=self.loss.normaliser if weight is not None else 0.0)
        if self.z_loss is not None:
            out = replace(out, z_loss=float(problem.reduce(loss_sum(self.z_loss.rows))),
                          z_loss_floor=math.fsum(self.z_loss.floor.tolist()))
        return out


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


# ---------------------------------------------------------------- files and loading


def natural_key(text: str) -> list:
    """Sort key: digit runs compare as numbers (logits_2 before logits_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def expand(pattern: str, role: str) -> list[str]:
    """The files a glob names (fsspec URLs through fsspec), in natural order; a name without
    wildcards stands for itself."""
    if not any(ch in pattern for ch in "*?["):
        return [pattern]
    if "://" in pattern:
        try:
            import fsspec  # type: ignore[import-untyped]  # optional: fsspec URLs

            fs, inner = fsspec.core.url_to_fs(pattern)
            paths = fs.glob(inner)
        except ImportError:
            raise CeCheckError(f"{role} '{pattern}': a URL needs fsspec (pip install fsspec)") from None
        except (ValueError, OSError) as exc:
            raise CeCheckError(f"{role} '{pattern}': cannot list ({' '.join(str(exc).split())[:200]})") from None
        found = [fs.unstrip_protocol(p) for p in paths]
    else:
        import glob

        found = glob.glob(pattern)
    if not found:
        raise CeCheckError(f"{role} '{pattern}': matches no file")
    return sorted(found, key=natural_key)


def load(path: str, role: str) -> np.ndarray:
    """A shard's array, read where the code runs: local paths memory-mapped by ce-check's
    loader, URLs (`s3://...`) through fsspec (when installed)."""
    if "://" not in path:
        return InputSpec(role, path, Origin.file).load()
    fs, inner, _size = open_url(path, role)
    label = f"{role} file '{path}'"
    try:
        with fs.open(inner, "rb") as fh:
            return read_stdin(label, fh)  # at most MAX_STREAM_BYTES; header checked against the size
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc})") from None


def open_url(path: str, role: str) -> tuple[Any, str, int]:
    """fsspec's file system, the path within it and the size of the file a URL names: a regular
    file (no symbolic link followed), not empty, within MAX_STREAM_BYTES (it is read whole)."""
    label = f"{role} file '{path}'"
    try:
        import fsspec  # type: ignore[import-untyped]  # optional: fsspec URLs
    except ImportError:
        raise CeCheckError(f"{label}: a URL needs fsspec (pip install fsspec)") from None
    try:
        fs, inner = fsspec.core.url_to_fs(path)
        info = fs.info(inner)
    except FileNotFoundError:
        raise CeCheckError(f"{label}: no such file") from None
    except (ImportError, ValueError, OSError) as exc:  # an unknown protocol, its backend missing
        raise CeCheckError(f"{label}: cannot read ({' '.join(str(exc).split())[:200]})") from None
    if info.get("islink") or info.get("type") == "link":
        raise CeCheckError(f"{label}: is a symbolic link; name the file itself")
    if info.get("type") != "file":
        raise CeCheckError(f"{label}: not a regular file")
    size = int(info.get("size") or 0)
    if size == 0:
        raise CeCheckError(f"{label}: empty file")
    if size > limits.MAX_STREAM_BYTES:
        raise CeCheckError(f"{label}: {size} bytes, over the {limits.MAX_STREAM_BYTES} a URL may "
                           "hold (it is read into memory); split it into smaller shards")
    return fs, inner, size


def describe(path: str, role: str) -> tuple[int, ...]:
    """The shape of the array at `path` (a .npy is memory-mapped, or for a URL its header alone
    read and checked against the file's size)."""
    if "://" not in path:
        return tuple(load(path, role).shape)
    fs, inner, size = open_url(path, role)
    label = f"{role} file '{path}'"
    with fs.open(inner, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            return tuple(load(path, role).shape)  # .npz or text: read whole
        fh.seek(0)
        try:
            version = np.lib.format.read_magic(fh)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _fortran, dtype = read(fh, max_header_size=limits.MAX_NPY_HEADER_BYTES)
        except (ValueError, OSError, EOFError) as exc:
            raise CeCheckError(f"{label}: corrupt .npy header ({' '.join(str(exc).split())[:200]})") from None
        data = size - fh.tell()
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize > data:
        raise CeCheckError(f"{label}: truncated or corrupt: header says shape {tuple(shape)} "
                           f"{dtype}, the file holds {data} data bytes")
    return tuple(int(d) for d in shape)


# ---------------------------------------------------------------- the plan


def pair_files(logits: Sequence[str], labels: Sequence[str],
               grads: Sequence[str] | None) -> list[ShardFiles]:
    """Pair the i-th logits, labels and gradient files; one labels file serves every shard."""
    if len(labels) not in (1, len(logits)):
        raise CeCheckError(f"labels: {len(labels)} files for {len(logits)} logits shards "
                           "(give one per shard, or one file for the whole batch)")
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
                         (offsets[i], offsets[i + 1]) if shared else None, kind)
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


# ---------------------------------------------------------------- pass 1


def shard_labels(shard: Shard) -> np.ndarray:
    """The shard's labels: its own file, or its part of the one file of the batch."""
    y = load(shard.files.labels, "labels")
    if shard.labels_range is not None:
        start, stop = shard.labels_range
        y = cut_part(y, 0 if shard.axis == "rows" else -1, start, stop,
                 f"labels file '{shard.files.labels}'")
    return y


def cut_part(arr: np.ndarray, along: int, start: int, stop: int, label: str) -> np.ndarray:
    """[start, stop) of `arr` along axis 0 (rows) or -1 (columns)."""
    what = "rows" if along == 0 else "columns"
    if arr.ndim == 0 or arr.shape[along] < stop:
        raise CeCheckError(f"{label}: shape {arr.shape} has fewer than the {stop} {what} of the "
                           "shards")
    return arr[start:stop] if along == 0 else arr[..., start:stop]


PER_ELEMENT = ("loss",)  # binary: one value an element, the logits' shape (cut along columns too)


def shard_part(shard: Shard, files: Sequence[str], role: str) -> np.ndarray:
    """The shard's part of a batch-shaped input: its own file (one per shard), or its part of
    the one file of the batch: its rows on row shards; on vocabulary and column shards, which
    hold every row, all of it (binary per-element roles and 1-D logits: its columns)."""
    if len(files) > 1:
        return load(files[shard.index], role)
    arr, label = load(files[0], role), f"{role} file '{files[0]}'"
    if shard.axis == "rows":
        return cut_part(arr, 0, shard.offset, shard.offset + shard.size, label)
    if shard.kind == "binary" and (role in PER_ELEMENT or len(shard.shape) == 1):
        return cut_part(arr, -1, shard.offset, shard.offset + shard.size, label)
    return arr


def shard_weight(shard: Shard, path: str) -> np.ndarray:
    """Class weights (softmax: C values, each shard all of them); binary element weights, cut
    along the split axis where they span it (a weight of size 1 there broadcasts)."""
    w = load(path, "weight")
    if shard.kind != "binary":  # a one-row or one-column table is its C values, as in one process
        table = w.ndim == 2 and 1 in w.shape and not (
            path.lower().endswith((".npy", ".npz")) if "://" in path else is_array_file(Path(path)))
        return w.reshape(-1) if table else w
    along = 0 if shard.axis == "rows" else -1
    ndim = len(shard.shape)
    spans = w.ndim == ndim if along == 0 else w.ndim >= 1
    if spans and w.shape[along] != 1:
        return cut_part(w, along, shard.offset, shard.offset + shard.size, f"weight file '{path}'")
    return w


def shard_arrays(shard: Shard, inputs: BatchInputs) -> dict[str, np.ndarray]:
    """The shard's part of every input of `inputs` (weight, sample_weight, lse, z_loss_value,
    per-sample loss) by role."""
    out = {role: shard_part(shard, files, role) for role, files in inputs.arrays}
    if inputs.weight is not None:
        out["weight"] = shard_weight(shard, inputs.weight)
    return out


def shard_denominator(shard: Shard, options: CheckOptions,
                      inputs: BatchInputs = NO_INPUTS) -> float:
    """D_i: the shard's non-ignored index targets (after `shift_labels`; its rows, for
    probability targets), each counted w_y s_n with class weights w and sample weights s."""
    y = np.asarray(shard_labels(shard))
    arrays = shard_arrays(shard, inputs)
    sw = arrays.get("sample_weight")
    s = None if sw is None else np.asarray(sw, dtype=np.float64).reshape(-1)
    if y.shape == shard.shape:
        return float(math.prod(shard.shape[:-1])) if s is None else math.fsum(s.tolist())
    if options.shift_labels:  # within the shard's sequences, as its check shifts them
        y = shift_labels(shard.shape, y, options.ignore_index, f"labels file '{shard.files.labels}'")
    y = y.reshape(-1)
    valid = y != options.ignore_index
    if s is None and "weight" not in arrays:
        return float(np.count_nonzero(valid))
    per = _target_weights(y, valid, arrays.get("weight"), f"labels file '{shard.files.labels}'")
    if s is not None and s.shape == per.shape:  # else the shard's check names the bad shape
        per = per * s
    return math.fsum(per[valid].tolist())


def _target_weights(y: np.ndarray, valid: np.ndarray, weight: np.ndarray | None,
                    source: str) -> np.ndarray:
    """w_{y_n} for each row (0 where ignored; 1 without class weights)."""
    if weight is None:
        return valid.astype(np.float64)
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    bad = valid & ((y < 0) | (y >= w.size))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CeCheckError(f"{source}: label {int(y[i])} at row {i} is out of the class weights' "
                           f"range [0, {w.size}) and is not the ignore_index")
    return np.where(valid, w[np.where(valid, y, 0)], 0.0)


def binary_count(shard: Shard, inputs: BatchInputs) -> float:
    """The shard's part of 'mean''s D with sample weights: their sum over its elements."""
    sw = np.asarray(shard_part(shard, inputs.files("sample_weight"), "sample_weight"),
                    dtype=np.float64).reshape(-1)
    width = 1 if len(shard.shape) == 1 else shard.shape[-1]
    return loss_sum(sw) * width


def shard_row_stats(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the shard: m, the max logit, and s1, the sum of exp(z - m) over every entry
    but one arg-max, in float64 (m = -inf and s1 = 0 for an all -inf row)."""
    z = load(shard.files.logits, "logits")
    z = z.reshape(-1, z.shape[-1])
    n, c = z.shape
    m, s1 = np.empty(n), np.empty(n)
    step = max(1, ROW_CHUNK // max(1, c))
    for start in range(0, n, step):
        block = np.asarray(z[start:start + step], dtype=np.float64)
        top = block.max(axis=1)
        safe = np.where(np.isneginf(top), 0.0, top)
        with np.errstate(invalid="ignore"):
            e = np.exp(block - safe[:, None])
        e[np.arange(len(block)), block.argmax(axis=1)] = 0.0
        m[start:start + step], s1[start:start + step] = top, e.sum(axis=1)
    return m, s1


def merge_row_stats(stats: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The global per-row lse from the shards' (m_i, s1_i), merged as the kernel merges chunks:
    m = max m_i, s1 = s1_* + sum_{j != *} (1 + s1_j) exp(m_j - m), lse = m + log1p(s1)."""
    ms = np.stack([m for m, _ in stats])
    s1s = np.stack([s for _, s in stats])
    m = ms.max(axis=0)
    star = ms.argmax(axis=0)  # the first shard holding the row's max
    safe = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = (1.0 + s1s) * np.exp(ms - safe)
    scaled = np.where(np.isneginf(ms), 0.0, scaled)
    rows = np.arange(ms.shape[1])
    scaled[star, rows] = s1s[star, rows]
    return m + np.log1p(scaled.sum(axis=0))


# ---------------------------------------------------------------- pass 2


def check_shard(shard: Shard, options: CheckOptions, shared: Any,
                inputs: BatchInputs = NO_INPUTS) -> Report:
    """Pass 2 on one shard (`shard_pass`), its report alone."""
    return shard_pass(shard, options, shared, inputs)[0]


def shard_pass(shard: Shard, options: CheckOptions, shared: Any,
               inputs: BatchInputs = NO_INPUTS) -> tuple[Report, ShardShare]:
    """Pass 2 on one shard: rows with the global denominator `shared`, vocabulary with the
    global lse `shared`, binary with `shared` a `BinaryBatch`; with its share of the batch's
    reduced loss and z-loss checks."""
    z = load(shard.files.logits, "logits")
    y = load(shard.files.labels, "labels") if shard.axis == "vocab" else shard_labels(shard)
    g = load(shard.files.grad, "grad") if shard.files.grad is not None else None
    arrays = shard_arrays(shard, inputs)
    sources = {"logits": f"logits file '{shard.files.logits}'",
               "labels": f"labels file '{shard.files.labels}'",
               "grad": f"grad file '{shard.files.grad}'",
               **{role: f"{role} file '{_name(files, shard)}'" for role, files in inputs.arrays},
               "weight": f"weight file '{inputs.weight}'"}
    opts = replace(options, seed=options.seed + shard.index)  # shards sample their own entries
    given = ShardInputs(arrays, sources, _share_tols(inputs, options))
    with np.errstate(all="ignore"):
        if shard.kind == "binary":
            return check_binary_shard(shard, z, y, g, shared, opts, given)
        if shard.axis == "rows":
            return check_rows(z, y, g, float(shared), opts, given)
        return check_vocab(shard, z, y, g, shared, opts, given), ShardShare()


def _name(files: Sequence[str], shard: Shard) -> str:
    return files[shard.index] if len(files) > 1 else files[0]


@dataclass(frozen=True, eq=False)
class ShardInputs:
    """A shard's part of the batch inputs (by role), how to name them, and the tolerances of
    the reduced loss and z-loss whose share it collects (None: not given)."""

    arrays: dict[str, np.ndarray]
    sources: dict[str, str]
    share_tols: tuple[Tolerance | None, Tolerance | None] = (None, None)

    def run(self, kind: str, echo: dict[str, Any], problem: Any, options: CheckOptions,
            bridge: tuple[CheckResult, ...] = ()) -> tuple[Run, ShareStage | None]:
        share = (ShareStage(problem, self.share_tols, options)
                 if self.share_tols != (None, None) else None)
        return Run(kind, echo, bridge, stages=(share,) if share else ()), share


def _share_tols(inputs: BatchInputs, options: CheckOptions
                ) -> tuple[Tolerance | None, Tolerance | None]:
    return (None if inputs.loss is None else scalar_tolerance(inputs.loss_dtype, options),
            None if inputs.z_loss is None else scalar_tolerance(inputs.z_loss_dtype, options))


def scalar_tolerance(dtype: str, options: CheckOptions) -> Tolerance:
    """The tolerance of a compared loss of `dtype` (integers: float64), as in one process."""
    dt = np.dtype(dtype)
    precision = options.precision.value if options.precision is not None else None
    return resolve_tolerance(dt if dt.kind == "f" else np.dtype(np.float64), precision,
                             options.rtol, options.atol, options.floor_factor)


def _verified(problem: Any, warnings: list[str], inputs: Inputs, options: CheckOptions,
              run: tuple[Run, ShareStage | None]) -> tuple[Report, ShardShare]:
    report = verify(problem, warnings, inputs, options, run[0])
    return report, run[1].share() if run[1] is not None else ShardShare()


def check_rows(z: np.ndarray, y: np.ndarray, grad: np.ndarray | None, denominator: float,
               options: CheckOptions, given: ShardInputs) -> tuple[Report, ShardShare]:
    """check_grad on a row shard whose 'mean' divides by the whole batch's denominator D; the
    training-code options act row by row (`shift_labels` within the shard's sequences)."""
    arrays, sources = given.arrays, given.sources
    if options.shift_labels:
        y = shift_labels(z, y, options.ignore_index, sources["labels"])
    sem = Semantics(options.z_loss, options.softcap, options.logit_scale, options.smoothing_form,
                    options.denominator, arrays.get("sample_weight"))
    problem, warnings = build_softmax_ce(
        z, y, weight=arrays.get("weight"), reduction=options.reduction.value,
        ignore_index=options.ignore_index, label_smoothing=options.label_smoothing,
        class_axis=options.class_axis, source=sources["logits"], labels_source=sources["labels"],
        weight_source=sources["weight"], semantics=sem,
        sample_weight_source=sources.get("sample_weight", "sample_weight"))
    if options.reduction.value == "mean":
        problem = replace(problem, denominator=denominator)
        warnings = [w for w in warnings if not w.startswith(LOCAL_WARNINGS)]
    if problem.n_classes == 2:
        warnings.append("note: two classes: softmax CE over [z0, z1] equals sigmoid BCE on "
                        "z1 - z0; binary `two_class` checks the correspondence")
    echo = {"ignore_index": options.ignore_index, "label_smoothing": options.label_smoothing,
            "class_axis": options.class_axis, "class_axis_resolved": problem.layout.class_axis,
            "weighted": "weight" in arrays, **problem.sem.to_echo(),
            **({"shift_labels": True} if options.shift_labels else {})}
    src = {**{r: r for r in ("logits", "labels", "grad", "loss")}, **sources}
    inputs = Inputs(z, y, grad, arrays.get("loss"), src, arrays.get("lse"),
                    arrays.get("z_loss_value"))
    return _verified(problem, warnings, inputs, options,
                     given.run("multiclass", echo, problem, options))


def check_vocab(shard: Shard, z: np.ndarray, y: np.ndarray, grad: np.ndarray | None,
                lse: Any, options: CheckOptions, given: ShardInputs) -> Report:
    """check_grad with `vocab_offset` and the global lse; class weights enter as the rows'
    sample weights w_{y_n} (index targets without smoothing: q = w_y e_y, so the row's loss
    and gradient are w_y times the unweighted ones and 'mean''s D is sum w_y s_n)."""
    sw = vocab_row_weights(y, given.arrays, options, given.sources["labels"])
    report = check_grad(z, y, grad=grad, options=options, sources=given.sources,
                        vocab_offset=shard.offset, lse=np.asarray(lse).reshape(z.shape[:-1]),
                        sample_weight=None if sw is None else sw.reshape(np.shape(y)))
    if "weight" not in given.arrays:
        return report
    own = "sample_weight" in given.arrays
    echo = {k: v for k, v in report.options.items() if k != "sample_weighted" or own}
    warnings = report.warnings
    if np.any(np.asarray(given.arrays["weight"]) < 0):  # the rows' weights are the class weights'
        warnings = tuple(w for w in warnings if own or not w.endswith("negative sample weights"))
        warnings += (f"{given.sources['weight']}: negative class weights",)
    return replace(report, options={**echo, "weighted": True}, warnings=warnings)


def vocab_row_weights(y: np.ndarray, arrays: dict[str, np.ndarray], options: CheckOptions,
                      source: str) -> np.ndarray | None:
    """Each row's weight on vocabulary shards: w_{y_n} s_n (None without either)."""
    sw = arrays.get("sample_weight")
    if "weight" not in arrays:
        return None if sw is None else np.asarray(sw, dtype=np.float64).reshape(-1)
    flat = np.asarray(y).reshape(-1)
    rows = _target_weights(flat, flat != options.ignore_index, arrays["weight"], source)
    if sw is not None:
        s = np.asarray(sw, dtype=np.float64).reshape(-1)
        if s.shape != rows.shape:
            raise CeCheckError(f"sample_weight: shape {np.shape(sw)} does not match the labels "
                               f"{np.shape(y)}")
        rows = rows * s
    return rows


@dataclass(frozen=True)
class GlobalMeanBCE(SigmoidBCE):
    """A binary shard whose 'mean' divides by the whole batch's entry count."""

    batch_entries: float = 1.0

    @property
    def denominator(self) -> float:
        return self.batch_entries


def bridge_rows(shard: Shard, limit: int) -> int:
    """The shard's rows among the batch's first `limit` rows (the two-class bridge's part):
    column shards have all `limit`, row shards those past their offset."""
    if shard.axis != "rows":
        return limit
    per = math.prod(shard.shape[1:-1])  # rows of the (N, K) matrix per row of axis 0
    return max(0, min(limit - shard.offset * per, shard.size * per))


@dataclass(frozen=True)
class BinaryBatch:
    """What every binary shard needs of the whole batch: its entry count (the 'mean'), the
    rows of the two-class bridge (the batch's first 2^16 elements) and its note, its width,
    and `pos_weight` (a number, or the file or URL of the batch's K values)."""

    entries: float
    bridge_rows: int
    bridge_note: str
    n_cols: int
    pos_weight: float | str | None = None
    weighted_count: float | None = None  # 'mean''s D with sample weights: their sum

    @classmethod
    def of(cls, shape: tuple[int, ...], pos_weight: float | str | None = None) -> BinaryBatch:
        n_rows, n_cols = math.prod(shape[:-1]), shape[-1]
        rows = max(1, min(n_rows, BRIDGE_ELEMENTS // n_cols))
        note = ("identity checked without weight/pos_weight" if pos_weight is not None else
                f"{rows * n_cols} elements: CE([0, z]) = BCE(z), d/dz1 = s(z) - y = -d/dz0")
        return cls(float(math.prod(shape)), rows, note, n_cols, pos_weight)


def shard_pos_weight(shard: Shard, batch: BinaryBatch) -> tuple[Any, str]:
    """The pos_weight of the shard's columns (all K for row shards) and how to name it."""
    if batch.pos_weight is None or isinstance(batch.pos_weight, float):
        return batch.pos_weight, f"--pos-weight {batch.pos_weight}"
    source = f"pos_weight file '{batch.pos_weight}'"
    pw = load(batch.pos_weight, "pos_weight")
    # a row, or a CSV column, is K values; an array file's (K, 1) broadcasts along axis -2 (as
    # in one process), which shards do not take
    column = pw.ndim == 2 and pw.shape[1] == 1 and (
        batch.pos_weight.lower().endswith((".npy", ".npz")) if "://" in batch.pos_weight
        else is_array_file(Path(batch.pos_weight)))
    pw = pw.reshape(-1) if pw.ndim == 2 and 1 in pw.shape and not column else pw
    if pw.ndim > 1 or pw.size not in (1, batch.n_cols):
        raise CeCheckError(f"{source}: shape {pw.shape}; pos_weight broadcasts along the last "
                           f"axis of the batch: expected ({batch.n_cols},) or a scalar")
    if shard.axis == "cols" and pw.size > 1:
        pw = pw[shard.offset:shard.offset + shard.size]
    return pw, source


def _batch_mean(problem: SigmoidBCE, entries: float) -> GlobalMeanBCE:
    fields = {f: getattr(problem, f) for f in problem.__dataclass_fields__
              if f not in ("kernel", "batch_entries")}
    return GlobalMeanBCE(**fields, batch_entries=entries)


def check_binary_shard(shard: Shard, z: np.ndarray, y: np.ndarray, grad: np.ndarray | None,
                       batch: BinaryBatch, options: CheckOptions,
                       given: ShardInputs) -> tuple[Report, ShardShare]:
    """check_binary on a shard: 'mean' over the batch's entries (or its sample weights' sum),
    the training-code options element by element, the bridge on its part of the batch's first
    2^16 elements (without weights or the options, as check_binary does)."""
    arrays, sources = given.arrays, given.sources
    pw, pw_source = shard_pos_weight(shard, batch)
    reduction = options.reduction.value
    problem, warnings = build_sigmoid_bce(  # 'mean' is the batch's: a shard's weights may sum to 0
        z, y, weight=arrays.get("weight"), pos_weight=pw,
        reduction="sum" if reduction == "mean" else reduction, source=sources["logits"],
        labels_source=sources["labels"], weight_source=sources["weight"],
        pos_weight_source=pw_source, label_smoothing=options.label_smoothing,
        softcap=options.softcap, logit_scale=options.logit_scale,
        denominator=options.denominator, sample_weight=arrays.get("sample_weight"),
        sample_weight_source=sources.get("sample_weight", "sample_weight"))
    problem = _batch_mean(replace(problem, reduction=reduction),
                          batch.weighted_count if batch.weighted_count is not None else batch.entries)
    weighted = pw is not None or "weight" in arrays
    plain = problem if not weighted and problem.plain else problem.without_options()
    if batch.weighted_count is not None:  # the bridge: plain BCE, the mean over every element
        plain = _batch_mean(plain, batch.entries)
    rows = bridge_rows(shard, batch.bridge_rows)
    part = replace(plain, z=plain.z[:rows], targets=plain.targets[:rows])
    note = (("identity checked without weight/pos_weight" if weighted else batch.bridge_note)
            if problem.plain else WITHOUT_OPTIONS)
    bridge = (two_class_bridge(part, options.worst, note),) if rows else ()
    src = {**{r: r for r in ("logits", "labels", "grad", "loss")}, **sources}
    echo = {"weighted": "weight" in arrays, "pos_weighted": pw is not None,
            **problem.sem.to_echo(),
            **({"label_smoothing": problem.smoothing} if problem.smoothing else {})}
    inputs = Inputs(z, y, grad, arrays.get("loss"), src)
    return _verified(problem, warnings, inputs, options,
                     given.run("binary", echo, problem, options, bridge))


LOCAL_WARNINGS = ("every target is ignored", "the non-ignored targets' weights sum to 0")


# ---------------------------------------------------------------- merging


def global_index(index: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    """A shard's entry index in the whole batch: rows shift axis 0, the vocabulary the class
    axis (indices of rows alone, without a class, stay)."""
    if not index:
        return index
    if shard.axis == "rows":
        return (index[0] + shard.offset,) + tuple(index[1:])
    last = len(shard.shape) - 1  # the class axis (the bridge adds a part name after it)
    if len(index) > last:
        return tuple(index[:last]) + (index[last] + shard.offset,) + tuple(index[last + 1:])
    return tuple(index)


def _ratio(e: Entry) -> float:
    with np.errstate(all="ignore"):
        r = np.float64(e.abs_err) / np.float64(e.allowed)
    return float(r) if not np.isnan(r) else math.inf


def merge_checks(parts: list[tuple[Shard, CheckResult]], worst: int) -> CheckResult:
    """One check over every shard: counts add, maxima take the max, worst re-ranked globally."""
    first = parts[0][1]
    entries = [replace(e, index=global_index(tuple(e.index), s)) for s, c in parts for e in c.worst]
    entries.sort(key=lambda e: (-_ratio(e), e.index))
    notes = [f"shard {s.index}: {c.note}" for s, c in parts if c.note and c.note != first.note]
    note = "; ".join(([first.note] if first.note and all(c.note == first.note for _, c in parts)
                      else []) + notes)
    return replace(first, ok=all(c.ok for _, c in parts),
                   max_abs_err=max(c.max_abs_err for _, c in parts),
                   max_rel_err=max(c.max_rel_err for _, c in parts),
                   mismatches=sum(c.mismatches for _, c in parts),
                   total=sum(c.total for _, c in parts), worst=tuple(entries[:worst]), note=note)


def merge_reports(plan: ShardPlan, reports: list[Report], options: CheckOptions,
                  denominator: float | None = None, repeated: float = 0.0,
                  client: dict[str, CheckResult] | None = None,
                  client_inputs: tuple[InputInfo, ...] = ()) -> ShardedReport:
    """The shards' reports as one: see the module's docstring for each field's rule.
    `repeated`: what the shards' losses count more than once (vocabulary shards: every shard's
    loss holds each row's lse, only the label's shard its -z_y). `client`: checks made on the
    merged sums, in place of the shards' placeholders of the same name."""
    first, pairs = reports[0], list(zip(plan.shards, reports))
    checks = _with_client(_merge_all_checks(pairs, options.worst), client or {}, first.fd_mode)
    ok = all(c.ok for c in checks)
    diagnosis = _merge_diagnosis(pairs)
    warnings = list(dict.fromkeys(w for r in reports for w in r.warnings))
    loss = merged_loss(reports, options, denominator, repeated)
    if math.isnan(loss) and denominator == 0:
        warnings.append("every target is ignored: the mean loss is NaN (0/0, as PyTorch) "
                        "and the gradient is zero" if sum(r.n_ignored for r in reports)
                        == sum(r.n_rows for r in reports) else
                        "the non-ignored targets' weights sum to 0: the mean loss and the "
                        "gradient of those rows are NaN (0/0, as PyTorch)")
    merged = replace(
        first, ok=ok, loss=loss, shape=plan.shape, checks=checks,
        loss_per_sample_shape=_per_sample_shape(plan, first),
        inputs=tuple(i for r in reports for i in r.inputs
                     if i.role in ("logits", "labels", "grad", "loss")) + client_inputs,
        warnings=tuple(warnings), fd_evaluations=sum(r.fd_evaluations for r in reports),
        diagnosis=diagnosis, verdict=verdict_line(ok, checks, diagnosis), **_sizes(plan, reports))
    return ShardedReport(plan.axis, merged, tuple(_summary(s, r) for s, r in pairs))


# the checks a report lists before your loss (ranks 0 and 1 of verify/stages.py) on vocabulary
# shards; `fd_vs_reference` too with --fd full (rank 0; sampled, rank 4, it follows the loss)
RANKED_BEFORE_LOSS = ("fd_rows_vs_reference", "grad_vs_reference", "normaliser")


def _with_client(checks: tuple[CheckResult, ...], client: dict[str, CheckResult],
                 fd_mode: str = "off") -> tuple[CheckResult, ...]:
    """The merged checks with the client's in place of their placeholders; the z-loss after
    the lse, as one process ranks them (the placeholders lead their rank)."""
    out = [client.get(c.name, c) for c in checks]
    names = [c.name for c in out]
    for name, check in client.items():  # no placeholder (vocabulary shards): before rank 3
        if name not in names:
            before = RANKED_BEFORE_LOSS + (("fd_vs_reference",) if fd_mode == "full" else ())
            at = next((i for i, n in enumerate(names) if n not in before), len(out))
            out.insert(at, check)
            names.insert(at, name)
    if "z_loss_vs_reference" in client and "lse_vs_reference" in names:
        out.insert(names.index("lse_vs_reference"), out.pop(names.index("z_loss_vs_reference")))
    return tuple(out)


def _per_sample_shape(plan: ShardPlan, first: Report) -> tuple[int, ...] | None:
    """Softmax: a loss per row (the batch shape); binary: one per entry (the logits' shape)."""
    if first.loss_per_sample_shape is None:
        return None
    per_entry = len(first.loss_per_sample_shape) == len(plan.shape)
    return plan.shape if per_entry else plan.shape[:-1]


def _merge_all_checks(pairs: list[tuple[Shard, Report]], worst: int) -> tuple[CheckResult, ...]:
    """Each check, by name in the order the shards report them, merged over the shards."""
    names = list(dict.fromkeys(c.name for _, r in pairs for c in r.checks))
    return tuple(merge_checks([(s, c) for s, r in pairs for c in r.checks if c.name == name],
                              worst) for name in names)


def _sizes(plan: ShardPlan, reports: list[Report]) -> dict[str, Any]:
    """Row shards add their rows and ignored rows; vocabulary shards add their classes."""
    if plan.axis == "rows":
        return {"n_rows": sum(r.n_rows for r in reports),
                "n_ignored": sum(r.n_ignored for r in reports)}
    return {"n_classes": plan.shape[-1]}


def _merge_diagnosis(pairs: list[tuple[Shard, Report]]) -> tuple[Diagnosis, ...]:
    """The likely causes of the shard with the most mismatched gradient entries first."""
    def bad(r: Report) -> int:
        return sum(c.mismatches for c in r.checks if c.name == "grad_vs_reference")

    ranked = sorted(pairs, key=lambda sr: (-bad(sr[1]), sr[0].index))
    out: dict[str, Diagnosis] = {}
    for shard, r in ranked:
        for d in r.diagnosis:
            out.setdefault(d.code, replace(d, evidence=f"shard {shard.index}: {d.evidence}"))
    return tuple(out.values())


def _summary(shard: Shard, r: Report) -> ShardSummary:
    mism = sum(c.mismatches for c in r.checks if c.name == "grad_vs_reference")
    return ShardSummary(shard.index, shard.name, shard.offset, shard.size, r.ok, r.verdict, mism,
                        r.loss)


# ---------------------------------------------------------------- the run


# settings a shard check cannot take: `vocab_offset` (a shard's own offset comes from the plan),
# `two_class` (a (..., 2) softmax batch); refused, never ignored
UNSHARDED = ("vocab_offset", "two_class")
# training-code semantics that act row by row (softmax) or element by element (binary): carried
# by row shards (binary: row and column shards), refused on vocabulary shards
ROW_LOCAL = ("z_loss", "softcap", "logit_scale", "smoothing_form", "denominator", "shift_labels")


def resolve_options(plan: ShardPlan, options: CheckOptions, elementwise: bool = False) -> CheckOptions:
    """Settings every shard shares: the finite-difference mode chosen for the WHOLE batch
    (`elementwise`: a loss of per-element terms, binary)."""
    if options.class_axis not in (-1, len(plan.shape) - 1):
        raise CeCheckError("`class_axis`: shards need the classes on the last axis")
    plain = CheckOptions()
    given = [n for n in (*UNSHARDED, *ROW_LOCAL) if getattr(options, n) != getattr(plain, n)]
    for name in given:
        if name in UNSHARDED:
            raise CeCheckError(f"`{name}`: not supported with `shards`")
        if plan.axis == "vocab":
            raise CeCheckError(f"`{name}`: not with vocabulary shards (only row shards carry the "
                               "training-code options); check row shards, or the batch whole")
        if name == "shift_labels" and len(plan.shape) < 3:
            raise CeCheckError("`shift_labels`: row shards need (B, T, V) logits, each shard "
                               "whole sequences (2-D shards could cut a sequence between two)")
    if plan.axis == "vocab" and options.label_smoothing:
        raise CeCheckError("`label_smoothing`: not with vocabulary shards (it spreads over the "
                           "whole vocabulary); check row shards, or the batch whole")
    n_rows = math.prod(plan.shape[:-1])
    return replace(options, fd=FDMode(choose_mode(options.fd.value, n_rows, plan.shape[-1],
                                                  elementwise)))


def batch_inputs(given: dict[str, str | None], reduction: str) -> tuple[BatchInputs, float]:
    """`BatchInputs` from the command line's texts, and the typed loss's tolerance (half a unit
    of its last digit): `weight` one file; `sample_weight` and `lse` one file or a quoted glob
    of one per shard; `loss` and `z_loss_value` a number or a file of one value, per sample
    with reduction none (then files like `sample_weight`)."""
    out, arrays, atol = BatchInputs(weight=given.get("weight")), [], 0.0
    for role in ("sample_weight", "lse", "loss", "z_loss_value"):
        text = given.get(role)
        if text is None:
            continue
        if role in ("sample_weight", "lse") or reduction == "none":
            arrays.append((role, tuple(expand(text, role))))
            continue
        spec = InputSpec.parse(text, role, strict=True)
        value = spec.load() if spec.origin is Origin.number else load(text, role)
        what = "loss" if role == "loss" else "z-loss"
        if value.dtype.kind not in "iuf":
            raise CeCheckError(f"{spec.source}: dtype {value.dtype} is not numeric")
        if value.size != 1:
            raise CeCheckError(f"{spec.source}: shape {value.shape}; reduction '{reduction}' "
                               f"gives a scalar {what} (use `reduction=none` for per-sample "
                               "values)")
        number = float(value.reshape(-1)[0])
        if role == "loss":
            out = replace(out, loss=number, loss_dtype=str(value.dtype), loss_source=spec.source)
            atol = spec.tolerance
        else:
            out = replace(out, z_loss=number, z_loss_dtype=str(value.dtype),
                          z_loss_source=spec.source)
    return replace(out, arrays=tuple(arrays)), atol


def refuse_inputs(plan: ShardPlan, inputs: BatchInputs, options: CheckOptions, kind: str) -> None:
    """What shards cannot take of `inputs`: one line each, never ignored."""
    n = len(plan.shards)
    for role, files in inputs.arrays:
        if len(files) not in (1, n):
            raise CeCheckError(f"`{role}`: {len(files)} files for {n} logits shards (give one "
                               "per shard, or one file for the whole batch)")
    _refuse_values(inputs, options, kind)
    if kind != "binary" and inputs.weight is not None:  # C values, read once here
        class_weights(shard_weight(plan.shards[0], inputs.weight), plan.shape[-1],
                      f"weight file '{inputs.weight}'", [])
    if plan.axis == "vocab":
        _refuse_on_vocab(inputs)


def _refuse_values(inputs: BatchInputs, options: CheckOptions, kind: str) -> None:
    """Your loss and z-loss as the settings need them: numbers only when reduced, a z-loss
    (and an lse) only for softmax with `z_loss`."""
    if options.reduction.value == "none" and (inputs.loss is not None or inputs.z_loss is not None):
        raise CeCheckError("`loss`: reduction none compares per-sample values: give them as files "
                           "(one for the batch or one per shard), not a number")
    z_value = inputs.z_loss is not None or bool(inputs.files("z_loss_value"))
    if kind == "binary" and (z_value or inputs.files("lse")):
        raise CeCheckError(f"`{'lse' if inputs.files('lse') else 'z_loss_value'}`: applies to "
                           "softmax cross-entropy (check_grad), not sigmoid BCE")
    if z_value and not options.z_loss:
        raise CeCheckError("`z_loss_value`: needs `z_loss`, the coefficient it was computed with")


def _refuse_on_vocab(inputs: BatchInputs) -> None:
    if len(inputs.files("loss")) > 1:
        raise CeCheckError("`loss`: one file of the batch's per-sample losses with vocabulary "
                           "shards (every shard holds every row)")
    if inputs.files("lse"):
        raise CeCheckError("`lse`: not with vocabulary shards (the global lse is what pass 1 "
                           "merges from the shards themselves); compare yours on row shards")


def run_shards(files: Sequence[ShardFiles], axis: str | None, options: CheckOptions,
               mapper: Mapper | None = None,
               progress: Callable[[int, int], None] | None = None,
               kind: str = "softmax", pos_weight: float | str | None = None,
               inputs: BatchInputs = NO_INPUTS) -> ShardedReport:
    """Describe, pass 1, pass 2 and merge (module docstring), each step through `mapper`.
    `kind`: softmax (`grad`) or binary (sigmoid BCE, with `pos_weight`: a number, or the file
    or URL of K values). `inputs`: class weights, your loss, the batch-shaped inputs."""
    mapper = mapper or LocalMapper()
    shapes = mapper.map(describe, [f.logits for f in files], ("logits",))
    label_files = list(dict.fromkeys(f.labels for f in files))
    label_shapes = mapper.map(describe, label_files, ("labels",))
    plan = make_plan(files, shapes, label_shapes, axis, kind)
    opts = resolve_options(plan, options, elementwise=kind == "binary")
    refuse_inputs(plan, inputs, opts, kind)
    if kind == "binary":
        refuse_softmax_only(opts)
        batch = replace(BinaryBatch.of(plan.shape, pos_weight),
                        weighted_count=_binary_count(plan, inputs, opts, mapper))
        results = mapper.map(shard_pass, plan.shards, (opts, batch, inputs), progress)
        return merge_results(plan, results, opts, inputs)
    denominator = None
    if plan.axis == "rows":
        denominator = float(math.fsum(mapper.map(shard_denominator, plan.shards, (opts, inputs))))
        shared: Any = denominator
    else:
        shared = mapper.reduce(shard_row_stats, plan.shards, merge_row_stats)
    if plan.axis == "vocab":
        return _run_vocab(plan, opts, inputs, mapper, shared, progress)
    results = mapper.map(shard_pass, plan.shards, (opts, shared, inputs), progress)
    return merge_results(plan, results, opts, inputs, denominator)


def _run_vocab(plan: ShardPlan, options: CheckOptions, inputs: BatchInputs, mapper: Mapper,
               lse: Any, progress: Callable[[int, int], None] | None) -> ShardedReport:
    """Pass 2 on vocabulary shards (your loss kept for the client: a shard holds part of each
    row's), the lse the shards' losses repeat, and your loss against the batch's rows."""
    loss_given = inputs.loss is not None or bool(inputs.files("loss"))
    own = replace(inputs, loss=None, arrays=tuple((r, f) for r, f in inputs.arrays if r != "loss"))
    results = mapper.map(shard_pass, plan.shards, (options, lse, own), progress)
    once = mapper.map(reduced_lse, plan.shards[:1], (lse, options, own))[0]
    repeated = (len(plan.shards) - 1) * once
    reports = [r for r, _ in results]
    checks: dict[str, CheckResult] = {}
    if loss_given:
        rows = mapper.map(vocab_loss_rows, plan.shards, (lse, options, own))
        total = merged_loss(reports, options, None, repeated)
        checks["loss_vs_reference"] = vocab_loss_check(plan, rows, inputs, options, total)
    infos: tuple[InputInfo, ...] = ((InputInfo("loss", inputs.loss_source, (), inputs.loss_dtype),)
                                    if inputs.loss is not None else ())
    for path in inputs.files("loss"):  # per sample: one file of the batch's
        arr = load(path, "loss")
        infos += (InputInfo("loss", f"loss file '{path}'", tuple(arr.shape), str(arr.dtype)),)
    return merge_reports(plan, reports, options, None, repeated, checks, infos)


@dataclass(frozen=True, eq=False)
class VocabRows:
    """A vocabulary shard's per-row share of the rows' losses: z_y where the label is one of its
    columns (0 elsewhere), its largest finite |z|; shard 0 adds the global lse, each row's
    weight s_n w_y (1 unweighted, 0 where ignored) and whether sample weights were given."""

    z_y: np.ndarray
    zabs: np.ndarray
    lse: np.ndarray | None = None
    weight: np.ndarray | None = None
    sample_weighted: bool = False


def vocab_loss_rows(shard: Shard, lse: Any, options: CheckOptions,
                    inputs: BatchInputs = NO_INPUTS) -> VocabRows:
    """The shard's `VocabRows` (a pass over its logits, in row blocks)."""
    z = load(shard.files.logits, "logits")
    z = z.reshape(-1, z.shape[-1])
    y = load(shard.files.labels, "labels").reshape(-1)
    valid = y != options.ignore_index
    inside = valid & (y >= shard.offset) & (y < shard.offset + z.shape[1])
    z_y, zabs = np.zeros(len(y)), np.empty(len(y))
    rows = np.flatnonzero(inside)
    z_y[rows] = np.asarray(z[rows, y[rows] - shard.offset], dtype=np.float64)
    step = max(1, ROW_CHUNK // max(1, z.shape[1]))
    for a in range(0, len(y), step):
        block = np.abs(np.asarray(z[a:a + step], dtype=np.float64))
        zabs[a:a + step] = np.where(np.isfinite(block), block, 0.0).max(axis=1)
    if shard.index:
        return VocabRows(z_y, zabs)
    arrays = shard_arrays(shard, inputs)
    s = vocab_row_weights(y, arrays, options, f"labels file '{shard.files.labels}'")
    weight = np.where(valid, s if s is not None else 1.0, 0.0)
    return VocabRows(z_y, zabs, np.asarray(lse, dtype=np.float64).reshape(-1), weight,
                     "sample_weight" in arrays)


def vocab_loss_check(plan: ShardPlan, parts: list[VocabRows], inputs: BatchInputs,
                     options: CheckOptions, total: float) -> CheckResult:
    """Your loss against the batch's rows L_n = s_n (lse_n - z_y), each allowed the single
    process's floor k eps (|L_n| + S_n (1 + |lse_n|)), plus 2 S_n max|z| with sample weights
    (S_n = |s_n w_y|); reduced: summed, scaled by 1/D, plus log2(N + 1) roundings of the total;
    widened by the normaliser bound when only that passes, as `LossStage`."""
    first = parts[0]
    assert first.lse is not None and first.weight is not None
    z_y = np.sum(np.stack([p.z_y for p in parts]), axis=0)  # one shard holds each label
    zabs = np.max(np.stack([p.zabs for p in parts]), axis=0)
    S = np.abs(first.weight)
    per_row = np.where(S != 0, first.weight * (first.lse - z_y), 0.0)
    n_classes = plan.shape[-1]
    got: Any
    if options.reduction.value == "none":
        got = _vocab_user_losses(plan, inputs)
        tol = scalar_tolerance(str(got.dtype), options)
    else:
        got, tol = inputs.loss, scalar_tolerance(inputs.loss_dtype, options)
    floor = tol.floor_coef * (np.abs(per_row) + S * (1.0 + np.abs(first.lse))
                              + (2.0 * S * zabs if first.sample_weighted else 0.0))
    normaliser = normaliser_bound(tol, n_classes, options.normaliser_rtol)
    if options.reduction.value == "none":
        shape = plan.shape[:-1]

        def compare(k: float) -> CheckResult:
            cmp = Comparison("loss_vs_reference", tol,
                             lambda r, c: tuple(int(i) for i in np.unravel_index(r, shape)),
                             expected_label="reference", got_label="yours", n_worst=options.worst,
                             extra_atol=options.loss_atol, beyond_range=True)
            cmp.update(0, per_row, got, floor + k * S)
            return cmp.result()
    else:
        D = float(np.sum(S[S != 0])) if options.reduction.value == "mean" else 1.0
        scale = 1.0 / D if D else 0.0
        n = max(1, len(per_row))

        def compare(k: float) -> CheckResult:
            bound = ((float(np.sum(floor)) + k * float(np.sum(S))) * scale
                     + tol.floor_coef * math.log2(n + 1) * abs(total))
            return reduced_check("loss_vs_reference", tol, total, bound, got, options.loss_atol)
    return with_normaliser(compare, normaliser, tol, n_classes)


def _vocab_user_losses(plan: ShardPlan, inputs: BatchInputs) -> np.ndarray:
    """Your per-sample losses of the batch (one file), as (N,) rows."""
    path = inputs.files("loss")[0]
    source = f"loss file '{path}'"
    got = load(path, "loss")
    if got.dtype.kind not in "iuf":
        raise CeCheckError(f"{source}: dtype {got.dtype} is not numeric")
    if got.shape != plan.shape[:-1] and got.shape != (math.prod(plan.shape[:-1]),):
        raise CeCheckError(f"{source}: shape {got.shape}; reduction 'none' gives per-sample "
                           f"losses of the batch's shape {plan.shape[:-1]}")
    return got.reshape(-1)


def _binary_count(plan: ShardPlan, inputs: BatchInputs, options: CheckOptions,
                  mapper: Mapper) -> float | None:
    """'mean''s D with sample weights: their sum over the batch's elements (None without)."""
    if not inputs.files("sample_weight"):
        return None
    count = math.fsum(mapper.map(binary_count, plan.shards, (inputs,)))
    if options.reduction.value == "mean" and options.denominator is None and count == 0:
        raise CeCheckError(f"sample_weight file '{inputs.files('sample_weight')[0]}': the sample "
                           "weights sum to 0: 'mean' is 0/0; give `denominator` or reduction sum")
    return count


def merge_results(plan: ShardPlan, results: list[tuple[Report, ShardShare]],
                  options: CheckOptions, inputs: BatchInputs, denominator: float | None = None,
                  repeated: float = 0.0) -> ShardedReport:
    """`merge_reports`, with the batch's reduced loss and z-loss checked once on the merged
    sums (the shards' reports hold placeholders where these checks go)."""
    reports, shares = [r for r, _ in results], [s for _, s in results]
    total = merged_loss(reports, options, denominator, repeated)
    checks = batch_checks(plan, shares, inputs, options, total)
    infos = ((InputInfo("loss", inputs.loss_source, (), inputs.loss_dtype),)
             if inputs.loss is not None else ())
    return merge_reports(plan, reports, options, denominator, repeated, checks, infos)


def batch_checks(plan: ShardPlan, shares: list[ShardShare], inputs: BatchInputs,
                 options: CheckOptions, total: float) -> dict[str, CheckResult]:
    """Your reduced loss and z-loss against the merged reference, with the single process's
    allowance: the rows' floors summed over the shards, scaled, plus log2(N + 1) roundings
    of the total (the loss: widened by the normaliser bound when only that passes)."""
    out: dict[str, CheckResult] = {}
    if not shares:
        return out
    first, n = shares[0], max(1, math.prod(plan.shape[:-1]))
    if inputs.loss is not None:
        tol = scalar_tolerance(inputs.loss_dtype, options)
        floors = math.fsum(s.loss_floor for s in shares)
        weights = math.fsum(s.loss_weight for s in shares)

        def compare(k: float) -> CheckResult:
            floor = ((floors + k * weights) * first.grad_scale
                     + tol.floor_coef * math.log2(n + 1) * abs(total))
            return reduced_check("loss_vs_reference", tol, total, floor, inputs.loss,
                                 options.loss_atol)

        out["loss_vs_reference"] = with_normaliser(compare, first.normaliser, tol, plan.shape[-1])
    if inputs.z_loss is not None:
        tol = scalar_tolerance(inputs.z_loss_dtype, options)
        z_total = math.fsum(s.z_loss for s in shares)
        floor = (math.fsum(s.z_loss_floor for s in shares) * abs(first.grad_scale)
                 + tol.floor_coef * math.log2(n + 1) * abs(z_total))
        out["z_loss_vs_reference"] = reduced_check("z_loss_vs_reference", tol, z_total, floor,
                                                   inputs.z_loss, 0.0)
    return out


def merged_loss(reports: list[Report], options: CheckOptions, denominator: float | None,
                repeated: float) -> float:
    """`math.fsum` of the shards' losses, less what vocabulary shards repeat; NaN for 'mean'
    when every target is ignored (0/0, as PyTorch)."""
    if denominator == 0 and options.reduction.value == "mean" and options.denominator is None:
        return math.nan
    return math.fsum([r.loss for r in reports] + [-repeated])


def reduced_lse(shard: Shard, lse: Any, options: CheckOptions,
                inputs: BatchInputs = NO_INPUTS) -> float:
    """The reduced loss of lse alone (sum over the rows whose target is not ignored of s_n
    lse_n, / D for 'mean'): each vocabulary shard's loss holds it once."""
    y = load(shard.files.labels, "labels").reshape(-1)
    valid = y != options.ignore_index
    s = vocab_row_weights(y, shard_arrays(shard, inputs), options,
                          f"labels file '{shard.files.labels}'")
    values = np.asarray(lse).reshape(-1)[valid]
    if s is not None:
        values = values * s[valid]
    total = math.fsum(values.tolist())
    if options.reduction.value == "mean":
        # D as the shard's check forms it (np.sum of the rows' weights), so that it cancels
        count = float(np.sum(np.ones(int(np.count_nonzero(valid))) * s[valid])) if s is not None \
            else int(np.count_nonzero(valid))
        return total / count if count else 0.0
    return total
