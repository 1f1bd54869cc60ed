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
import select
import stat
import sys
import tokenize
import warnings
import zlib
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.bfloat16 import is_bfloat16, widen_if_bfloat16
from ce_cli.io import limits
from ce_cli.io.mapped import map_file
from ce_cli.io.limits import quoted

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
# what numpy and zlib raise on damaged bytes (a header that does not parse, a bad deflate stream);
# an .npz adds zipfile's BadZipFile (`_load_npz`: zipfile loads for .npz input only)
DAMAGED = (ValueError, TypeError, SyntaxError, EOFError, OSError, OverflowError, KeyError,
           NotImplementedError, RuntimeError, tokenize.TokenError, zlib.error)


def is_array_file(path: Path) -> bool:
    """True for a regular file of a shaped array format (.npy, .npz, .safetensors, .pt), whose
    shape is the writer's, not a text table's rows and columns."""
    if path.suffix.lower() in (".safetensors", ".pt", ".pth"):
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return head.startswith((NPY_MAGIC, ZIP_MAGIC))


def read_file(path: Path, key: str | None, label: str, *, pipes: bool = True) -> np.ndarray:
    """Load the file `path` (the member `key` of an .npz) as a numeric ndarray.

    `label` names the input in error messages ("logits file 'z.npy'"). Which file and key an
    argument names is `ce_cli.io.inputs.InputSpec`'s business. A named pipe is read (at most
    MAX_STREAM_BYTES, giving up after PIPE_IDLE_SECONDS of silence) only with `pipes`.
    """
    try:
        mode = _file_mode(path, label)
        if stat.S_ISFIFO(mode):  # a pipe such as <(cmd) or /dev/stdin: it can be read only once
            if not pipes:
                raise CeCheckError(f"{label}: is a named pipe (FIFO); name a regular file")
            return _load_bytes(read_pipe(path, label), key, label)
        if stat.S_ISDIR(mode):
            raise CeCheckError(f"{label}: is a directory, not an array file")
        if not stat.S_ISREG(mode):
            raise CeCheckError(f"{label}: not a regular file or a pipe")
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".safetensors":  # these readers load only for their own files
        from ce_cli.io.safetensors import read_safetensors

        return _check_dtype(read_safetensors(path, key, label), label)
    if suffix in (".pt", ".pth"):  # zip bytes too: told from .npz by the suffix
        from ce_cli.io.torch_pt import read_pt

        return _check_dtype(read_pt(path, label), label)
    if head.startswith(NPY_MAGIC):
        arr = _load_npy_path(path, label)
    elif head.startswith(ZIP_MAGIC):
        arr = _load_npz(path, key, label)
    elif suffix in (".npy", ".npz"):
        kind = "a .npy" if suffix == ".npy" else "an .npz"
        raise CeCheckError(f"{label}: not {kind} file (its first bytes are not the {kind[-4:]} "
                           "magic)")
    else:
        arr = parse_csv(_read_text(path, label), label)
    return _check_dtype(arr, label)


def _file_mode(path: Path, label: str) -> int:
    """The file type bits of `path` (symlinks followed), or the reason it cannot be read."""
    if not str(path).strip():
        raise CeCheckError(f"{label}: empty path")
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        raise CeCheckError(f"{label}: no such file") from None
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None


def read_pipe(path: Path, label: str) -> bytes:
    """The bytes of the named pipe `path`: at most MAX_STREAM_BYTES, giving up after
    PIPE_IDLE_SECONDS without a byte (no writer ever came, or it went silent)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening does not wait for a writer
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        out = bytearray()
        while True:
            if not poller.poll(limits.PIPE_IDLE_SECONDS * 1000):
                raise CeCheckError(f"{label}: nothing came through the named pipe in "
                                   f"{limits.PIPE_IDLE_SECONDS:g} s; is anything writing to it?")
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                return bytes(out)
            out += chunk
            _check_stream_size(len(out), label)
    finally:
        os.close(fd)


def _check_stream_size(n: int, label: str) -> None:
    if n > limits.MAX_STREAM_BYTES:
        raise CeCheckError(f"{label}: more than {limits.MAX_STREAM_BYTES} bytes (the limit for "
                           "standard input and pipes); save it to a file")


def read_stream(stream: BinaryIO, label: str) -> bytes:
    """All of `stream` (standard input), at most MAX_STREAM_BYTES."""
    out = bytearray()
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            return bytes(out)
        out += chunk
        _check_stream_size(len(out), label)


def read_stdin(label: str, stdin: BinaryIO | None = None) -> np.ndarray:
    """Load standard input (or the stream `stdin`): .npy, .npz or CSV bytes."""
    if stdin is None:
        if sys.stdin is None:
            raise CeCheckError(f"{label}: standard input is closed")
        if sys.stdin.isatty():
            raise CeCheckError(f"{label}: standard input is a terminal; pipe a .npy or CSV into it")
        stdin = sys.stdin.buffer
    try:
        data = read_stream(stdin, label)
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
        arr = parse_csv(data, label)
    return _check_dtype(arr, label)


def _read_header(fh: IO[bytes], label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The header of the .npy stream `fh` (left at the first data byte). The header's length
    field is checked against MAX_NPY_HEADER_BYTES before a byte of it is read."""
    prefix = fh.read(8)
    if len(prefix) < 8 or not prefix.startswith(NPY_MAGIC):
        raise CeCheckError(f"{label}: corrupt .npy header (too short)")
    version = (prefix[6], prefix[7])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise CeCheckError(f"{label}: unsupported .npy format version {version}")
    field = fh.read(2 if version == (1, 0) else 4)
    length = int.from_bytes(field, "little")
    if length > limits.MAX_NPY_HEADER_BYTES:
        raise CeCheckError(f"{label}: corrupt .npy header (it claims {length} bytes; the limit "
                           f"is {limits.MAX_NPY_HEADER_BYTES})")
    header = io.BytesIO(prefix + field + fh.read(length))
    try:
        np.lib.format.read_magic(header)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        return read(header, max_header_size=limits.MAX_NPY_HEADER_BYTES)
    except DAMAGED as exc:
        raise CeCheckError(f"{label}: corrupt .npy header ({_one_line(exc)})") from None


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


