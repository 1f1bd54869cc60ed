"""The compiled kernel built by another compiler or for another CPU gives the host build's bits.

Real checks (check_grad / check_binary over the options the kernel serves) run here on the host's
GCC build, target by target, and every kernel call is recorded: its arguments, every array it
reads and writes, before and after (tests/kernel_replay.c's record format). The same kernel
source, built

- for AArch64 by `aarch64-linux-gnu-gcc` and run under `qemu-aarch64`: its NEON target (2
  lanes, as SSE2) and its scalar target replay the calls recorded on SSE2 and scalar;
- for x86-64 by `clang` (which builds SSE2 and scalar: the AVX targets need GCC's target
  pragmas), the same two;

and must write every output array bit for bit as the host did: same exp, log1p, tanh, sums,
verdict counts and worst ratios on every target the project ships for these CPUs. The tools are
Debian's `gcc-aarch64-linux-gnu`, `qemu-user` and `clang`; without them the tests skip, except
under CI, whose run installs them (.ci/run) - there a missing tool is a failure.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ce_cli
from ce_cli.kernels import compiled

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "ce_cli" / "kernels"
SOURCES = [Path(__file__).with_name("kernel_replay.c"),
           *sorted(KERNELS.glob("_fused*.c"))]
FLAGS = ["-O3", "-ffp-contract=off", "-Wno-psabi", "-pthread"]
IN_CI = bool(os.environ.get("CI"))
BLOCK = 128  # _fused.h
FIELDS = ("z", "g", "alpha", "beta", "ys", "active", "w", "loss", "row_max", "log1p_s1",
          "ratio_max", "max_abs", "max_rel", "mismatches", "nonfinite", "out_ref", "out_floor",
          "out_tol", "out_ratio", "work", "q", "q_total", "y_bin", "w_bin", "pos_w", "out_items",
          "out_item_w", "total_w", "row_min", "s_w", "row_zabs", "row_qabs", "row_qsum",
          "row_mag", "row_g1", "pert_col", "pert_val", "pick_cols", "pick_g",
          "pick_fl", "step_cols", "step_vals", "step_loss", "flushed")  # kernel_replay.c's PTR_FIELDS
ROWS_KINDS = {"__call__": 0, "bce": 1, "scan": 2}


def _blob_bytes(a, field: str) -> int:
    """The bytes the kernel may read or write through pointer `field` of ce_args `a`."""
    R, C = a.n_rows, a.n_cols
    width = {"z": a.z_is_f32, "g": a.g_is_f32, "q": a.q_is_f32, "y_bin": a.y_is_f32}
    if field in width:
        return R * C * (4 if width[field] else 8)
    if field in ("out_ref", "out_floor", "out_tol", "out_ratio", "w_bin", "out_items", "out_item_w"):
        return 8 * R * C
    if field in ("w", "pos_w"):
        return 8 * C
    if field == "work":
        return 8 * (4 * C + 8 + 5 * (C // BLOCK + 1))
    if field in ("pick_cols", "pick_g", "pick_fl"):
        return 8 * R * a.n_picks
    if field in ("step_cols", "step_vals", "step_loss"):
        return 8 * R * a.n_steps
    return R if field == "active" else 8 * R


def _snapshot(a) -> list[bytes | None]:
    out = []
    for field in FIELDS:
        ptr = getattr(a, field)
        out.append(None if not ptr else ctypes.string_at(ptr, _blob_bytes(a, field)))
    return out


class Recorder:
    """Every kernel call made while it is installed: (kind, ce_args bytes, arrays before, rc,
    arrays after)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes, list, int, list]] = []

    def install(self, monkeypatch) -> None:
        for method, kind in ROWS_KINDS.items():
            original = getattr(compiled._Entry, method)

            def recorded(entry, ref, _original=original, _kind=kind):
                a = ref._obj
                a.n_threads = 1
                before = _snapshot(a)
                rc = _original(entry, ref)
                raw = ctypes.string_at(ctypes.addressof(a), ctypes.sizeof(a))
                self.calls.append((_kind, raw, before, int(rc), _snapshot(a)))
                return rc

            monkeypatch.setattr(compiled._Entry, method, recorded)

    def records(self) -> bytes:
        parts = []
        for kind, raw, before, _rc, _after in self.calls:
            parts.append(struct.pack("<qq", kind, len(raw)) + raw)
            for blob in before:
                parts.append(struct.pack("<q", -1) if blob is None
                             else struct.pack("<q", len(blob)) + blob)
        return b"".join(parts)


