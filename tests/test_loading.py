"""Unit tests of `ce_cli.io.loading.load_array`: formats, dtype detection, stdin, refusals."""

import io
import os
import stat
import threading
import tracemalloc

import numpy as np
import pytest

from ce_cli.errors import CeCheckError
from ce_cli.io.inputs import load_array
from tests.conftest import FIXTURES, npy_bytes

FORMATS = FIXTURES / "formats"


def write_header_only(path, shape, descr="<f8", data=b"\0" * 64) -> str:
    """A .npy whose header claims `shape` but holds only `data`."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": descr, "fortran_order": False, "shape": shape})
        fh.write(data)
    return str(path)


def is_memmapped(arr: np.ndarray) -> bool:
    while arr is not None:
        if isinstance(arr, np.memmap):
            return True
        arr = arr.base if isinstance(arr.base, np.ndarray) else None
    return False


# --- .npy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8])
def test_npy_round_trip_keeps_dtype_and_is_memory_mapped(tmp_path, dtype):
    arr = (np.arange(12).reshape(3, 4) % 7).astype(dtype)
    np.save(tmp_path / "a.npy", arr)
    got = load_array(str(tmp_path / "a.npy"), what="logits")
    assert got.dtype == np.dtype(dtype)
    assert got.shape == (3, 4)
    np.testing.assert_array_equal(got, arr)
    assert is_memmapped(got)


def test_npy_fortran_order_and_big_endian(tmp_path):
    arr = np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3))
    np.save(tmp_path / "f.npy", arr)
    got = load_array(str(tmp_path / "f.npy"))
    np.testing.assert_array_equal(got, arr)
    assert got.flags.f_contiguous and got.dtype == np.dtype(">f8")


def vm_flags(arr: np.ndarray) -> list[str]:
    """The Linux VmFlags of the mapping holding `arr`'s data (/proc/self/smaps)."""
    addr = arr.ctypes.data
    with open("/proc/self/smaps") as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines):
        lo, _, hi = line.partition(" ")[0].partition("-")
        if hi and all(c in "0123456789abcdef" for c in lo + hi) and int(lo, 16) <= addr < int(hi, 16):
            flags = next(x for x in lines[i + 1:] if x.startswith("VmFlags:"))
            return flags.split()[1:]
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only (/proc/self/smaps)")
@pytest.mark.parametrize("source", ["npy", "safetensors"])
def test_mapped_inputs_are_advised_huge_pages(tmp_path, source):
    """An input file's mapping asks for 2 MB pages (MADV_HUGEPAGE: VmFlags 'hg'), so a file
    read from disk through it fills the page cache with 2 MB folios, mapped 2 MB at a time."""
    if source == "npy":
        np.save(tmp_path / "a.npy", np.ones((64, 1000), np.float32))
        got = load_array(str(tmp_path / "a.npy"))
    else:
        got = load_array(f"{FORMATS}/case.safetensors:grad_f32")
    assert is_memmapped(got) and not got.flags.writeable
    assert "hg" in vm_flags(got)


def test_npy_zero_d(tmp_path):
    np.save(tmp_path / "s.npy", np.array(3))
    got = load_array(str(tmp_path / "s.npy"))
    assert got.shape == () and int(got) == 3


def test_npy_empty_array_loads(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 5)))
    assert load_array(str(tmp_path / "e.npy")).shape == (0, 5)


def test_bool_arrays_stay_bool(tmp_path):
    """Reports show bool labels as bool (the loss models read them as 0/1)."""
    np.save(tmp_path / "b.npy", np.array([True, False, True]))
    got = load_array(str(tmp_path / "b.npy"))
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, [1, 0, 1])


def test_npy_without_npy_suffix_is_detected_by_magic(tmp_path):
    path = tmp_path / "logits.bin"
    path.write_bytes(npy_bytes(np.eye(2)))
    np.testing.assert_array_equal(load_array(str(path)), np.eye(2))


# --- .npz ------------------------------------------------------------------------------------

def test_npz_single_array_needs_no_key(tmp_path):
    np.savez(tmp_path / "one.npz", logits=np.ones((2, 3)))
    np.testing.assert_array_equal(load_array(str(tmp_path / "one.npz")), np.ones((2, 3)))


def test_npz_with_key_and_compressed(tmp_path):
    np.savez_compressed(tmp_path / "many.npz", a=np.ones((2, 3)), b=np.arange(4))
    np.testing.assert_array_equal(load_array(f"{tmp_path / 'many.npz'}:b"), np.arange(4))


