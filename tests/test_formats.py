"""Input formats beyond .npy/.npz/CSV: .safetensors, bfloat16 .npy (ml_dtypes), and .pt/.pth.

fixtures/formats is one case that scripts/make_format_fixtures.py writes with the real libraries
(torch, safetensors, ml_dtypes); none of them is needed here. Parity: every format gives the
same report as .npy. A bfloat16 input is widened exactly to float32 and a bf16 gradient is
compared in bf16 unless --precision says otherwise. Lying .safetensors headers and .pt files
that hold anything but a tensor exit 2 with one line. The .pt round trips need torch and skip
without it; the .pt error paths also run against small stand-ins for the torch module.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ce_cli.io.bfloat16 import stored_precision, widen_bfloat16
from ce_cli.io.inputs import load_array
from tests.conftest import CE_CHECK, FIXTURES, run_script, save
from tests.test_bad_input import assert_one_line_error

D = FIXTURES / "formats"
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
DTS = ("f64", "f32", "f16", "bf16")
FORMATS = ("npy", "safetensors", pytest.param("pt", marks=needs_torch))


def names(fmt: str, logits: str = "logits", grad: str = "grad_f32",
          loss: str | None = None) -> list[str]:
    """The arguments naming the case's tensors in format `fmt`."""
    def one(name: str) -> str:
        return f"{D}/case.safetensors:{name}" if fmt == "safetensors" else f"{D}/{name}.{fmt}"

    args = ["grad", one(logits), one("labels"), "--grad", one(grad)]
    return args + (["--loss", one(loss)] if loss else [])


def report(invoke, args: list[str], code: int | None = 0) -> dict:
    result = invoke([*args, "--json"])
    assert result.exit_code == code if code is not None else result.exit_code in (0, 1), \
        result.stderr
    return json.loads(result.stdout)


def without_sources(rep: dict) -> dict:
    return {**rep, "inputs": [{k: v for k, v in i.items() if k != "source"} for i in rep["inputs"]]}


# --- parity: every format, every dtype, one report --------------------------------------------