def _checks() -> None:
    """Real checks over what the kernel serves, on small batches (qemu is ~50x slower)."""
    rng = np.random.default_rng(7)
    for scale in (1.0, 30.0, 3000.0):
        z = (rng.standard_normal((24, 300)) * scale).astype(np.float32)
        y = rng.integers(0, 300, 24)
        y[3] = -100
        z[5, :40] = -np.inf
        g = rng.standard_normal(z.shape).astype(np.float32) * 1e-3
        for opts in ({}, {"label_smoothing": 0.1}, {"label_smoothing": 0.1, "smoothing_form": "others"},
                     {"z_loss": 1e-4}, {"softcap": 30.0}, {"logit_scale": 0.5, "z_loss": 1e-3},
                     {"reduction": "sum"}):
            ce_cli.check_grad(z, y, grad=g, fd="sample", samples=16, **opts)
        ce_cli.check_grad(z.astype(np.float64), y, grad=g, weight=rng.uniform(0.5, 2, 300),
                          sample_weight=rng.uniform(0, 2, 24), fd="sample", samples=16)
        q = rng.dirichlet(np.ones(300), 24).astype(np.float32)
        ce_cli.check_grad(z, q, grad=g, fd="sample", samples=16)
        ce_cli.check_grad(z, q.astype(np.float64), grad=g, z_loss=1e-4, fd="sample", samples=16)
        labels = (rng.uniform(size=z.shape) < 0.1).astype(np.float32)
        x = np.where(np.isinf(z), 0.0, z).astype(np.float32)
        for opts in ({}, {"pos_weight": rng.uniform(0.5, 3, 300)}, {"softcap": 20.0},
                     {"label_smoothing": 0.05, "logit_scale": 2.0}):
            ce_cli.check_binary(x, labels, grad=g, fd="sample", samples=16, **opts)
        ce_cli.check_binary(x, rng.uniform(size=z.shape), grad=g, weight=rng.uniform(0, 2, z.shape),
                            fd="sample", samples=16)


def _func_records() -> tuple[bytes, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """exp/log1p and the soft-cap's tanh/sech^2 on points from 1e-300 to past the overflows."""
    rng = np.random.default_rng(3)
    x = np.concatenate([-(10.0 ** rng.uniform(-300, 3, 3000)), rng.uniform(-750, 0, 3000),
                        [0.0, -0.0, -745.2, -np.inf]])
    u = np.concatenate([10.0 ** rng.uniform(-300, 300, 3000), rng.uniform(0, 25, 3000), [0.0]])
    u *= rng.choice([-1.0, 1.0], u.size)
    return x, u * 2.0


def _host_funcs(target: str, x: np.ndarray, xc: np.ndarray) -> list[np.ndarray]:
    lib = compiled._library()
    unit, cap = lib.ce_unit_funcs_on, lib.ce_cap_funcs_on
    unit.argtypes = [ctypes.c_char_p] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    cap.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p,
                    ctypes.c_void_p, ctypes.c_int64]
    e, l1, z, dz = (np.empty_like(v) for v in (x, x, xc, xc))
    assert unit(target.encode(), x.ctypes.data, e.ctypes.data, l1.ctypes.data, x.size) == 0
    assert cap(target.encode(), xc.ctypes.data, 2.0, z.ctypes.data, dz.ctypes.data, xc.size) == 0
    return [e, l1, z, dz]


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        message = f"needs {', '.join(missing)} (Debian: gcc-aarch64-linux-gnu, qemu-user, clang)"
        if IN_CI:
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)