def test_npz_several_arrays_without_key_lists_them(tmp_path):
    np.savez(tmp_path / "many.npz", a=np.ones(2), b=np.ones(3))
    with pytest.raises(CeCheckError, match=r"holds 2 arrays \(a, b\).*FILE\.npz:KEY"):
        load_array(str(tmp_path / "many.npz"), what="logits")


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "many.npz", a=np.ones(2), b=np.ones(3))
    with pytest.raises(CeCheckError, match=r"no array 'zz' \(has: a, b\)"):
        load_array(f"{tmp_path / 'many.npz'}:zz")


def test_npz_member_with_object_dtype_is_refused(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.array([1, None], dtype=object))
    with pytest.raises(CeCheckError, match="Python objects"):
        load_array(str(tmp_path / "o.npz"))


# --- text ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "1,2,3\n4,5,6\n",
    "1\t2\t3\n4\t5\t6\n",
    "1 2 3\n4   5 6\n",
    "1, 2, 3\r\n4, 5, 6\r\n",
    "\ufeff1,2,3\n\n4,5,6\n\n",
])
def test_text_formats(tmp_path, text):
    path = tmp_path / "a.csv"
    path.write_text(text, encoding="utf-8")
    got = load_array(str(path))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [[1, 2, 3], [4, 5, 6]])


def test_text_header_line_is_skipped(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("c0,c1,c2\n1,2,3\n4,5,6.5\n")
    got = load_array(str(path))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [[1, 2, 3], [4, 5, 6.5]])


def test_text_int_vs_float_detection(tmp_path):
    (tmp_path / "i.csv").write_text("0\n3\n2\n")
    (tmp_path / "f.csv").write_text("0\n3.0\n2\n")
    (tmp_path / "e.csv").write_text("1e3,2\n")
    assert load_array(str(tmp_path / "i.csv")).dtype == np.int64
    assert load_array(str(tmp_path / "f.csv")).dtype == np.float64
    assert load_array(str(tmp_path / "e.csv")).dtype == np.float64


def test_text_ints_too_large_for_int64_become_float(tmp_path):
    (tmp_path / "big.csv").write_text(f"{2**70},1\n")
    got = load_array(str(tmp_path / "big.csv"))
    assert got.dtype == np.float64 and got[0, 0] == 2.0**70


def test_text_special_floats_parse(tmp_path):
    (tmp_path / "s.csv").write_text("-inf,0.5,nan\n")
    got = load_array(str(tmp_path / "s.csv"))
    assert np.isneginf(got[0, 0]) and np.isnan(got[0, 2])


def test_text_non_numeric_cell_names_line_and_column(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(CeCheckError, match=r"bad\.csv'?: line 3, column 2: not a number: 'x'"):
        load_array(str(tmp_path / "bad.csv"), what="logits")


def test_text_first_line_with_numbers_is_data_not_a_header(tmp_path):
    # a typo in the first row must not silently drop that row as a "header"
    (tmp_path / "bad.csv").write_text("1,x,3\n4,5,6\n")
    with pytest.raises(CeCheckError, match=r"line 1, column 2: not a number: 'x'"):
        load_array(str(tmp_path / "bad.csv"))


def test_text_ragged_rows(tmp_path):
    (tmp_path / "r.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(CeCheckError, match=r"line 2: ragged rows: 2 values, expected 3"):
        load_array(str(tmp_path / "r.csv"))


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("\n  \n", "empty"),
    ("a,b,c\n", "only a header line"),
])
def test_text_without_data(tmp_path, text, message):
    (tmp_path / "e.csv").write_text(text)
    with pytest.raises(CeCheckError, match=message):
        load_array(str(tmp_path / "e.csv"))


def test_text_binary_garbage_is_refused(tmp_path):
    (tmp_path / "g.dat").write_bytes(b"\x01\x00\x02garbage")
    with pytest.raises(CeCheckError, match="binary data"):
        load_array(str(tmp_path / "g.dat"))


def test_text_not_utf8(tmp_path):
    (tmp_path / "l.csv").write_bytes(b"1,2\n\xff\xfe,3\n")
    with pytest.raises(CeCheckError, match="not UTF-8"):
        load_array(str(tmp_path / "l.csv"))


# --- stdin -----------------------------------------------------------------------------------

def test_stdin_npy_bytes():
    got = load_array("-", what="logits", stdin=io.BytesIO(npy_bytes(np.arange(6.0).reshape(2, 3))))
    np.testing.assert_array_equal(got, np.arange(6.0).reshape(2, 3))


def test_stdin_npz_bytes():
    buf = io.BytesIO()
    np.savez(buf, x=np.arange(3))
    np.testing.assert_array_equal(load_array("-", stdin=io.BytesIO(buf.getvalue())), np.arange(3))


def test_stdin_csv_text():
    got = load_array("-", stdin=io.BytesIO(b"0\n2\n1\n"))
    assert got.dtype == np.int64 and got.shape == (3, 1)