@pytest.mark.parametrize("dt", DTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_give_the_npy_report(invoke, fmt, dt):
    """logits, labels, torch's gradient and loss in `dt`: the same report from every format,
    and it passes, compared in the gradient's precision (bf16 implied by the stored dtype)."""
    rep = report(invoke, names(fmt, grad=f"grad_{dt}", loss=f"loss_{dt}"))
    assert rep["ok"] is True
    assert rep["options"]["precision"] == dt
    by_name = {c["name"]: c for c in rep["checks"]}
    assert by_name["grad_vs_reference"]["rule"].startswith(f"{dt}:")
    assert by_name["loss_vs_reference"]["rule"].startswith(f"{dt}:")
    if fmt != "npy":
        npy = report(invoke, names("npy", grad=f"grad_{dt}", loss=f"loss_{dt}"))
        assert without_sources(rep) == without_sources(npy)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_logits_widen_exactly(invoke, fmt):
    """The logits stored as bfloat16 hold the float32 logits' values (k/16): the same report."""
    f32 = report(invoke, names(fmt, grad="grad_bf16"))
    bf16 = report(invoke, names(fmt, logits="logits_bf16", grad="grad_bf16"))
    assert without_sources(bf16) == without_sources(f32)
    assert bf16["options"]["precision"] == "bf16"  # the gradient's, not the logits'


def test_bf16_logits_do_not_imply_precision(invoke):
    rep = report(invoke, names("npy", logits="logits_bf16", grad="grad_f32"))
    assert rep["ok"] and rep["options"]["precision"] == "f32"


@pytest.mark.parametrize("fmt", FORMATS)
def test_explicit_precision_overrides_bf16(invoke, fmt):
    """--precision f32 on torch's bf16 gradient: compared as computed in f32 and rounded to its
    bf16 storage once (bf16's relative rounding, f32's floor), which torch's bf16 autograd (its
    log-softmax saved in bf16) is not: it fails."""
    rep = report(invoke, [*names(fmt, grad="grad_bf16"), "--precision", "f32"], code=1)
    assert rep["options"]["precision"] == "f32"
    grad = next(c for c in rep["checks"] if c["name"] == "grad_vs_reference")
    assert not grad["ok"] and grad["rule"].startswith("f32 stored as bf16:")
    other = report(invoke, [*names(fmt, grad="grad_bf16"), "--precision", "f16"], code=None)
    assert other["options"]["precision"] == "f16"


def test_bf16_values_saved_as_float32_are_read_as_bf16(invoke, tmp_path):
    """The same bf16 gradient saved as plain float32 (no tag; what `.float()` then `.numpy()`
    gives): every entry is a bfloat16 value, so it is compared as stored in bf16 (a note says
    so), the report of the tagged file; `--precision f32` holds it to float32's floor as there."""
    widened = load_array(str(D / "grad_bf16.npy"))
    plain = save(tmp_path, "g.npy", np.frombuffer(widened.tobytes(), np.float32).reshape(6, 10))
    args = ["grad", D / "logits.npy", D / "labels.npy", "--grad", plain, "--json"]
    result = invoke(args)
    assert result.exit_code == 0
    rep = json.loads(result.stdout)
    assert rep["options"]["precision"] == "bf16"
    assert rep["warnings"] == [f"grad file '{plain}': every entry is a bfloat16 value (held as "
                               "float32): compared as stored in bf16 (`precision` says what it "
                               "was computed in)"]
    tagged = report(invoke, names("npy", grad="grad_bf16"))
    assert rep["checks"] == tagged["checks"]
    assert invoke([*args, "--precision", "f32"]).exit_code == 1


def test_safetensors_only_tensor_and_batch_manifest(invoke, tmp_path):
    rep = report(invoke, ["grad", D / "logits.npy", D / "labels.npy", "--grad",
                          D / "grad_bf16.safetensors"])
    assert rep["ok"] and rep["options"]["precision"] == "bf16"
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text(json.dumps({
        "name": "bf16", "kind": "multiclass", "logits": f"{D}/case.safetensors:logits",
        "labels": f"{D}/case.safetensors:labels", "grad": f"{D}/grad_bf16.npy"}) + "\n")
    result = invoke(["batch", manifest])
    assert result.exit_code == 0, result.stdout + result.stderr
    line = json.loads(result.stdout)
    assert line["status"] == "pass" and line["options"]["precision"] == "bf16"


# --- loading: memory-mapped, exact widening, with or without ml_dtypes -------------------------

def test_safetensors_is_memory_mapped():
    arr = load_array(f"{D}/case.safetensors:grad_f32")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float32 and not arr.flags.writeable
    np.testing.assert_array_equal(arr, np.load(D / "grad_f32.npy"))
    assert stored_precision(arr.dtype) is None


@pytest.mark.parametrize("spec", ["grad_bf16.npy", "case.safetensors:grad_bf16",
                                  "grad_bf16.safetensors"])
def test_bf16_inputs_agree_and_are_tagged(spec):
    arr = load_array(f"{D}/{spec}")
    assert arr.dtype == np.float32 and stored_precision(arr.dtype) == "bf16"
    bits = np.load(D / "grad_bf16.npy").view(np.uint16)
    np.testing.assert_array_equal(arr.view(np.uint32), bits.astype(np.uint32) << 16)


def test_bf16_npy_without_ml_dtypes(monkeypatch, invoke):
    """The reader needs no library: with ml_dtypes unimportable the report is the same."""
    with_lib = report(invoke, names("npy", grad="grad_bf16", loss="loss_bf16"))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    without = report(invoke, names("npy", grad="grad_bf16", loss="loss_bf16"))
    assert without == with_lib and without["options"]["precision"] == "bf16"


def test_bf16_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    raw = np.load(D / "grad_bf16.npy")
    np.testing.assert_array_equal(load_array(str(D / "grad_bf16.npy")),
                                  raw.view(ml_dtypes.bfloat16).astype(np.float32))


def _bf16_value(bits: int) -> float:
    """The value of bfloat16 bits, decoded from the IEEE fields (1 sign, 8 exponent, 7 mantissa)."""
    sign = -1.0 if bits >> 15 else 1.0
    exponent, mantissa = (bits >> 7) & 0xFF, bits & 0x7F
    if exponent == 0xFF:
        return sign * np.inf if mantissa == 0 else np.nan
    if exponent == 0:
        return sign * mantissa * 2.0**-133
    return sign * (1 + mantissa / 128) * 2.0 ** (exponent - 127)


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64))
def test_widening_is_exact(bits):
    got = widen_bfloat16(np.array(bits, dtype=np.uint16)).astype(np.float64)
    want = np.array([_bf16_value(b) for b in bits])
    np.testing.assert_array_equal(got, want)  # NaN where NaN, and equal signs of zero:
    assert (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all()


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3)])
def test_widening_keeps_shape_and_tag(shape):
    out = widen_bfloat16(np.full(shape, 0x3F80, np.dtype("<u2")))  # 1.0
    assert out.shape == shape and isinstance(out, np.ndarray)
    assert stored_precision(out.dtype) == "bf16" and (out == 1.0).all()


