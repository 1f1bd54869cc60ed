"""Load arrays from .npy, .npz, .safetensors, .pt, CSV/TSV files or standard input, refusing
anything unsafe.

Every failure raises `CeCheckError` with a one-line message naming the source. `.npy` files are
validated from their header (dtype, and that the file really holds the bytes the shape claims)
and then memory-mapped, so a 0.5 GB input costs page cache, not process memory.
"""

from __future__ import annotations

import io
import math
import os
import stat
import sys
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.bfloat16 import is_bfloat16, widen_bfloat16
from ce_cli.io.safetensors import read_safetensors
from ce_cli.io.torch_pt import read_pt

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
# what numpy, zipfile and zlib raise on damaged bytes (a header that does not parse, a bad archive)
DAMAGED = (ValueError, TypeError, SyntaxError, EOFError, OSError, OverflowError, KeyError,
           NotImplementedError, RuntimeError, tokenize.TokenError, zipfile.BadZipFile, zlib.error)


def read_file(path: Path, key: str | None, label: str) -> np.ndarray:
    """Load the file `path` (the member `key` of an .npz) as a numeric ndarray.

    `label` names the input in error messages ("logits file 'z.npy'"). Which file and key an
    argument names is `ce_cli.io.inputs.InputSpec`'s business.
    """
    if not path.exists():
        raise CeCheckError(f"{label}: no such file")
    if path.is_dir():
        raise CeCheckError(f"{label}: is a directory, not an array file")
    try:
        mode = path.stat().st_mode
        if stat.S_ISFIFO(mode):  # a pipe such as <(cmd) or /dev/stdin: it can be read only once
            with path.open("rb") as fh:
                return _load_bytes(fh.read(), key, label)
        if not stat.S_ISREG(mode):
            raise CeCheckError(f"{label}: not a regular file or a pipe")
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _check_dtype(read_safetensors(path, key, label), label)
    if suffix in (".pt", ".pth"):  # zip bytes too: told from .npz by the suffix
        return _check_dtype(read_pt(path, label), label)
    if head.startswith(NPY_MAGIC):
        arr = _load_npy_path(path, label)
    elif head.startswith(ZIP_MAGIC):
        arr = _load_npz(path, key, label)
    elif suffix in (".npy", ".npz"):
        kind = "a .npy" if suffix == ".npy" else "an .npz"
        raise CeCheckError(f"{label}: not {kind} file (bad magic bytes {head[:6]!r})")
    else:
        arr = _parse_text(_read_text(path, label), label)
    return _check_dtype(arr, label)


def read_stdin(label: str, stdin: BinaryIO | None = None) -> np.ndarray:
    """Load standard input (or the stream `stdin`): .npy, .npz or CSV bytes."""
    if stdin is None:
        if sys.stdin is None:
            raise CeCheckError(f"{label}: standard input is closed")
        if sys.stdin.isatty():
            raise CeCheckError(f"{label}: standard input is a terminal; pipe a .npy or CSV into it")
        stdin = sys.stdin.buffer
    try:
        data = stdin.read()
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise CeCheckError(f"{label}: standard input is empty")
    return _load_bytes(data, None, label)


