""".safetensors files, read strictly and memory-mapped, with no dependency.

The format: 8 bytes, a little-endian u64 N; N bytes of a UTF-8 JSON object mapping each tensor
name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data after the header;
an optional "__metadata__" maps strings to strings); then the data, which the tensors tile
exactly, without overlaps or holes. Nothing the header says is followed before it has been
checked against the file's size and against itself: the header length, every tensor's offsets,
its byte span (= product(shape) x dtype size), and the tiling. Then the chosen tensor is
memory-mapped (BF16 is widened to float32, ce_cli.io.bfloat16).

Why not the `safetensors` package: its numpy API copies every tensor into memory and cannot give
BF16 to numpy at all, and it would be a compiled dependency for ~100 lines of checks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.bfloat16 import bfloat16_rows
from ce_cli.io.mapped import map_file

HEADER_LIMIT = 100_000_000  # bytes of JSON header: the reference implementation's limit
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
          "BOOL": "?"}
SHOWN_NAMES = 8  # tensor names listed in a message


@dataclass(frozen=True)
class Entry:
    """One tensor of the header: its name, safetensors dtype, shape and byte range in the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def where(self) -> str:
        return f"tensor '{self.name}' {self.dtype} {list(self.shape)} at [{self.begin}, {self.end})"


def read_safetensors(path: Path, key: str | None, label: str) -> np.ndarray:
    """The tensor `key` of the .safetensors file `path` (None: its only tensor), memory-mapped."""
    try:
        size = os.path.getsize(path)
        with path.open("rb") as fh:
            header_len, raw = _read_header(fh, size, label)
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None
    entries = parse_header(raw, label)
    check_layout(entries, size - 8 - header_len, label)
    return _map(path, _select(entries, key, label), 8 + header_len, label)


def _read_header(fh: BinaryIO, size: int, label: str) -> tuple[int, bytes]:
    if size < 8:
        raise CeCheckError(f"{label}: not a .safetensors file ({size} bytes; its header length "
                           "alone takes 8)")
    header_len = int.from_bytes(fh.read(8), "little")
    if header_len > size - 8:
        raise CeCheckError(f"{label}: corrupt .safetensors header: header length {header_len} "
                           f"bytes, but the file holds {size - 8} bytes after it")
    if header_len > HEADER_LIMIT:
        raise CeCheckError(f"{label}: corrupt .safetensors header: header length {header_len} "
                           f"bytes is over the limit of {HEADER_LIMIT}")
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise CeCheckError(f"{label}: truncated while reading its .safetensors header")
    return header_len, raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"duplicate key '{name}'")
        out[name] = value
    return out


def parse_header(raw: bytes, label: str) -> list[Entry]:
    """The tensors the JSON header `raw` describes, each checked on its own (`_entry`)."""
    corrupt = f"{label}: corrupt .safetensors header"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise CeCheckError(f"{corrupt}: not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise CeCheckError(f"{corrupt}: not JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(header, dict):
        raise CeCheckError(f"{corrupt}: not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CeCheckError(f"{corrupt}: __metadata__ is not an object of strings")
    return [_entry(name, spec, corrupt) for name, spec in header.items()]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, spec: Any, corrupt: str) -> Entry:
    where = f"{corrupt}: tensor '{name}'"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CeCheckError(f"{where}: expected exactly the keys dtype, shape, data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CeCheckError(f"{where}: unknown or unsupported dtype {dtype!r} (ce-check reads "
                           f"{', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_index(s) for s in shape):
        raise CeCheckError(f"{where}: shape {shape!r} is not a list of sizes >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_index, offsets))
            or offsets[0] > offsets[1]):
        raise CeCheckError(f"{where}: data_offsets {offsets!r} are not [begin, end] with "
                           "0 <= begin <= end")
    entry = Entry(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = math.prod(entry.shape) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: no overflow
    if entry.end - entry.begin != expected:
        raise CeCheckError(f"{corrupt}: {entry.where}: shape x dtype is {expected} bytes but "
                           f"its data_offsets span {entry.end - entry.begin}")
    return entry


def check_layout(entries: list[Entry], data_bytes: int, label: str) -> None:
    """The tensors tile the `data_bytes` after the header exactly: none reaches past the end
    of the file, none overlaps another, no byte belongs to none."""
    corrupt = f"{label}: corrupt .safetensors header"
    for entry in entries:
        if entry.end > data_bytes:
            raise CeCheckError(f"{corrupt}: {entry.where} reaches past the end of the file "
                               f"(its data holds {data_bytes} bytes)")
    covered, previous = 0, None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < covered:
            raise CeCheckError(f"{corrupt}: {previous.where} and {entry.where} overlap")
        if entry.begin > covered:
            raise CeCheckError(f"{corrupt}: bytes [{covered}, {entry.begin}) of the data belong "
                               "to no tensor")
        covered, previous = entry.end, entry
    if covered != data_bytes:
        raise CeCheckError(f"{corrupt}: the tensors span {covered} bytes but the data after the "
                           f"header holds {data_bytes}")


def _names(entries: list[Entry]) -> str:
    names = [e.name for e in entries]
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f", ... ({more} more)" if more > 0 else "")


def _select(entries: list[Entry], key: str | None, label: str) -> Entry:
    if key is None:
        if len(entries) != 1:
            listed = _names(entries) if entries else "none"
            raise CeCheckError(f"{label}: holds {len(entries)} tensors ({listed}); name one as "
                               "FILE.safetensors:NAME")
        return entries[0]
    for entry in entries:
        if entry.name == key:
            return entry
    raise CeCheckError(f"{label}: no tensor '{key}' (has: {_names(entries) or 'none'})")


def _map(path: Path, entry: Entry, data_start: int, label: str) -> np.ndarray:
    dtype = np.dtype(DTYPES[entry.dtype])
    try:  # numpy refuses some shapes the header may hold (over 64 dimensions, sizes past int64)
        if entry.begin == entry.end:
            arr: np.ndarray = np.zeros(entry.shape, dtype)
        else:
            arr = map_file(path, dtype, entry.shape, data_start + entry.begin)
    except (OSError, ValueError, OverflowError) as exc:
        raise CeCheckError(f"{label}: cannot map tensor '{entry.name}' "
                           f"({' '.join(str(exc).split())})") from None
    return bfloat16_rows(arr) if entry.dtype == "BF16" else arr