def test_bf16_in_npz_and_stdin(invoke, tmp_path):
    raw = np.load(D / "grad_bf16.npy")
    np.savez(tmp_path / "g.npz", grad=raw)
    rep = report(invoke, ["grad", D / "logits.npy", D / "labels.npy", "--grad",
                          f"{tmp_path}/g.npz:grad"])
    assert rep["ok"] and rep["options"]["precision"] == "bf16"
    result = invoke(["grad", D / "logits.npy", D / "labels.npy", "--grad", "-", "--json"],
                    input=(D / "grad_bf16.npy").read_bytes())
    assert result.exit_code == 0 and json.loads(result.stdout)["options"]["precision"] == "bf16"


def test_other_void_dtypes_stay_refused(invoke, tmp_path):
    bad = tmp_path / "v.npy"
    np.save(bad, np.zeros((6, 10), dtype="V4"))
    result = invoke(["grad", D / "logits.npy", D / "labels.npy", "--grad", bad])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, ["not numeric"])


# --- lying .safetensors headers ---------------------------------------------------------------

def safetensors_bytes(header, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


F32x4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BAD_SAFETENSORS = {
    "too_short": (b"\x10\x00\x00", ["not a .safetensors file (3 bytes"]),
    "length_beyond_file": (safetensors_bytes({"g": F32x4}, bytes(16), header_len=1 << 40),
                           ["header length 1099511627776 bytes, but the file holds"]),
    "length_cuts_json": (safetensors_bytes({"g": F32x4}, bytes(16), header_len=10), ["not JSON"]),
    "not_json": (safetensors_bytes(b"{nope"), ["not JSON"]),
    "not_utf8": (safetensors_bytes(b"{\"\xff\": 1}"), ["not UTF-8"]),
    "not_object": (safetensors_bytes([1, 2]), ["not a JSON object"]),
    "duplicate": (safetensors_bytes(b'{"g": {}, "g": {}}'), ["duplicate key 'g'"]),
    "unknown_dtype": (safetensors_bytes({"g": {**F32x4, "dtype": "F128"}}, bytes(16)),
                      ["tensor 'g'", "unsupported dtype 'F128'"]),
    "fp8_dtype": (safetensors_bytes({"g": {**F32x4, "dtype": "F8_E4M3"}}, bytes(16)),
                  ["unsupported dtype 'F8_E4M3'"]),
    "extra_key": (safetensors_bytes({"g": {**F32x4, "strides": [2, 1]}}, bytes(16)),
                  ["exactly the keys"]),
    "negative_dim": (safetensors_bytes({"g": {**F32x4, "shape": [-2, -2]}}, bytes(16)),
                     ["shape [-2, -2]"]),
    "reversed_offsets": (safetensors_bytes({"g": {**F32x4, "data_offsets": [16, 0]}}, bytes(16)),
                         ["data_offsets [16, 0]"]),
    "span_not_shape": (safetensors_bytes({"g": {**F32x4, "data_offsets": [0, 12]}}, bytes(12)),
                       ["shape x dtype is 16 bytes but its data_offsets span 12"]),
    "bf16_span": (safetensors_bytes({"g": {**F32x4, "dtype": "BF16"}}, bytes(16)),
                  ["BF16 [2, 2]", "is 8 bytes but its data_offsets span 16"]),
    "out_of_range": (safetensors_bytes({"g": {**F32x4, "data_offsets": [8, 24]}}, bytes(16)),
                     ["at [8, 24) reaches past the end of the file (its data holds 16 bytes)"]),
    "truncated_data": (safetensors_bytes({"g": F32x4}, bytes(15)), ["reaches past the end"]),
    "overlap": (safetensors_bytes({"a": F32x4, "b": {**F32x4, "data_offsets": [8, 24]}},
                                  bytes(24)), ["tensor 'a'", "tensor 'b'", "overlap"]),
    "hole": (safetensors_bytes({"a": {**F32x4, "data_offsets": [4, 20]}}, bytes(20)),
             ["bytes [0, 4) of the data belong to no tensor"]),
    "trailing": (safetensors_bytes({"g": F32x4}, bytes(20)),
                 ["the tensors span 16 bytes but the data after the header holds 20"]),
    "metadata": (safetensors_bytes({"__metadata__": {"n": 1}, "g": F32x4}, bytes(16)),
                 ["__metadata__"]),
    "no_tensors": (safetensors_bytes({"__metadata__": {}}), ["holds 0 tensors (none)"]),
    "several": (safetensors_bytes({"a": F32x4, "b": {**F32x4, "data_offsets": [16, 32]}},
                                  bytes(32)), ["holds 2 tensors (a, b)", "FILE.safetensors:NAME"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_lying_safetensors_header(invoke, tmp_path, case):
    data, fragments = BAD_SAFETENSORS[case]
    bad = tmp_path / "g.safetensors"
    bad.write_bytes(data)
    result = invoke(["grad", D / "logits.npy", D / "labels.npy", "--grad", bad])
    line = assert_one_line_error(result.exit_code, result.stdout, result.stderr, fragments)
    assert "grad file" in line and "g.safetensors" in line


@given(shape=st.lists(st.integers(0, 1) | st.sampled_from([2**31, 2**62, 2**63, 2**64]),
                      max_size=70),
       dtype=st.sampled_from(["F32", "BF16", "U8"]))
def test_safetensors_header_shapes_numpy_refuses(tmp_path_factory, shape, dtype):
    """A header consistent with its file whose shape numpy cannot hold (over 64 dimensions, a
    zero-size tensor with sizes past int64) is an input error, never an internal one."""
    from ce_cli.errors import CeCheckError
    from ce_cli.io.safetensors import read_safetensors
    size = {"F32": 4, "BF16": 2, "U8": 1}[dtype]
    for dim in shape:
        size *= dim
    if size > 64:
        return  # the header would have to lie about its span: BAD_SAFETENSORS covers that
    path = tmp_path_factory.mktemp("st") / "g.safetensors"
    path.write_bytes(safetensors_bytes(
        {"g": {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}}, bytes(size)))
    try:
        arr = read_safetensors(path, None, "grad file")
    except CeCheckError as exc:
        assert "cannot map tensor 'g'" in str(exc)
    else:
        assert arr.shape == tuple(shape)


@pytest.mark.parametrize("case", ["length_beyond_file", "overlap", "unknown_dtype",
                                  "span_not_shape"])
def test_lying_safetensors_header_console_script(tmp_path, case):
    data, fragments = BAD_SAFETENSORS[case]
    bad = tmp_path / "g.safetensors"
    bad.write_bytes(data)
    proc = run_script(["grad", D / "logits.npy", D / "labels.npy", "--grad", bad], text=True)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, fragments)


def test_safetensors_missing_name_and_file(invoke, tmp_path):
    result = invoke(["grad", f"{D}/case.safetensors:logits", f"{D}/case.safetensors:nope"])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr,
                          ["labels file", "no tensor 'nope' (has: "])
    result = invoke(["grad", f"{tmp_path}/missing.safetensors:z", D / "labels.npy"])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, ["no such file"])


def test_zero_size_and_scalar_tensors(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(safetensors_bytes({
        "empty": {"dtype": "F64", "shape": [0, 3], "data_offsets": [0, 0]},
        "scalar": {"dtype": "BF16", "shape": [], "data_offsets": [0, 2]}}, b"\x80\x3f"))
    assert load_array(f"{path}:empty").shape == (0, 3)
    scalar = load_array(f"{path}:scalar")
    assert scalar.shape == () and scalar == 1.0 and stored_precision(scalar.dtype) == "bf16"


# --- .pt / .pth -------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("name, fragments", [
    ("dict.pt", ["holds a dict, not a tensor"]),
    ("object.pt", ["not a weights-only PyTorch file", "fractions.Fraction"]),
])
def test_pt_not_a_tensor(invoke, name, fragments):
    result = invoke(["grad", D / "logits.pt", D / "labels.pt", "--grad", D / name])
    line = assert_one_line_error(result.exit_code, result.stdout, result.stderr, fragments)
    assert "add_safe_globals" not in line  # torch's advice to loosen the check is not ours


