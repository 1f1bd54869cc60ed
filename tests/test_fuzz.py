"""Fuzzing every loader, the manifest parser and the CLI entry points (issue #17).

Each example runs the installed `ce-check` in a child process under resource limits (address
space, CPU seconds) and asserts only the contract: exit 0, 1 or 2; on exit 2 exactly one stderr
line `ce-check: error: ...`; never a traceback, a signal death or exit 3. The budget is small in
the normal run; `CE_CHECK_FUZZ_EXAMPLES=N` (or `python bench/fuzz.py`) runs a long one.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CE_CHECK, npy_bytes

EXAMPLES = int(os.environ.get("CE_CHECK_FUZZ_EXAMPLES", "4"))
MEMORY = 2 << 30   # address space of the child
CPU_SECONDS = 60   # CPU time of the child
WALL_SECONDS = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("CE_CHECK_FUZZ_EXAMPLES"),
                suppress_health_check=list(HealthCheck))


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))


def run(args: list, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    env.pop("CE_CHECK_DEBUG", None)
    proc = subprocess.run([CE_CHECK, *map(str, args)], input=stdin, capture_output=True, cwd=cwd,
                          timeout=WALL_SECONDS, preexec_fn=_limits, env=env)
    assert_contract(proc, summary=args[0] == "batch")
    return proc


def assert_contract(proc: subprocess.CompletedProcess, summary: bool = False) -> None:
    """Exit 0/1/2, no traceback; exit 2 is one `ce-check: error:` line (for `batch`, unless the
    cases ran: then their errors are in the summary on stderr, as documented)."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode in (0, 1, 2), (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if summary and not err.startswith("ce-check: error: "):
        return
    if proc.returncode == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ce-check: error: "), err[-2000:]


# --- inputs --------------------------------------------------------------------------------

def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


arrays = st.builds(
    lambda rows, cols, dtype, seed: np.random.default_rng(seed).standard_normal((rows, cols)).astype(dtype),
    st.integers(0, 6), st.integers(0, 6), st.sampled_from(["<f8", "<f4", "<f2", "<i8", ">f8", "|u1"]),
    st.integers(0, 1000))
edits = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6)
cuts = st.none() | st.integers(0, 400)


def npz_bytes(arr: np.ndarray, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            zf.writestr(f"{name}.npy", npy_bytes(arr))
    return buf.getvalue()


csv_text = st.lists(st.lists(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**25, 10**25).map(str),
    st.text(max_size=6)), min_size=0, max_size=5), max_size=6).map(
    lambda rows: "\n".join(",".join(r) for r in rows))


def labels_file(tmp: Path, rows: int = 4, classes: int = 5) -> Path:
    path = tmp / "y.npy"
    np.save(path, np.arange(rows) % max(classes, 1))
    return path


@FUZZ
@given(arr=arrays, e=edits, cut=cuts, via_stdin=st.booleans())
def test_npy_loader(tmp_path_factory, arr, e, cut, via_stdin):
    tmp = tmp_path_factory.mktemp("npy")
    data = mutate(npy_bytes(arr), e, cut)
    (tmp / "z.npy").write_bytes(data)
    y = labels_file(tmp, max(arr.shape[0], 1), max(arr.shape[1], 1))
    if via_stdin:
        run(["grad", "-", y], tmp, stdin=data)
    else:
        run(["grad", "z.npy", y, "--grad", "z.npy"], tmp)


# what a command line and a zip member's name can carry: no NUL, no lone surrogate (neither the
# OS nor zipfile takes them)
ARGV_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")


@FUZZ
@given(arr=arrays, names=st.lists(st.text(ARGV_CHARS, min_size=1, max_size=8), min_size=0, max_size=4),
       e=edits, cut=cuts, key=st.none() | st.text(ARGV_CHARS, max_size=8))
def test_npz_loader(tmp_path_factory, arr, names, e, cut, key):
    tmp = tmp_path_factory.mktemp("npz")
    (tmp / "z.npz").write_bytes(mutate(npz_bytes(arr, names), e, cut))
    spec = "z.npz" if key is None else f"z.npz:{key}"
    run(["grad", spec, labels_file(tmp)], tmp)


