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
from ce_cli.models.sigmoid import SigmoidBCE, build_sigmoid_bce
from ce_cli.models.semantics import Semantics
from ce_cli.models.softmax import build_softmax_ce
from ce_cli.verify.bridge import BRIDGE_ELEMENTS, WITHOUT_OPTIONS, two_class_bridge
from ce_cli.verify.checks import check_grad, refuse_softmax_only, shift_labels
from ce_cli.verify.finite_diff import choose_mode
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.pipeline import Inputs, Run, verify
from ce_cli.verify.results import CheckResult, Diagnosis, Entry, Report, verdict_line

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
        along = 0 if shard.axis == "rows" else -1
        what = "rows" if shard.axis == "rows" else "columns"
        if y.ndim == 0 or y.shape[along] < stop:
            raise CeCheckError(f"labels file '{shard.files.labels}': shape {y.shape} has fewer "
                               f"than the {stop} {what} of the shards")
        y = y[start:stop] if along == 0 else y[..., start:stop]
    return y


def shard_denominator(shard: Shard, options: CheckOptions) -> float:
    """D_i: the shard's non-ignored index targets (after `shift_labels`; its rows, for
    probability targets)."""
    y = np.asarray(shard_labels(shard))
    if y.shape == shard.shape:
        return float(math.prod(shard.shape[:-1]))
    if options.shift_labels:  # within the shard's sequences, as its check shifts them
        y = shift_labels(shard.shape, y, options.ignore_index, f"labels file '{shard.files.labels}'")
    return float(np.count_nonzero(y != options.ignore_index))


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


def check_shard(shard: Shard, options: CheckOptions, shared: Any) -> Report:
    """Pass 2 on one shard: rows with the global denominator `shared`, vocabulary with the
    global lse `shared`, binary with `shared` a `BinaryBatch`."""
    z = load(shard.files.logits, "logits")
    y = load(shard.files.labels, "labels") if shard.axis == "vocab" else shard_labels(shard)
    g = load(shard.files.grad, "grad") if shard.files.grad is not None else None
    sources = {"logits": f"logits file '{shard.files.logits}'",
               "labels": f"labels file '{shard.files.labels}'",
               "grad": f"grad file '{shard.files.grad}'"}
    opts = replace(options, seed=options.seed + shard.index)  # shards sample their own entries
    with np.errstate(all="ignore"):
        if shard.kind == "binary":
            return check_binary_shard(shard, z, y, g, shared, opts, sources)
        if shard.axis == "rows":
            return check_rows(z, y, g, float(shared), opts, sources)
        return check_grad(z, y, grad=g, options=opts, sources=sources,
                          vocab_offset=shard.offset, lse=np.asarray(shared).reshape(z.shape[:-1]))


def check_rows(z: np.ndarray, y: np.ndarray, grad: np.ndarray | None, denominator: float,
               options: CheckOptions, sources: dict[str, str]) -> Report:
    """check_grad on a row shard whose 'mean' divides by the whole batch's denominator D; the
    training-code options act row by row (`shift_labels` within the shard's sequences)."""
    if options.reduction.value != "mean":
        return check_grad(z, y, grad=grad, options=options, sources=sources)
    if options.shift_labels:
        y = shift_labels(z, y, options.ignore_index, sources["labels"])
    sem = Semantics(options.z_loss, options.softcap, options.logit_scale, options.smoothing_form,
                    options.denominator)
    problem, warnings = build_softmax_ce(
        z, y, reduction="mean", ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing, class_axis=options.class_axis,
        source=sources["logits"], labels_source=sources["labels"], semantics=sem)
    problem = replace(problem, denominator=denominator)
    warnings = [w for w in warnings if not w.startswith(LOCAL_WARNINGS)]
    echo = {"ignore_index": options.ignore_index, "label_smoothing": options.label_smoothing,
            "class_axis": options.class_axis, "class_axis_resolved": problem.layout.class_axis,
            "weighted": False, **problem.sem.to_echo(),
            **({"shift_labels": True} if options.shift_labels else {})}
    src = {**{r: r for r in ("logits", "labels", "grad", "loss")}, **sources}
    return verify(problem, warnings, Inputs(z, y, grad, None, src), options,
                  Run("multiclass", echo))


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
    fields = {f: getattr(problem, f) for f in problem.__dataclass_fields__ if f != "kernel"}
    return GlobalMeanBCE(**fields, batch_entries=entries)