@needs_torch
def test_pt_console_script_and_pth(tmp_path):
    pth = tmp_path / "g.pth"
    pth.write_bytes((D / "grad_bf16.pt").read_bytes())
    proc = run_script(["grad", D / "logits.pt", D / "labels.pt", "--grad", pth, "--json"],
                      text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["options"]["precision"] == "bf16"
    proc = run_script(["grad", D / "logits.pt", D / "labels.pt", "--grad", D / "object.pt"],
                      text=True)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, ["not a weights-only"])


def test_pt_without_torch(invoke, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    result = invoke(["grad", D / "logits.pt", D / "labels.npy"])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr,
                          ["logits file", "needs PyTorch, which is not installed"])


def test_pt_without_torch_console_script(tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "torch.py").write_text("raise ImportError('torch hidden for this test')\n")
    if not CE_CHECK.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run([str(CE_CHECK), "grad",
                           str(D / "logits.npy"), str(D / "labels.npy"), "--grad",
                           str(D / "grad_bf16.pt")], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(hidden), "PATH": "/usr/bin:/bin"})
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr,
                          ["grad file", "needs PyTorch, which is not installed"])


class _Tensor:
    """Stands in for torch.Tensor where torch is not installed."""


def fake_torch(load, version: str = "2.6.0") -> types.ModuleType:
    mod = types.ModuleType("torch")
    mod.__version__ = version  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.Tensor = _Tensor  # type: ignore[attr-defined]
    return mod