def npy_file_header(path: Path, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The header of the .npy file `path`, checked (length, no negative dimension, the data the
    shape claims really in the file), any dtype; `CeCheckError` naming `label` otherwise."""
    try:
        with path.open("rb") as fh:
            shape, fortran, dtype = _read_header(fh, label)
            offset = fh.tell()
        size = os.path.getsize(path)
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if any(s < 0 for s in shape):
        raise CeCheckError(f"{label}: corrupt .npy header (negative dimension in shape {tuple(shape)})")
    expected = math.prod(shape) * dtype.itemsize
    if size - offset < expected:
        raise CeCheckError(f"{label}: truncated: header says shape {tuple(shape)} {dtype} "
                           f"({expected} bytes) but the file holds {size - offset} bytes of data")
    return shape, fortran, dtype


def _load_npy_path(path: Path, label: str) -> np.ndarray:
    with path.open("rb") as fh:
        shape, fortran, dtype = _read_header(fh, label)
        offset = fh.tell()
    _header_checks(shape, dtype, os.path.getsize(path) - offset, label)
    try:
        if math.prod(shape) == 0:
            return np.load(path, allow_pickle=False)
        return map_file(path, dtype, shape, offset, fortran)
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
    import zipfile

    damaged = (*DAMAGED, zipfile.BadZipFile)
    try:
        archive = zipfile.ZipFile(source)
    except damaged as exc:
        raise CeCheckError(f"{label}: not a readable .npz archive ({_one_line(exc)})") from None
    with archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        key = _npz_member(names, key, label)
        where = f"{label}[{quoted(key)[1:-1]}]"
        try:
            with archive.open(f"{key}.npy") as fh:
                shape, fortran, dtype = _read_header(fh, where)
                size = archive.getinfo(f"{key}.npy").file_size - fh.tell()
                _header_checks(shape, dtype, size, where)
                return _read_member(fh, shape, fortran, dtype, where)
        except damaged as exc:
            raise CeCheckError(f"{where}: cannot load ({_one_line(exc)})") from None


def _npz_member(names: list[str], key: str | None, label: str) -> str:
    """The member `key` names (the only one when None), or a one-line refusal listing a few."""
    if key is not None and key in names:
        return key
    shown = ", ".join(quoted(n)[1:-1] for n in names[:8]) + (", ..." if len(names) > 8 else "")
    listed = shown or "none"
    if key is None:
        if len(names) == 1:
            return names[0]
        raise CeCheckError(f"{label}: holds {len(names)} arrays ({listed}); name one as FILE.npz:KEY")
    raise CeCheckError(f"{label}: no array {quoted(key)} (has: {listed})")


def _read_member(fh: IO[bytes], shape: tuple[int, ...], fortran: bool, dtype: np.dtype,
                 label: str) -> np.ndarray:
    """Exactly the bytes the header declares (decompressing no further), at most
    MAX_DECOMPRESSED_BYTES: a zip bomb costs what its header admits to, and is refused above."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.MAX_DECOMPRESSED_BYTES:
        raise CeCheckError(f"{label}: shape {tuple(shape)} {dtype} is {nbytes} bytes "
                           f"decompressed, over the limit of {limits.MAX_DECOMPRESSED_BYTES}")
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = fh.readinto(view[got:])  # type: ignore[attr-defined]  # ZipExtFile, BytesIO
        if not n:
            raise CeCheckError(f"{label}: truncated: the member ends after {got} of {nbytes} "
                               "bytes")
        got += n
    arr = np.frombuffer(buf, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def _read_text(path: Path, label: str) -> bytes:
    try:
        if path.stat().st_size > limits.MAX_STREAM_BYTES:
            raise CeCheckError(f"{label}: a text file over {limits.MAX_STREAM_BYTES} bytes; "
                               "save it as .npy")
        return path.read_bytes()
    except OSError as exc:
        raise CeCheckError(f"{label}: cannot read ({exc.strerror or exc})") from None


def _text_bytes(data: bytes, label: str) -> str:
    """`data` as text: refused when binary or not UTF-8 (a leading BOM is dropped)."""
    if b"\x00" in data[:4096]:
        raise CeCheckError(f"{label}: binary data, not .npy/.npz or CSV text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CeCheckError(f"{label}: not .npy bytes, and not UTF-8 CSV text") from None


# bytes that only a float token holds (a point, an exponent, nan, inf)
_FLOAT_BYTES = (b".", b"e", b"E", b"n", b"N", b"i", b"I")
_BOM = b"\xef\xbb\xbf"
ASCII_STEP = 1 << 20  # bytes checked for ASCII at a time: no copy of a large file's text


def parse_csv(data: bytes, label: str) -> np.ndarray:
    """CSV/TSV/whitespace text: numbers only, an optional header line, one row per sample.

    numpy's C parser (`loadtxt`, streaming: memory about the size of the result) reads it; what
    it refuses goes through the line-by-line parser, which accepts what Python's int/float do
    and names the line and column of a bad cell."""
    if b"\x00" in data[:4096]:
        raise CeCheckError(f"{label}: binary data, not .npy/.npz or CSV text")
    try:
        found = _first_line(data)
    except UnicodeDecodeError:
        found = None
    if found is not None:
        first, after = found
        delimiter = _delimiter(first)
        header = all(_parse_number(t) is None for t in _split_line(first, delimiter))
        arr = _fast_parse(data, after if header else 0, delimiter)
        if arr is not None:
            return arr
    return _parse_text(_text_bytes(data, label), label)


def _first_line(data: bytes) -> tuple[str, int] | None:
    """The first non-blank line, decoded, and the offset just after it (None: no such line)."""
    start = 3 if data.startswith(_BOM) else 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end + 1
        line = data[start:end].decode("utf-8")
        if line.strip():
            return line, end
        start = end
    return None


def _delimiter(first: str) -> str | None:
    return "\t" if "\t" in first else ("," if "," in first else None)


def _fast_parse(data: bytes, start: int, delimiter: str | None) -> np.ndarray | None:
    """`data[start:]` through numpy's loadtxt: int64 when no token can be a float (and all fit),
    else float64; None when loadtxt refuses it (or finds no rows), or when it holds a byte
    beyond ASCII: numpy 2.4's integer parser takes a character past U+FFFF for a digit worth
    its code point, or reads out of bounds and crashes ('0,0,0,\U0009d24e': [[0, 0, 0, 643614]]
    or SIGSEGV, run to run); the line parser reads those."""
    if not _ascii(data, start + (3 if data.startswith(_BOM, start) else 0)):
        return None
    floats = any(data.find(b, start) != -1 for b in _FLOAT_BYTES)
    for dtype in ((np.float64,) if floats else (np.int64, np.float64)):
        raw = io.BytesIO(data)
        raw.seek(start)
        text = io.TextIOWrapper(raw, encoding="utf-8-sig" if start == 0 else "utf-8")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = np.loadtxt(text, dtype=dtype, delimiter=delimiter, comments=None, ndmin=2,
                                 quotechar=None)
        except (ValueError, OverflowError):
            continue
        return arr if arr.size else None
    return None


def _ascii(data: bytes, start: int) -> bool:
    return all(data[i:i + ASCII_STEP].isascii() for i in range(start, len(data), ASCII_STEP))


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
    delimiter = _delimiter(lines[0][1])
    rows: list[list[int | float]] = []
    for index, (lineno, line) in enumerate(lines):
        values = _parse_row(line, delimiter, lineno, label, header_allowed=index == 0,
                            rows_seen=bool(rows))
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
               header_allowed: bool, rows_seen: bool = False) -> list[int | float] | None:
    """The numbers of one line; None for a header line (allowed first, no cell a number)."""
    tokens = _split_line(line, delimiter)
    values = [_parse_number(t) for t in tokens]
    if header_allowed and all(v is None for v in values):
        return None
    for col, value in enumerate(values):
        if value is None:
            raise CeCheckError(f"{label}: line {lineno}, column {col + 1}: not a number"
                               + _excerpt(tokens[col], numeric_seen=rows_seen
                                          or any(v is not None for v in values)))
    return [v for v in values if v is not None]


def _excerpt(token: str, *, numeric_seen: bool) -> str:
    """`: 'x'` quoting a bad cell (short, escaped) only when the file has shown itself to be
    numbers (an earlier data row, or a number on the same line); else its length only, so a
    file that is not CSV at all (a key file named by mistake) is never echoed."""
    if numeric_seen:
        return f": {quoted(token, 20)}"
    return f" (a {len(token)}-character cell; the file does not look like CSV numbers)"


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
    return widen_if_bfloat16(arr)  # bool stays bool: reports show it; the loss models read it as 0/1


def _one_line(exc: BaseException, limit: int = 120) -> str:
    """The exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