def check_binary_shard(shard: Shard, z: np.ndarray, y: np.ndarray, grad: np.ndarray | None,
                       batch: BinaryBatch, options: CheckOptions,
                       sources: dict[str, str]) -> Report:
    """check_binary on a shard: 'mean' over the batch's entries, the training-code options
    element by element, the bridge on its part of the batch's first 2^16 elements (without
    pos_weight or the options, as check_binary does)."""
    pw, pw_source = shard_pos_weight(shard, batch)
    problem, warnings = build_sigmoid_bce(
        z, y, pos_weight=pw, reduction=options.reduction.value, source=sources["logits"],
        labels_source=sources["labels"], pos_weight_source=pw_source,
        label_smoothing=options.label_smoothing, softcap=options.softcap,
        logit_scale=options.logit_scale, denominator=options.denominator)
    problem = _batch_mean(problem, batch.entries)
    # the batch's mean still (a GlobalMeanBCE)
    plain = problem if pw is None and problem.plain else problem.without_options()
    rows = bridge_rows(shard, batch.bridge_rows)
    part = replace(plain, z=plain.z[:rows], targets=plain.targets[:rows])
    note = batch.bridge_note if problem.plain else WITHOUT_OPTIONS
    bridge = (two_class_bridge(part, options.worst, note),) if rows else ()
    src = {**{r: r for r in ("logits", "labels", "grad", "loss")}, **sources}
    echo = {"weighted": False, "pos_weighted": pw is not None, **problem.sem.to_echo(),
            **({"label_smoothing": problem.smoothing} if problem.smoothing else {})}
    run = Run("binary", echo, bridge)
    return verify(problem, warnings, Inputs(z, y, grad, None, src), options, run)


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
                  denominator: float | None = None, repeated: float = 0.0) -> ShardedReport:
    """The shards' reports as one: see the module's docstring for each field's rule.
    `repeated`: what the shards' losses count more than once (vocabulary shards: every shard's
    loss holds each row's lse, only the label's shard its -z_y)."""
    first, pairs = reports[0], list(zip(plan.shards, reports))
    checks = _merge_all_checks(pairs, options.worst)
    ok = all(c.ok for c in checks)
    diagnosis = _merge_diagnosis(pairs)
    warnings = list(dict.fromkeys(w for r in reports for w in r.warnings))
    loss = math.fsum([r.loss for r in reports] + [-repeated])
    if denominator == 0 and options.reduction.value == "mean":
        warnings.append("every target is ignored: the mean loss is NaN (0/0, as PyTorch) "
                        "and the gradient is zero")
        loss = math.nan
    merged = replace(
        first, ok=ok, loss=loss, shape=plan.shape, checks=checks,
        loss_per_sample_shape=_per_sample_shape(plan, first),
        inputs=tuple(i for r in reports for i in r.inputs if i.role in ("logits", "labels", "grad")),
        warnings=tuple(warnings), fd_evaluations=sum(r.fd_evaluations for r in reports),
        diagnosis=diagnosis, verdict=verdict_line(ok, checks, diagnosis), **_sizes(plan, reports))
    return ShardedReport(plan.axis, merged, tuple(_summary(s, r) for s, r in pairs))


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


def run_shards(files: Sequence[ShardFiles], axis: str | None, options: CheckOptions,
               mapper: Mapper | None = None,
               progress: Callable[[int, int], None] | None = None,
               kind: str = "softmax", pos_weight: float | str | None = None) -> ShardedReport:
    """Describe, pass 1, pass 2 and merge (module docstring), each step through `mapper`.
    `kind`: softmax (`grad`) or binary (sigmoid BCE, with `pos_weight`: a number, or the file
    or URL of K values)."""
    mapper = mapper or LocalMapper()
    shapes = mapper.map(describe, [f.logits for f in files], ("logits",))
    label_files = list(dict.fromkeys(f.labels for f in files))
    label_shapes = mapper.map(describe, label_files, ("labels",))
    plan = make_plan(files, shapes, label_shapes, axis, kind)
    opts = resolve_options(plan, options, elementwise=kind == "binary")
    if kind == "binary":
        refuse_softmax_only(opts)
        batch = BinaryBatch.of(plan.shape, pos_weight)
        reports = mapper.map(check_shard, plan.shards, (opts, batch), progress)
        return merge_reports(plan, reports, opts)
    denominator = None
    if plan.axis == "rows":
        denominator = float(math.fsum(mapper.map(shard_denominator, plan.shards, (opts,))))
        shared: Any = denominator
    else:
        shared = mapper.reduce(shard_row_stats, plan.shards, merge_row_stats)
    reports = mapper.map(check_shard, plan.shards, (opts, shared), progress)
    repeated = 0.0
    if plan.axis == "vocab":
        once = mapper.map(reduced_lse, plan.shards[:1], (shared, opts))[0]
        repeated = (len(plan.shards) - 1) * once
    return merge_reports(plan, reports, opts, denominator, repeated)


def reduced_lse(shard: Shard, lse: Any, options: CheckOptions) -> float:
    """The reduced loss of lse alone (sum over the rows whose target is not ignored, / their
    count for 'mean'): each vocabulary shard's loss holds it once."""
    y = load(shard.files.labels, "labels").reshape(-1)
    valid = y != options.ignore_index
    total = math.fsum(np.asarray(lse).reshape(-1)[valid].tolist())
    if options.reduction.value == "mean":
        count = int(np.count_nonzero(valid))
        return total / count if count else 0.0
    return total