def _refuse(f, map_location=None, weights_only=None):
    raise pickle.UnpicklingError("Weights only load failed.\nWeightsUnpickler error: Unsupported "
                                 "global: GLOBAL os.system. Please use add_safe_globals")


def _load(f, map_location=None, weights_only=None):
    raise AssertionError("a torch too old to trust must not be asked to load")


@pytest.mark.parametrize("version, load", [
    ("1.12.1", lambda f, map_location=None: None),  # no weights_only at all
    ("2.5.1+cpu", _load),  # weights_only=True could still run code (CVE-2025-32434)
    ("nightly", _load),    # a version that cannot be read is not trusted
])
def test_pt_refuses_old_torch(invoke, monkeypatch, version, load):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(load, version))
    result = invoke(["grad", D / "logits.npy", D / "labels.npy", "--grad", D / "grad_f32.pt"])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr,
                          [f"PyTorch {version} is too old", "never unpickles", ">= 2.6"])


@pytest.mark.parametrize("load, fragments", [
    (_refuse, ["not a weights-only PyTorch file (Unsupported global: GLOBAL os.system)"]),
    (lambda f, map_location=None, weights_only=None: [1.0, 2.0], ["holds a list, not a tensor"]),
    (lambda f, map_location=None, weights_only=None: {"g": _Tensor()}, ["holds a dict"]),
])
def test_pt_guards_with_a_stand_in_torch(invoke, monkeypatch, load, fragments):
    """The refusals do not depend on a real torch: the restricted unpickler's refusal on one
    line, and anything but a tensor."""
    monkeypatch.setitem(sys.modules, "torch", fake_torch(load))
    result = invoke(["grad", D / "logits.npy", D / "labels.npy", "--grad", D / "grad_f32.pt"])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, ["grad file", *fragments])


def test_pt_weights_only_is_always_asked(invoke, monkeypatch):
    seen: dict = {}

    def load(f, map_location=None, weights_only=None, mmap=None):
        seen.update(weights_only=weights_only, map_location=map_location, mmap=mmap)
        return "not a tensor"

    monkeypatch.setitem(sys.modules, "torch", fake_torch(load))
    invoke(["grad", D / "logits.pt", D / "labels.npy"])
    assert seen == {"weights_only": True, "map_location": "cpu", "mmap": True}