@pytest.mark.parametrize("cell", ["\U0009d24e", "\U0001d7d9", "\u00b2", "\uff11"])
def test_csv_cell_beyond_ascii_is_read_by_python_not_numpy(cell):
    """numpy 2.4's loadtxt takes '0,0,0,\U0009d24e' for [[0, 0, 0, 643614]] or crashes (SIGSEGV),
    run to run: a non-ASCII file goes to the line parser, which takes what Python's int takes
    (a full-width 1) and names the cell it cannot read."""
    data = f"0,0,0,{cell}\n".encode()
    for _ in range(50):
        try:
            got = load_array("-", stdin=io.BytesIO(data)).tolist()
        except CeCheckError as e:
            assert "line 1, column 4: not a number" in str(e)
        else:
            assert got == [[0, 0, 0, int(cell)]]


def test_csv_with_a_bom_stays_on_numpys_parser(monkeypatch):
    from ce_cli.io import loading
    monkeypatch.setattr(loading, "_parse_text", lambda *a: pytest.fail("line parser used"))
    got = load_array("-", stdin=io.BytesIO(b"\xef\xbb\xbf1.5,2\n3,4\n"))
    assert got.tolist() == [[1.5, 2.0], [3.0, 4.0]]


def test_stdin_bool_npy_stays_bool():
    assert load_array("-", stdin=io.BytesIO(npy_bytes([True, False]))).dtype == np.bool_


def test_stdin_empty():
    with pytest.raises(CeCheckError, match="labels from stdin: standard input is empty"):
        load_array("-", what="labels", stdin=io.BytesIO(b""))


def test_stdin_truncated_npy():
    data = npy_bytes(np.ones((10, 10)))[:-16]
    with pytest.raises(CeCheckError, match="logits from stdin: truncated"):
        load_array("-", what="logits", stdin=io.BytesIO(data))


def test_stdin_binary_garbage():
    with pytest.raises(CeCheckError, match="from stdin"):
        load_array("-", stdin=io.BytesIO(b"\xff\xfe\x00\x01"))


# --- refusals --------------------------------------------------------------------------------

def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CeCheckError, match=r"logits file '.*nope\.npy': no such file"):
        load_array(str(tmp_path / "nope.npy"), what="logits")
    with pytest.raises(CeCheckError, match="is a directory"):
        load_array(str(tmp_path), what="logits")


@pytest.mark.parametrize("arr, message", [
    (np.array(["a", "b"]), "not numeric"),
    (np.array([1 + 2j]), "complex numbers"),
    (np.zeros(2, dtype=[("a", "<f8"), ("b", "<i4")]), "structured dtype"),
    (np.array(["2020-01-01"], dtype="datetime64[D]"), "not numeric"),
])
def test_non_numeric_dtypes_are_refused_with_shape_and_dtype(tmp_path, arr, message):
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(CeCheckError, match=message) as info:
        load_array(str(tmp_path / "x.npy"))
    assert f"shape {arr.shape}" in str(info.value)


def test_pickled_object_array_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(CeCheckError, match=r"holds Python objects \(pickled data is refused\)"):
        load_array(str(tmp_path / "o.npy"))


def test_truncated_npy(tmp_path):
    data = npy_bytes(np.ones((10, 10)))
    (tmp_path / "t.npy").write_bytes(data[:-8])
    with pytest.raises(CeCheckError, match=r"truncated: header says shape \(10, 10\) float64 \(800 bytes\)"):
        load_array(str(tmp_path / "t.npy"))


def test_npy_header_cut_short(tmp_path):
    (tmp_path / "t.npy").write_bytes(npy_bytes(np.ones(3))[:20])
    with pytest.raises(CeCheckError, match="corrupt .npy header"):
        load_array(str(tmp_path / "t.npy"))


def test_npy_bad_magic(tmp_path):
    (tmp_path / "t.npy").write_text("hello, world\n")
    with pytest.raises(CeCheckError, match="not a .npy file"):
        load_array(str(tmp_path / "t.npy"))