@pytest.fixture(scope="module")
def recorded():
    """{host target: (records, the calls, function outputs)}, SSE2 and scalar (the functions:
    exp/log1p, the soft-cap's, and float16 widening)."""
    lib = compiled._library()
    if lib is None or not all(lib.ce_target_runs(t) for t in (b"sse2", b"scalar")):
        if IN_CI:
            pytest.fail("the compiled kernel with its sse2 and scalar targets is not built")
        pytest.skip("needs the compiled kernel (sse2, scalar) on an x86-64 host")
    out = {}
    x, xc = _func_records()
    half = np.arange(1 << 16, dtype=np.uint16)  # every binary16 value
    funcs = (struct.pack("<qq", 3, x.size) + x.tobytes()
             + struct.pack("<qqd", 4, xc.size, 2.0) + xc.tobytes()
             + struct.pack("<qq", 5, half.size) + half.tobytes())
    with compiled.use_threads(2):
        wide = compiled._as_kernel_rows(half.view(np.float16))
    for target in ("sse2", "scalar"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CE_CHECK_TARGET", target)
            mp.setenv("CE_CHECK_THREADS", "1")
            mp.delenv("CE_CHECK_FUSED", raising=False)
            rec = Recorder()
            rec.install(mp)
            _checks()
        assert len(rec.calls) > 100 and {k for k, *_ in rec.calls} == {0, 1, 2}
        out[target] = (rec.records() + funcs, rec.calls, [*_host_funcs(target, x, xc), wide])
    return out


def _build(compiler: list[str], exe: Path) -> None:
    result = subprocess.run([*compiler, *FLAGS, *map(str, SOURCES), "-o", str(exe), "-lm"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _replay(run: list[str], target: str, records: bytes, tmp: Path) -> bytes:
    (tmp / "records.bin").write_bytes(records)
    result = subprocess.run([*run, target, str(tmp / "records.bin"), str(tmp / "out.bin")],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    return (tmp / "out.bin").read_bytes()


def _ulps(a: bytes, b: bytes) -> str:
    x, y = np.frombuffer(a, dtype=np.float64), np.frombuffer(b, dtype=np.float64)
    bad = ~((x == y) | (np.isnan(x) & np.isnan(y)))
    i = int(np.flatnonzero(bad)[0])
    return f"{int(bad.sum())} entries differ, first at {i}: {x[i]!r} vs {y[i]!r}"


def _compare(out: bytes, calls: list, funcs: list[np.ndarray], where: str) -> None:
    """The replayed outputs against the host's, call by call, array by array, bit for bit."""
    pos = 0
    for n, (kind, _raw, before, rc, after) in enumerate(calls):
        (got_rc,) = struct.unpack_from("<q", out, pos)
        pos += 8
        assert got_rc == rc, f"{where}: call {n} (kind {kind}) returned {got_rc}, host {rc}"
        for field, blob, host in zip(FIELDS, before, after):
            if blob is None:
                continue
            got = out[pos:pos + len(blob)]
            pos += len(blob)
            if field != "work" and got != host:
                pytest.fail(f"{where}: call {n} (kind {kind}) `{field}`: {_ulps(got, host)}"
                            if len(got) % 8 == 0 else f"{where}: call {n} `{field}` differs")
    for k in (0, 2):
        (got_rc,) = struct.unpack_from("<q", out, pos)
        pos += 8
        assert got_rc == 0, f"{where}: the functions' target is not built in"
        for host in funcs[k:k + 2]:
            got = out[pos:pos + host.nbytes]
            pos += host.nbytes
            assert got == host.tobytes(), f"{where}: {_ulps(got, host.tobytes())}"
    wide = funcs[4].tobytes()  # ce_widen_f16: float16 rows as float32
    assert out[pos:pos + len(wide)] == wide, f"{where}: float16 widening differs"
    pos += len(wide)
    assert pos == len(out)


@pytest.mark.parametrize("target, host", [("neon", "sse2"), ("scalar", "scalar")])
def test_aarch64_build_under_qemu_gives_the_host_bits(recorded, tmp_path_factory, target, host):
    _need("aarch64-linux-gnu-gcc", "qemu-aarch64")
    tmp = tmp_path_factory.mktemp(f"arm-{target}")
    exe = tmp_path_factory.getbasetemp() / "kernel_replay_aarch64"
    if not exe.exists():
        _build(["aarch64-linux-gnu-gcc", "-static"], exe)
    records, calls, funcs = recorded[host]
    _compare(_replay(["qemu-aarch64", str(exe)], target, records, tmp), calls, funcs,
             f"AArch64 {target}")


@pytest.mark.parametrize("target", ["sse2", "scalar"])
def test_clang_build_gives_the_gcc_bits(recorded, tmp_path_factory, target):
    _need("clang")
    tmp = tmp_path_factory.mktemp(f"clang-{target}")
    exe = tmp_path_factory.getbasetemp() / "kernel_replay_clang"
    if not exe.exists():
        _build(["clang"], exe)
    records, calls, funcs = recorded[target]
    _compare(_replay([str(exe)], target, records, tmp), calls, funcs, f"clang {target}")


def _host_output(calls: list, funcs: list[np.ndarray]) -> bytearray:
    """The output file a replay that reproduced the host exactly would write."""
    out = bytearray()
    for _kind, _raw, before, rc, after in calls:
        out += struct.pack("<q", rc)
        out += b"".join(a for b, a in zip(before, after) if b is not None)
    for k in (0, 2):
        out += struct.pack("<q", 0) + funcs[k].tobytes() + funcs[k + 1].tobytes()
    return out + funcs[4].tobytes()


def test_the_comparison_sees_one_flipped_bit(recorded):
    """The host's own outputs pass; the lowest bit of one reference gradient entry flipped, one
    worst ratio, or one widened float16, fails naming the array."""
    _records, calls, funcs = recorded["sse2"]
    exact = _host_output(calls, funcs)
    _compare(bytes(exact), calls, funcs, "host")
    n = next(i for i, c in enumerate(calls)
             if all(c[2][FIELDS.index(f)] is not None for f in ("out_ref", "ratio_max")))
    start = sum(8 + sum(len(b) for b in c[2] if b is not None) for c in calls[:n]) + 8
    for field in ("out_ref", "ratio_max"):
        k = FIELDS.index(field)
        pos = start + sum(len(b) for b in calls[n][2][:k] if b is not None)
        flipped = bytearray(exact)
        flipped[pos] ^= 1
        with pytest.raises(pytest.fail.Exception, match=f"`{field}`"):
            _compare(bytes(flipped), calls, funcs, "flipped")
    flipped = bytearray(exact)
    flipped[-2] ^= 1  # a NaN payload bit of the last float16 widened
    with pytest.raises(AssertionError, match="float16 widening"):
        _compare(bytes(flipped), calls, funcs, "flipped")
