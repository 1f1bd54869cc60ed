"""A shard's files, read where the code runs: globs expanded in natural order (logits_2 before
logits_10), local paths memory-mapped by ce-check's loader, URLs (`s3://...`) through fsspec
(when installed), each a regular file within MAX_STREAM_BYTES; a shape read from a .npy
header alone.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io import limits
from ce_cli.io.inputs import InputSpec, Origin
from ce_cli.io.loading import is_array_file, read_stdin


def natural_key(text: str) -> list:
    """Sort key: digit runs compare as numbers (logits_2 before logits_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def expand(pattern: str, role: str) -> list[str]:
    """The files a glob names (fsspec URLs through fsspec), in natural order; a name without
    wildcards stands for itself."""
    if not any(ch in pattern for ch in "*?["):
        return [pattern]
    if "://" in pattern:
        fsspec = _fsspec(f"{role} '{pattern}'")
        try:
            fs, inner = fsspec.core.url_to_fs(pattern)
            paths = fs.glob(inner)
        except (ImportError, ValueError, OSError) as exc:  # an unknown protocol, its backend missing
            raise CeCheckError(f"{role} '{pattern}': cannot list ({_brief(exc)})") from None
        found = [fs.unstrip_protocol(p) for p in paths]
    else:
        import glob

        found = glob.glob(pattern)
    if not found:
        raise CeCheckError(f"{role} '{pattern}': matches no file")
    return sorted(found, key=natural_key)


def _brief(exc: BaseException) -> str:
    """An exception's text on one line, at most 200 characters."""
    return ' '.join(str(exc).split())[:200]


def is_array(path: str) -> bool:
    """Whether `path` names an array file (.npy/.npz; local files by their content)."""
    return path.lower().endswith((".npy", ".npz")) if "://" in path else is_array_file(Path(path))


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


def _fsspec(label: str) -> Any:
    """The fsspec module (optional: URLs need it), or one line saying so."""
    try:
        import fsspec  # type: ignore[import-untyped]
    except ImportError:
        raise CeCheckError(f"{label}: a URL needs fsspec (pip install fsspec)") from None
    return fsspec


def open_url(path: str, role: str) -> tuple[Any, str, int]:
    """fsspec's file system, the path within it and the size of the file a URL names: a regular
    file (no symbolic link followed), not empty, within MAX_STREAM_BYTES (it is read whole)."""
    label = f"{role} file '{path}'"
    fsspec = _fsspec(label)
    try:
        fs, inner = fsspec.core.url_to_fs(path)
        info = fs.info(inner)
    except FileNotFoundError:
        raise CeCheckError(f"{label}: no such file") from None
    except (ImportError, ValueError, OSError) as exc:  # an unknown protocol, its backend missing
        raise CeCheckError(f"{label}: cannot read ({_brief(exc)})") from None
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
            raise CeCheckError(f"{label}: corrupt .npy header ({_brief(exc)})") from None
        data = size - fh.tell()
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize > data:
        raise CeCheckError(f"{label}: truncated or corrupt: header says shape {tuple(shape)} "
                           f"{dtype}, the file holds {data} data bytes")
    return tuple(int(d) for d in shape)