@pytest.mark.parametrize("shape", [
    (1000, 10),
    (10**6, 10**6),
    (2**32, 2**32),           # the element count overflows int64 to 0
    (2**62, 3),               # ... and to a negative number
    (2**40, 2**40, 2**40),
])
def test_header_claiming_more_data_than_the_file_holds(tmp_path, shape):
    path = write_header_only(tmp_path / "h.npy", shape)
    tracemalloc.start()
    try:
        with pytest.raises(CeCheckError, match="truncated: header says shape"):
            load_array(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20  # refused from the header, nothing allocated


def test_header_with_negative_dimension(tmp_path):
    path = write_header_only(tmp_path / "n.npy", (-5, 2))
    with pytest.raises(CeCheckError, match="negative dimension"):
        load_array(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.npy"
    np.save(path, np.ones(3))
    path.chmod(0)
    try:
        with pytest.raises(CeCheckError, match="cannot read"):
            load_array(str(path))
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("payload", [npy_bytes(np.arange(6.0).reshape(2, 3)), b"0,1,2\n3,4,5\n"])
def test_named_pipe_is_read_once(tmp_path, payload):
    """A pipe (bash's <(cmd) gives /dev/fd/N) must not lose its first bytes to format sniffing."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "wb") as fh:
            fh.write(payload)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    got = load_array(str(fifo))
    t.join(timeout=10)
    np.testing.assert_array_equal(got, np.arange(6).reshape(2, 3))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_is_refused_instead_of_read_forever():
    with pytest.raises(CeCheckError, match="not a regular file or a pipe"):
        load_array("/dev/zero")


# --- damaged bytes: every failure is a CeCheckError, never a stray exception (exit 3) ------------

def _replace_same_length(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and old in data
    return data.replace(old, new, 1)


def _zip_patch(data: bytes, local_offset: int, central_offset: int, value: int) -> bytes:
    """Set a 2-byte field of the first member in both the local and the central header."""
    d = bytearray(data)
    central = d.find(b"PK\x01\x02")
    d[local_offset:local_offset + 2] = value.to_bytes(2, "little")
    d[central + central_offset:central + central_offset + 2] = value.to_bytes(2, "little")
    return bytes(d)


def _npz(compressed=False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, a=np.arange(4000.0))
    return buf.getvalue()


def _corrupt_deflate(data: bytes) -> bytes:
    d = bytearray(data)
    for i in range(120, 400, 7):
        d[i] ^= 0x5A
    return bytes(d)


DAMAGED = {
    "unbalanced-paren-in-header": (  # tokenize.TokenError inside numpy's header parser
        lambda: _replace_same_length(npy_bytes(np.ones((3, 4))), b"(3, 4)", b"(3, 4 "), ".npy"),
    "bytes-key-in-header": (  # TypeError: sorting bytes and str keys
        lambda: _replace_same_length(npy_bytes(np.ones(3)), b"{'descr'", b"{b'desc'"), ".npy"),
    "unsupported-zip-compression": (  # NotImplementedError from zipfile
        lambda: _zip_patch(_npz(), 8, 10, 99), ".npz"),
    "encrypted-zip-member": (  # RuntimeError: password required
        lambda: _zip_patch(_npz(), 6, 8, 1), ".npz"),
    "corrupt-deflate-stream": (  # zlib.error or a bad CRC
        lambda: _corrupt_deflate(_npz(compressed=True)), ".npz"),
    "truncated-zip": (lambda: _npz()[:100], ".npz"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_bytes_raise_only_ce_check_error(tmp_path, name):
    make, suffix = DAMAGED[name]
    data = make()
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(data)
    with pytest.raises(CeCheckError, match="damaged"):
        load_array(str(path))
    with pytest.raises(CeCheckError, match="from stdin"):
        load_array("-", stdin=io.BytesIO(data))


# --- InputSpec: the one rule for what an input argument names -----------------------------------

def test_input_spec_parse_rule(tmp_path):
    from ce_cli.io.inputs import InputSpec, Origin

    np.savez(tmp_path / "m.npz", a=np.arange(3), b=np.ones(2))
    (tmp_path / "4.5").write_text("1\n")  # a file whose name reads as a number: the file wins
    assert InputSpec.parse("-", "logits").origin is Origin.stdin
    assert InputSpec.parse("2.5", "logits").origin is Origin.file  # logits are never numbers
    loss = InputSpec.parse(" 2.50 ", "loss")
    assert (loss.origin, loss.text, loss.source) == (Origin.number, "2.50", "--loss 2.50")
    assert loss.tolerance == 0.005
    assert InputSpec.parse("4.5", "loss", base=tmp_path).origin is Origin.file
    spec = InputSpec.parse("m.npz:b", "pos_weight", base=tmp_path)
    assert spec.origin is Origin.file and spec.text == str(tmp_path / "m.npz:b")
    np.testing.assert_array_equal(spec.load(), np.ones(2))
    assert spec.is_file(tmp_path / "m.npz")
    missing = InputSpec.parse("nope.npy", "loss")  # lenient: reported missing when loaded
    with pytest.raises(CeCheckError, match="loss file 'nope.npy': no such file"):
        missing.load()
    with pytest.raises(CeCheckError, match="`loss`: 'nope.npy' is neither a file nor a number"):
        InputSpec.parse("nope.npy", "loss", strict=True)


def test_input_spec_flattens_vectors(tmp_path):
    from ce_cli.io.inputs import InputSpec

    (tmp_path / "w.csv").write_text("1,2,3\n")
    spec = InputSpec.parse(str(tmp_path / "w.csv"), "weight")
    assert spec.load().shape == (1, 3) and spec.load(vector=True).shape == (3,)