def _load_bytes(data: bytes, key: str | None, label: str) -> np.ndarray:
    """An array from bytes read off a stream: .npy, .npz or CSV text."""
    if data.startswith(NPY_MAGIC):
        arr = _load_npy_stream(io.BytesIO(data), len(data), label)
    elif data.startswith(ZIP_MAGIC):
        arr = _load_npz(io.BytesIO(data), key, label)
    else:
        if b"\x00" in data[:4096]:
            raise CeCheckError(f"{label}: binary data, not .npy/.npz or CSV text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CeCheckError(f"{label}: neither .npy bytes nor UTF-8 CSV text") from None
        arr = _parse_text(text, label)
    return _check_dtype(arr, label)


def _read_header(fh: BinaryIO, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        if version in ((2, 0), (3, 0)):
            return np.lib.format.read_array_header_2_0(fh)
    except DAMAGED as exc:
        raise CeCheckError(f"{label}: corrupt .npy header ({_one_line(exc)})") from None
    raise CeCheckError(f"{label}: unsupported .npy format version {version}")


def _header_checks(shape, dtype: np.dtype, data_bytes: int, label: str) -> None:
    _check_dtype_kind(dtype, label, shape)
    if any(s < 0 for s in shape):
        raise CeCheckError(f"{label}: corrupt .npy header (negative dimension in shape {tuple(shape)})")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge shape cannot overflow
    if data_bytes < expected:
        raise CeCheckError(
            f"{label}: truncated: header says shape {tuple(shape)} {dtype} "
            f"({expected} bytes) but the file holds {data_bytes} bytes of data"
        )


def _load_npy_path(path: Path, label: str) -> np.ndarray:
    with path.open("rb") as fh:
        shape, _fortran, dtype = _read_header(fh, label)
        offset = fh.tell()
    _header_checks(shape, dtype, os.path.getsize(path) - offset, label)
    try:
        if math.prod(shape) == 0:
            return np.load(path, allow_pickle=False)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except DAMAGED as exc:
        raise CeCheckError(f"{label}: cannot load ({_one_line(exc)})") from None


def _load_npy_stream(fh: BinaryIO, total: int, label: str) -> np.ndarray:
    shape, _fortran, dtype = _read_header(fh, label)
    offset = fh.tell()
    _header_checks(shape, dtype, total - offset, label)
    fh.seek(0)
    try:
        return np.load(fh, allow_pickle=False)
    except DAMAGED as exc:
        raise CeCheckError(f"{label}: cannot load ({_one_line(exc)})") from None


def _load_npz(source, key: str | None, label: str) -> np.ndarray:
    try:
        archive = np.load(source, allow_pickle=False)
    except DAMAGED as exc:
        raise CeCheckError(f"{label}: not a readable .npz archive ({_one_line(exc)})") from None
    with archive:
        names = list(archive.files)
        if key is None:
            if len(names) != 1:
                listed = ", ".join(names) if names else "none"
                raise CeCheckError(
                    f"{label}: holds {len(names)} arrays ({listed}); name one as FILE.npz:KEY"
                )
            key = names[0]
        elif key not in names:
            raise CeCheckError(f"{label}: no array '{key}' (has: {', '.join(names) or 'none'})")
        member = f"{key}.npy"
        try:
            with archive.zip.open(member) as fh:
                shape, _fortran, dtype = _read_header(fh, f"{label}[{key}]")
                header_len = fh.tell()
            size = archive.zip.getinfo(member).file_size
            _header_checks(shape, dtype, size - header_len, f"{label}[{key}]")
            return archive[key]
        except DAMAGED as exc:
            raise CeCheckError(f"{label}[{key}]: cannot load ({_one_line(exc)})") from None


def _read_text(path: Path, label: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if b"\x00" in data[:4096]:
        raise CeCheckError(f"{label}: binary data, not .npy/.npz or CSV text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CeCheckError(f"{label}: not UTF-8 CSV text") from None


def _parse_number(token: str) -> int | float | None:
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        return None


def _split_line(line: str, delimiter: str | None) -> list[str]:
    return [t.strip() for t in line.split(delimiter)] if delimiter else line.split()


def _parse_text(text: str, label: str) -> np.ndarray:
    """CSV/TSV/whitespace text: numbers only, an optional header line, one row per sample."""
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise CeCheckError(f"{label}: empty: no rows")
    first = lines[0][1]
    delimiter = "\t" if "\t" in first else ("," if "," in first else None)
    rows: list[list[int | float]] = []
    for index, (lineno, line) in enumerate(lines):
        values = _parse_row(line, delimiter, lineno, label, header_allowed=index == 0)
        if values is None:
            continue  # a header line: no cell is a number
        if rows and len(values) != len(rows[0]):
            raise CeCheckError(
                f"{label}: line {lineno}: ragged rows: {len(values)} values, expected {len(rows[0])}"
            )
        rows.append(values)
    if not rows:
        raise CeCheckError(f"{label}: only a header line, no data rows")
    return _rows_to_array(rows)


def _parse_row(line: str, delimiter: str | None, lineno: int, label: str, *,
               header_allowed: bool) -> list[int | float] | None:
    """The numbers of one line; None for a header line (allowed first, no cell a number)."""
    tokens = _split_line(line, delimiter)
    values = [_parse_number(t) for t in tokens]
    if header_allowed and all(v is None for v in values):
        return None
    for col, value in enumerate(values):
        if value is None:
            raise CeCheckError(
                f"{label}: line {lineno}, column {col + 1}: not a number: {tokens[col]!r}"
            )
    return [v for v in values if v is not None]


def _rows_to_array(rows: list[list[int | float]]) -> np.ndarray:
    """int64 when every value is an integer that fits, float64 otherwise."""
    if all(isinstance(v, int) for row in rows for v in row):
        try:
            return np.array(rows, dtype=np.int64)
        except OverflowError:
            pass
    return np.array(rows, dtype=np.float64)


def _check_dtype_kind(dtype: np.dtype, label: str, shape) -> None:
    where = f"{label}: shape {tuple(shape)} dtype {dtype}"
    if is_bfloat16(dtype):
        return  # widened to float32 by _check_dtype
    if dtype.hasobject:
        raise CeCheckError(f"{where}: holds Python objects (pickled data is refused)")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise CeCheckError(f"{where}: structured dtype; expected a plain numeric array")
    if dtype.kind == "c":
        raise CeCheckError(f"{where}: complex numbers are not supported")
    if dtype.kind not in "biuf":
        raise CeCheckError(f"{where}: not numeric")


def _check_dtype(arr: np.ndarray, label: str) -> np.ndarray:
    _check_dtype_kind(arr.dtype, label, arr.shape)
    if is_bfloat16(arr.dtype):
        return widen_bfloat16(arr)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    return arr


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