@FUZZ
@given(text=csv_text, bom=st.booleans(), crlf=st.booleans(), via_stdin=st.booleans())
def test_csv_loader(tmp_path_factory, text, bom, crlf, via_stdin):
    tmp = tmp_path_factory.mktemp("csv")
    data = (("\ufeff" if bom else "") + (text.replace("\n", "\r\n") if crlf else text)).encode(
        "utf-8", "surrogatepass")
    (tmp / "z.csv").write_bytes(data)
    if via_stdin:
        run(["binary", "-", "z.csv"], tmp, stdin=data)
    else:
        run(["grad", "z.csv", labels_file(tmp)], tmp)


# safetensors headers that name what numpy cannot hold: wild shapes and offsets, and the data
# the offsets claim (zero-size tensors make no file access: their shape alone reaches numpy)
st_dims = st.integers(0, 2) | st.sampled_from([2**31, 2**62, 2**63, 2**64, -1])
st_specs = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8"]),
    "shape": st.lists(st_dims, max_size=3) | st.lists(st.integers(0, 1), min_size=63, max_size=66),
    "data_offsets": st.tuples(st.integers(0, 4), st.integers(0, 32)).map(list)})


ST_SIZES = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2}


@FUZZ
@given(spec=st_specs, data=st.integers(0, 40), name=st.text(max_size=6), fit=st.booleans())
def test_safetensors_loader(tmp_path_factory, spec, data, name, fit):
    tmp = tmp_path_factory.mktemp("safetensors")
    span = ST_SIZES.get(spec["dtype"], 1)
    for dim in spec["shape"]:
        span *= dim
    if fit and 0 <= span <= 64:  # offsets and data that agree with the shape
        spec["data_offsets"], data = [0, span], span
    raw = json.dumps({name: spec}).encode()
    (tmp / "g.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data))
    run(["grad", "g.safetensors", labels_file(tmp)], tmp)


# --- the manifest ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
keys = st.sampled_from(["name", "kind", "logits", "labels", "grad", "loss", "weight", "reduction",
                        "fd", "samples", "seed", "rtol", "ignore_index", "pos_weight", "two_class",
                        "bogus"])
case_lines = st.dictionaries(keys, json_values | st.sampled_from(
    ["z.npy", "y.npy", "multiclass", "binary", "mean", "none", "full", "-", "z.npz:a", ""]),
    max_size=8).map(json.dumps)


@FUZZ
@given(lines=st.lists(case_lines | st.text(max_size=30), min_size=0, max_size=5),
       jobs=st.sampled_from(["1", "2"]), fmt=st.sampled_from(["jsonl", "table"]))
def test_manifest_parser(tmp_path_factory, lines, jobs, fmt):
    tmp = tmp_path_factory.mktemp("manifest")
    np.save(tmp / "z.npy", np.random.default_rng(0).standard_normal((4, 5)))
    labels_file(tmp)
    (tmp / "m.jsonl").write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    run(["batch", "m.jsonl", "-j", jobs, "-f", fmt, "--junit-xml", "r.xml"], tmp)


# --- the entry points' options --------------------------------------------------------------

option_values = st.sampled_from(["0", "-1", "1e308", "nan", "inf", "", "[/x]", "-", "z.npy",
                                 "1", "full", "none", "f16", "bf16", "9" * 40])


@FUZZ
@given(command=st.sampled_from(["grad", "binary", "explain", "stress"]),
       opts=st.lists(st.tuples(st.sampled_from([
           "--loss", "--reduction", "--rtol", "--atol", "--fd", "--samples", "--seed", "--worst",
           "--precision", "--label-smoothing", "--class-axis", "--ignore-index", "--weight",
           "--dtypes", "--scales", "--timeout", "--label", "--logits", "--out-grad"]),
           option_values), max_size=3))
def test_cli_entry_points(tmp_path_factory, command, opts):
    tmp = tmp_path_factory.mktemp("cli")
    np.save(tmp / "z.npy", np.random.default_rng(0).standard_normal((4, 5)))
    y = labels_file(tmp)
    args = [command] + (["z.npy", y] if command in ("grad", "binary") else [])
    if command == "stress":
        args += ["--scales", "1", "--scenarios", "spread"]
    for flag, value in opts:
        args += [flag, value]
    run(args, tmp)
