"""Benchmark `ce-check grad` end to end, against PyTorch, and its finite differences.

How to run (from a checkout, with ce-check installed in the current Python):

    pip install .                 # or: pip install -e .
    pip install torch==2.13.0     # optional: the PyTorch baseline and gradcheck comparison
    python bench/run.py           # full size: 4096 x 32000 float32 logits (about 1.6 GB of .npy)
    python bench/run.py --quick   # smoke run with small sizes
    python bench/run.py --help    # all options (sizes, --repeat, --workdir, --keep, --json-out)
    python bench/run.py --kernels avx512,avx2,scalar,numpy --threads 1,2   # section 1 per kernel
    python bench/run.py --reread  # inputs read back from disk, as a CI job's are, not just written
    python bench/run.py --kernels avx2,numpy --threads 1,2 --as-cpu avx2   # as on an AVX2-only CPU

Without torch the PyTorch parts are skipped with a message; everything else still runs. Linux
or macOS only (per-process peak RSS comes from os.wait4). Every thread pool (OpenMP, OpenBLAS,
MKL, torch, the compiled kernel's CE_CHECK_THREADS) is pinned to one thread, in this process and
in the ce-check child, so the comparison with PyTorch is one core against one core; --kernels
with --threads times the compiled kernel's targets and thread counts against that baseline.

What is measured (a table on stdout; the raw numbers with --json-out FILE):

1. End to end: float32 logits (N, C) ~ 2*N(0, 1), int64 labels and a correct float32 gradient
   (PyTorch's F.cross_entropy backward, or numpy in float32 without torch) saved as .npy, then
   `ce-check grad logits.npy labels.npy --grad grad.npy --json` as a subprocess: wall time (best
   and median of --repeat), the child's peak RSS, exit code 0 and `"ok": true`. Memory target:
   peak RSS <= 1.2 * (logits + labels + grad bytes) + 256 MiB. The child is started through a tiny
   wrapper process, because on Linux a child forked from this (large) process inherits its
   peak RSS (exec keeps the old address space's high-water mark).
2. PyTorch baseline: float64 forward + backward of F.cross_entropy on the same logits (upcast
   excluded), one thread (with --kernels: each --threads count), best of --repeat, run by
   --torch-python as a subprocess (bench/torch_baseline.py, shared with bench/cases.py).
   Target: ce-check time / torch time <= 0.5.
3. Finite differences on --fd-n x --fd-c float64 logits (default 256 x 500): in-process
   `ce_cli.check_grad(..., fd="full")` against `torch.autograd.gradcheck(fast_mode=False)` on
   `F.cross_entropy(z, y)`. gradcheck perturbs every entry and runs two full forwards per
   entry, so its cost is linear in the number of perturbed entries at a fixed batch. It is
   first timed with only the first --gc-rows rows perturbed (the forward still covers the whole
   batch) and scaled by N / rows; when that estimate is within --gradcheck-budget seconds the
   full gradcheck is timed instead. The table says which. Errors: ce-check's fd_vs_reference
   max |fd - reference|, and gradcheck's max |numerical - analytical| over the first --gc-rows
   rows, recomputed here exactly as gradcheck does it (central differences, eps 1e-6, on the
   batch loss). Target: speed-up >= 20x.
4. Corruption: the gradient with entry (1234, 23456) multiplied by 1.01 (scaled into range for
   smaller sizes); ce-check must fail and name that entry first in grad_vs_reference.

The exit code is 1 when a correctness check fails (1 or 4, or a gradcheck failure), else 0;
missed performance targets are reported, not turned into failures.
"""

from __future__ import annotations

import os

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for _var in THREAD_VARS:  # before numpy / torch load their thread pools
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import ce_cli  # noqa: E402
from torch_baseline import (AS_CPU_HELP, AS_CPU_MARK, TORCH_PYTHON_HELP, as_cpu, input_bytes,  # noqa: E402
                           kernel_env, rss_budget, run_torch)

MB = 1 << 20  # MiB: sizes and RSS are reported in MiB
RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
CORRUPT_AT = (1234, 23456)
CORRUPT_FACTOR = 1.01
GRADCHECK_EPS = 1e-6
GENERATED = ("logits.npy", "labels.npy", "grad.npy", "grad_bad.npy")

# Runs argv[3:] with stdout/stderr to the files argv[1], argv[2]; prints its wall time, peak RSS
# and exit status. Being small, it does not lend the child a large inherited RSS high-water mark.
WRAPPER = """\
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(sys.argv[3:], stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
proc.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"wall": wall, "maxrss": usage.ru_maxrss, "returncode": proc.returncode}))
"""


# ----------------------------------------------------------------------------- options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark ce-check grad: end-to-end time and memory, a PyTorch float64 "
                    "baseline, finite differences vs torch.autograd.gradcheck, and a corruption test.")
    p.add_argument("--n", type=int, default=4096, help="rows (batch size) of the logits (%(default)s)")
    p.add_argument("--c", type=int, default=32000, help="classes (%(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs; best and median are reported (%(default)s)")
    p.add_argument("--workdir", help="where the .npy inputs go (default: a new temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the generated .npy files")
    p.add_argument("--reread", action="store_true",
                   help="time the inputs as files read back from disk, not as just written (Linux)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --n 256 --c 1000 --fd-n 64 --fd-c 100 --repeat 1")
    p.add_argument("--json-out", metavar="FILE", help="also write all results as JSON to FILE")
    p.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    p.add_argument("--fd-n", type=int, default=256,
                   help="rows of the finite-difference problem (%(default)s)")
    p.add_argument("--fd-c", type=int, default=500,
                   help="classes of the finite-difference problem (%(default)s)")
    p.add_argument("--gc-rows", type=int, default=16,
                   help="rows perturbed in the partial gradcheck and in its error measurement "
                        "(%(default)s)")
    p.add_argument("--gradcheck-budget", type=float, default=120.0,
                   help="run the full gradcheck when its estimate is within this many seconds "
                        "(%(default)s)")
    p.add_argument("--no-torch", action="store_true", help="behave as if torch were not installed")
    p.add_argument("--torch-python", default=sys.executable, help=TORCH_PYTHON_HELP)
    p.add_argument("--kernels", metavar="LIST",
                   help="comma-separated compiled-kernel targets (CE_CHECK_TARGET: avx512, avx2, sse2, "
                        "neon, scalar) and/or numpy (CE_CHECK_FUSED=0), or all (every target this CPU "
                        "runs, and numpy): time section 1 for each, "
                        "at each --threads, against the torch baseline; sections 3 and 4 are skipped")
    p.add_argument("--threads", metavar="LIST", default="1",
                   help="comma-separated kernel thread counts (CE_CHECK_THREADS) for --kernels "
                        "(%(default)s; everything else stays on one thread)")
    p.add_argument("--as-cpu", choices=["avx2"], help=AS_CPU_HELP)
    args = p.parse_args(argv)
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()] if args.kernels else []
    as_cpu(args.as_cpu, args.kernels)
    if "all" in args.kernels:  # every target this CPU runs, then the numpy kernel
        from ce_cli.kernels.compiled import targets
        args.kernels = [*(t for t in targets() if not (args.as_cpu and t == "avx512")), "numpy"]
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error("--threads takes comma-separated integers")
    if args.quick:
        args.n, args.c, args.fd_n, args.fd_c, args.repeat = 256, 1000, 64, 100, 1
    for name in ("n", "c", "repeat", "fd_n", "fd_c", "gc_rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def import_torch(disabled: bool):
    """torch, or None (with the reason) when it is not importable or disabled."""
    if disabled:
        return None, "disabled by --no-torch"
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not importable ({exc.name or exc}); pip install torch==2.13.0"
    torch.set_num_threads(1)
    return torch, ""


# ----------------------------------------------------------------------------- helpers


@dataclass
class Timing:
    runs: list[float]

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def as_dict(self) -> dict:
        return {"best_s": self.best, "median_s": self.median, "runs_s": self.runs}


@dataclass
class Table:
    """Rows of (section, metric, value, target, status) printed as plain aligned text."""

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def add(self, section: str, metric: str, value: str, target: str = "", status: str = "") -> None:
        self.rows.append((section, metric, value, target, status))

    def render(self) -> str:
        head = ("section", "metric", "value", "target", "status")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(5)]
        fmt = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in self.rows])


def secs(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.1f} ms"


def status(ok: bool) -> str:
    return "met" if ok else "MISSED"


def time_calls(fn, repeat: int) -> Timing:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(runs)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def numpy_grad_f32(logits: np.ndarray, labels: np.ndarray, rows: int = 256) -> np.ndarray:
    """Gradient of the mean cross-entropy, in float32, row chunk by row chunk."""
    n = logits.shape[0]
    grad = np.empty_like(logits, dtype=np.float32)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        z = logits[s:e]
        a = np.exp(z - z.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        a[np.arange(e - s), labels[s:e]] -= np.float32(1)
        a /= np.float32(n)
        grad[s:e] = a
    return grad


def torch_grad_f32(torch, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = torch.from_numpy(logits).requires_grad_(True)
    torch.nn.functional.cross_entropy(z, torch.from_numpy(labels)).backward()
    return z.grad.numpy()


def make_inputs(workdir: Path, n: int, c: int, seed: int, torch) -> tuple[dict[str, Path], str]:
    """Write logits.npy, labels.npy and grad.npy; return their paths and how grad was made."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c), dtype=np.float32)
    logits *= np.float32(2)
    labels = rng.integers(0, c, size=n, dtype=np.int64)
    if torch is not None:
        grad, source = torch_grad_f32(torch, logits, labels), "torch F.cross_entropy float32"
    else:
        grad, source = numpy_grad_f32(logits, labels), "numpy float32"
    paths = {name: workdir / f"{name}.npy" for name in ("logits", "labels", "grad")}
    for name, arr in (("logits", logits), ("labels", labels), ("grad", grad)):
        np.save(paths[name], arr)
    return paths, source


def reread_inputs(cmd, paths: dict[str, Path], workdir: Path) -> None:
    """Leave the inputs in the page cache as a file read from disk is, not as one just written
    (which Linux may hold in 2 MB folios, mapped 2 MB at a time): written out, dropped from the
    cache, then read once by an untimed ce-check run."""
    if not hasattr(os, "posix_fadvise"):
        log("--reread: no posix_fadvise here; the inputs stay as written")
        return
    for path in paths.values():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    run = ce_check_grad(cmd, paths["logits"], paths["labels"], paths["grad"], workdir)
    log(f"--reread: read back from disk by ce-check in {run.wall:.2f} s (untimed)")


def corrupt_position(n: int, c: int) -> tuple[int, int]:
    """(1234, 23456) when it fits, else the same relative position in the smaller array."""
    r, k = CORRUPT_AT
    row = r if r < n else r * n // 4096
    col = k if k < c else k * c // 32000
    return min(row, n - 1), min(col, c - 1)


# ----------------------------------------------------------------------------- child runs


@dataclass
class ChildRun:
    wall: float
    maxrss: int          # bytes
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> dict | None:
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError:
            return None


def ce_check_command() -> list[str]:
    """The ce-check console script next to this Python, else `python -m ce_cli`."""
    script = Path(sys.executable).parent / "ce-check"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "ce_cli"]


def child_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with every thread pool, the compiled kernel's too (CE_CHECK_THREADS),
    pinned to one thread, then `overrides` (a kernel target or thread count)."""
    env = dict(os.environ)
    env.update({var: "1" for var in (*THREAD_VARS, "CE_CHECK_THREADS")})
    env.update(overrides or {})
    return env


def run_child(cmd: list[str], workdir: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run cmd through WRAPPER: its own wall time and peak RSS, not this process's."""
    out, err = workdir / "child.stdout", workdir / "child.stderr"
    try:
        res = subprocess.run([sys.executable, "-c", WRAPPER, str(out), str(err), *cmd],
                             capture_output=True, text=True, env=child_env(env))
        if res.returncode != 0:
            raise RuntimeError(f"could not run {cmd}: {res.stderr.strip()}")
        info = json.loads(res.stdout)
        return ChildRun(info["wall"], info["maxrss"] * RSS_UNIT, info["returncode"],
                        out.read_text(), err.read_text())
    finally:
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)


def ce_check_grad(cmd, logits: Path, labels: Path, grad: Path, workdir: Path,
                  env: dict[str, str] | None = None) -> ChildRun:
    return run_child([*cmd, "grad", str(logits), str(labels), "--grad", str(grad), "--json"], workdir,
                     env)


def find_check(report: dict | None, name: str) -> dict | None:
    for check in (report or {}).get("checks", []):
        if check["name"] == name:
            return check
    return None


# ----------------------------------------------------------------------------- 1. end to end


def bench_end_to_end(cmd, paths, workdir: Path, repeat: int, env: dict[str, str] | None = None) -> dict:
    runs = []
    for i in range(repeat):
        run = ce_check_grad(cmd, paths["logits"], paths["labels"], paths["grad"], workdir, env)
        log(f"ce-check run {i + 1}/{repeat}: {run.wall:.2f} s, peak RSS {run.maxrss / MB:.0f} MiB, "
            f"exit {run.returncode}")
        runs.append(run)
    reports = [r.report() for r in runs]
    correct = all(r.returncode == 0 and rep is not None and rep.get("ok") is True
                  for r, rep in zip(runs, reports))
    budget = rss_budget(paths)
    peak = max(r.maxrss for r in runs)
    if not correct:
        bad = next(r for r, rep in zip(runs, reports) if r.returncode != 0 or not (rep or {}).get("ok"))
        log(f"ce-check did not pass (exit {bad.returncode}): {bad.stderr.strip()[:500]}")
    return {
        "command": [*cmd, "grad", "logits.npy", "labels.npy", "--grad", "grad.npy", "--json"],
        "time": Timing([r.wall for r in runs]).as_dict(),
        "peak_rss_bytes": peak,
        "input_bytes": input_bytes(paths),
        "rss_budget_bytes": budget,
        "rss_ratio": peak / budget,
        "exit_codes": [r.returncode for r in runs],
        "json_ok": [None if rep is None else rep.get("ok") for rep in reports],
        "fd_mode": ((reports[0] or {}).get("fd") or {}).get("mode"),
        "kernel": ((reports[0] or {}).get("options") or {}).get("kernel"),
        "correct": correct,
    }


# ----------------------------------------------------------------------------- 1b. kernel targets


def kernel_target(env: dict[str, str]) -> str:
    """The target ce-check runs under `env` (numpy when the kernel is off or the target missing)."""
    res = subprocess.run([sys.executable, "-c", "from ce_cli.kernels.compiled import target; print(target())"],
                         capture_output=True, text=True, env=child_env(env))
    return res.stdout.strip() or f"? ({res.stderr.strip()[-200:]})"


def bench_kernels(cmd, paths, workdir: Path, repeat: int, kernels: list[str], threads: list[int]) -> list[dict]:
    """Section 1 for every (kernel, threads), the runs interleaved round by round so that load
    from other processes spreads over all of them."""
    configs = [(k, t) for t in threads for k in kernels]
    walls: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    ok = {c: True for c in configs}
    for i in range(repeat):
        for k, t in configs:
            run = ce_check_grad(cmd, paths["logits"], paths["labels"], paths["grad"], workdir, kernel_env(k, t))
            rep = run.report()
            ok[k, t] &= run.returncode == 0 and rep is not None and rep.get("ok") is True
            walls[k, t].append(run.wall)
            log(f"round {i + 1}/{repeat}: {k}, {t} thread(s): {run.wall:.2f} s, exit {run.returncode}")
    return [{"kernel": k, "threads": t, "ran": kernel_target(kernel_env(k, t)),
             "time": Timing(walls[k, t]).as_dict(), "correct": ok[k, t]} for k, t in configs]


def run_kernels(args, torch, workdir: Path) -> dict:
    cmd = ce_check_command()
    res = {"shape": [args.n, args.c], "repeat": args.repeat, "python": sys.executable,
           "ce_check_version": ce_cli.__version__, "torch_version": getattr(torch, "__version__", None),
           "as_cpu": os.environ.get(AS_CPU_MARK)}
    log(f"generating {args.n}x{args.c} inputs in {workdir}")
    paths, res["grad_source"] = make_inputs(workdir, args.n, args.c, args.seed, torch)
    if args.reread:
        reread_inputs(cmd, paths, workdir)
    res["kernels"] = bench_kernels(cmd, paths, workdir, args.repeat, args.kernels, args.threads)
    res["torch_by_threads"] = {}
    for t in args.threads:
        tb, res["torch_skipped"] = bench_torch_baseline(args, paths, t)
        if tb is not None:
            res["torch_by_threads"][str(t)] = tb
    return res


def fill_kernel_table(t: Table, res: dict) -> None:
    n, c = res["shape"]
    torch_by = {int(t): tb["time"]["best_s"] for t, tb in res["torch_by_threads"].items()}
    numpy_s = {r["threads"]: r["time"]["best_s"] for r in res["kernels"] if r["kernel"] == "numpy"}
    sec = f"1 end-to-end {n}x{c} by kernel" + (f", as an {res['as_cpu']}-only CPU" if res["as_cpu"] else "")
    for r in res["kernels"]:
        best, med = r["time"]["best_s"], r["time"]["median_s"]
        extra = [f"ran {r['ran']}"]
        if r["threads"] in numpy_s and r["kernel"] != "numpy":
            extra.append(f"numpy/this {numpy_s[r['threads']] / best:.2f}x")
        if r["threads"] in torch_by:
            extra.append(f"this/torch {best / torch_by[r['threads']]:.2f}")
        t.add(sec, f"{r['kernel']}, {r['threads']} thread(s) best / median",
              f"{secs(best)} / {secs(med)} ({', '.join(extra)})", "report ok", status(r["correct"]))
    for threads, best in torch_by.items():
        t.add("2 torch baseline", f"torch f64 fwd+bwd ({threads} thread(s)) best", secs(best))
    if not torch_by:
        t.add("2 torch baseline", "skipped", res["torch_skipped"])


# ----------------------------------------------------------------------------- 2. torch baseline


def bench_torch_baseline(args, paths, threads: int) -> tuple[dict | None, str]:
    """float64 F.cross_entropy forward + backward at `threads` threads, the upcast not timed
    (bench/torch_baseline.py); (None, why) when it cannot run."""
    if args.no_torch:
        return None, "disabled by --no-torch"
    best, note = run_torch(args.torch_python, "index", paths, threads, args.repeat)
    if best is None:
        log(f"PyTorch baseline skipped: {note}")
        return None, note
    log(f"torch float64 fwd+bwd, {threads} thread(s): best {best:.2f} s")
    return {"threads": threads, "time": {"best_s": best}, "torch_version": note}, ""


# ----------------------------------------------------------------------------- 3. finite differences


def softmax_grad64(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    a = np.exp(z - z.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    a[np.arange(z.shape[0]), y] -= 1.0
    return a / z.shape[0]


def bench_ce_fd(z: np.ndarray, y: np.ndarray, repeat: int) -> dict:
    g = softmax_grad64(z, y)
    reports = []
    timing = time_calls(lambda: reports.append(ce_cli.check_grad(z, y, grad=g, fd="full")), repeat)
    rep = reports[-1]
    fd = next(c for c in rep.checks if c.name == "fd_vs_reference")
    log(f"ce_cli.check_grad fd=full: best {timing.best:.3f} s")
    return {"time": timing.as_dict(), "fd_max_abs_err": fd.max_abs_err, "fd_ok": fd.ok,
            "ok": rep.ok, "fd_mode": rep.fd_mode, "fd_evaluations": rep.fd_evaluations}


def gradcheck_seconds(torch, fn, x) -> tuple[float, bool]:
    t0 = time.perf_counter()
    ok = torch.autograd.gradcheck(fn, (x,), eps=GRADCHECK_EPS, atol=1e-5, rtol=1e-3,
                                  fast_mode=False, raise_exception=False)
    return time.perf_counter() - t0, bool(ok)


def warm_up_gradcheck(torch) -> None:
    """gradcheck imports modules on its first call: keep that out of the timings."""
    x = torch.zeros((2, 3), dtype=torch.float64, requires_grad=True)
    y = torch.zeros(2, dtype=torch.int64)
    gradcheck_seconds(torch, lambda z: torch.nn.functional.cross_entropy(z, y), x)


def loss_of_first_rows(torch, z, y, rows: int):
    """F.cross_entropy(z, y) as a function of z's first `rows` rows, the others fixed.

    The rows are written into a detached alias of one full-batch buffer (a rows x C copy), so
    each call runs the same full-batch forward as `lambda z: F.cross_entropy(z, y)` and gradcheck
    perturbs only rows x C entries (a torch.cat would add a full-batch copy per forward).
    """
    buf = z.clone()

    def fn(head):
        full = buf.detach()
        full[:rows] = head
        return torch.nn.functional.cross_entropy(full, y)

    return fn


def forward_seconds(torch, z, y, repeat: int = 50) -> float:
    """Median time of one no-grad float64 forward of the batch loss."""
    F = torch.nn.functional
    with torch.no_grad():
        F.cross_entropy(z, y)
        return time_calls(lambda: F.cross_entropy(z, y), repeat).median


def gradcheck_style_error(torch, z, y, rows: int) -> float:
    """max |numerical - analytical| over the first `rows` rows, as gradcheck computes them:
    central differences with eps 1e-6 of the batch loss, one entry at a time."""
    F = torch.nn.functional
    x = z.clone().requires_grad_(True)
    F.cross_entropy(x, y).backward()
    analytic = x.grad[:rows].reshape(-1)
    numeric = torch.empty_like(analytic)
    x = z.clone()
    flat = x.view(-1)
    with torch.no_grad():
        for i in range(analytic.numel()):
            orig = flat[i].item()
            flat[i] = orig - GRADCHECK_EPS
            lo = F.cross_entropy(x, y).item()
            flat[i] = orig + GRADCHECK_EPS
            hi = F.cross_entropy(x, y).item()
            flat[i] = orig
            numeric[i] = (hi - lo) / (2 * GRADCHECK_EPS)
    return float((numeric - analytic).abs().max())


def bench_gradcheck(torch, z: np.ndarray, y: np.ndarray, rows: int, budget: float) -> dict:
    """Time gradcheck (measured, or scaled from its first `rows` rows) and its numerical error."""
    F = torch.nn.functional
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    n, c = z.shape
    rows = min(rows, n)
    warm_up_gradcheck(torch)
    out = {"rows_perturbed": rows}
    estimate = 0.0
    if rows < n:
        head = zt[:rows].clone().requires_grad_(True)
        part_s, part_ok = gradcheck_seconds(torch, loss_of_first_rows(torch, zt, yt, rows), head)
        estimate = part_s * n / rows  # two full-batch forwards per perturbed entry
        log(f"gradcheck perturbing {rows} of {n} rows: {part_s:.1f} s -> all rows ~{estimate:.0f} s")
        out.update(partial_s=part_s, partial_ok=part_ok, estimate_full_s=estimate)
    if rows == n or estimate <= budget:
        full_s, full_ok = gradcheck_seconds(torch, lambda x: F.cross_entropy(x, yt),
                                            zt.clone().requires_grad_(True))
        log(f"gradcheck, all rows: {full_s:.1f} s")
        out.update(seconds=full_s, ok=full_ok, extrapolated=False)
    else:
        out.update(seconds=estimate, ok=part_ok, extrapolated=True)
    t_fwd = forward_seconds(torch, zt, yt)
    out["forward_s"] = t_fwd
    out["forward_count_floor_s"] = 2 * n * c * t_fwd  # 2 forwards per entry and nothing else
    out["max_abs_err"] = gradcheck_style_error(torch, zt, yt, rows)
    out["error_rows"] = rows
    return out


def bench_fd(torch, n: int, c: int, seed: int, repeat: int, gc_rows: int, budget: float) -> dict:
    rng = np.random.default_rng(seed + 1)
    z = 2.0 * rng.standard_normal((n, c))
    y = rng.integers(0, c, size=n, dtype=np.int64)
    out = {"shape": [n, c], "ce_check": bench_ce_fd(z, y, repeat)}
    if torch is not None:
        gc = bench_gradcheck(torch, z, y, gc_rows, budget)
        gc["speedup"] = gc["seconds"] / out["ce_check"]["time"]["best_s"]
        gc["speedup_vs_floor"] = gc["forward_count_floor_s"] / out["ce_check"]["time"]["best_s"]
        out["gradcheck"] = gc
    return out


# ----------------------------------------------------------------------------- 4. corruption


def bench_corruption(cmd, paths, workdir: Path, n: int, c: int) -> dict:
    row, col = corrupt_position(n, c)
    bad = np.load(paths["grad"])
    before = float(bad[row, col])
    bad[row, col] *= np.float32(CORRUPT_FACTOR)
    bad_path = workdir / "grad_bad.npy"
    np.save(bad_path, bad)
    del bad
    run = ce_check_grad(cmd, paths["logits"], paths["labels"], bad_path, workdir)
    bad_path.unlink()
    report = run.report()
    check = find_check(report, "grad_vs_reference")
    first = check["worst"][0]["index"] if check and check["worst"] else None
    found = (run.returncode == 1 and report is not None and report.get("ok") is False
             and check is not None and check["ok"] is False and first == [row, col])
    log(f"corruption at ({row}, {col}): first worst {first}, exit {run.returncode}")
    return {"index": [row, col], "value_before": before, "factor": CORRUPT_FACTOR,
            "exit_code": run.returncode, "first_worst_index": first,
            "mismatches": check["mismatches"] if check else None, "found": found,
            "time_s": run.wall, "peak_rss_bytes": run.maxrss}


# ----------------------------------------------------------------------------- report


def fill_table(t: Table, res: dict, torch_note: str) -> None:
    e2e = res["end_to_end"]
    n, c = res["shape"]
    sec = f"1 end-to-end {n}x{c}" + (f", as an {res['as_cpu']}-only CPU" if res["as_cpu"] else "")
    t.add(sec, "ce-check wall time best / median",
          f"{secs(e2e['time']['best_s'])} / {secs(e2e['time']['median_s'])}")
    t.add(sec, "exit codes, JSON ok", f"{e2e['exit_codes']} {json.dumps(e2e['json_ok'])}", "0, true",
          status(e2e["correct"]))
    t.add(sec, "ce-check finite-difference mode", str(e2e["fd_mode"]))
    t.add(sec, "ce-check kernel (CE_CHECK_FUSED=0: numpy)", str(e2e["kernel"]))
    t.add(sec, "input bytes (logits + labels + grad)", f"{e2e['input_bytes'] / MB:.0f} MiB")
    t.add(sec, "peak RSS of ce-check", f"{e2e['peak_rss_bytes'] / MB:.0f} MiB",
          f"<= {e2e['rss_budget_bytes'] / MB:.0f} MiB")
    t.add(sec, "peak RSS / (1.2*input + 256 MiB)", f"{e2e['rss_ratio']:.2f}", "<= 1",
          status(e2e["rss_ratio"] <= 1))

    sec = "2 torch baseline"
    if "torch" in res:
        tb = res["torch"]
        t.add(sec, f"torch f64 fwd+bwd ({tb['threads']} thread) best", secs(tb['time']['best_s']))
        t.add(sec, "ce-check time / torch time (best)", f"{res['time_ratio']:.2f}", "<= 0.5",
              status(res["time_ratio"] <= 0.5))
    else:
        t.add(sec, "skipped", res["torch_skipped"])

    fd = res["fd"]
    sec = f"3 finite diff {fd['shape'][0]}x{fd['shape'][1]}"
    ce = fd["ce_check"]
    t.add(sec, "ce_cli.check_grad fd=full best", secs(ce["time"]["best_s"]), "report ok",
          status(ce["ok"]))
    t.add(sec, "ce-check max |fd - reference|", f"{ce['fd_max_abs_err']:.2e}")
    gc = fd.get("gradcheck")
    if gc is None:
        t.add(sec, "gradcheck skipped", torch_note)
    else:
        how = (f"EXTRAPOLATED: {secs(gc['partial_s'])} measured on {gc['rows_perturbed']} rows x N/"
               f"{gc['rows_perturbed']}" if gc["extrapolated"] else "measured")
        t.add(sec, "gradcheck fast_mode=False", f"{secs(gc['seconds'])} ({how})", "passes",
              status(gc["ok"]))
        t.add(sec, "lower bound: 2*N*C forwards", f"{secs(gc['forward_count_floor_s'])} "
              f"({gc['forward_s'] * 1e6:.0f} us per forward)")
        t.add(sec, "speed-up gradcheck / ce-check", f"{gc['speedup']:.0f}x "
              f"(vs lower bound {gc['speedup_vs_floor']:.0f}x)", ">= 20x", status(gc["speedup"] >= 20))
        t.add(sec, f"gradcheck max |num - analytic| ({gc['error_rows']} rows)",
              f"{gc['max_abs_err']:.2e}")

    cor = res["corruption"]
    t.add("4 corruption", f"entry {tuple(cor['index'])} x {cor['factor']}",
          "found" if cor["found"] else f"NOT found (first worst {cor['first_worst_index']}, "
          f"exit {cor['exit_code']})", "found", status(cor["found"]))


# ----------------------------------------------------------------------------- main


def make_workdir(path: str | None) -> tuple[Path, bool]:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="ce-bench-")), True
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    return d, False


def clean_workdir(workdir: Path, created: bool, keep: bool) -> None:
    if keep:
        log(f"kept the inputs in {workdir}")
    elif created:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        for name in GENERATED:
            (workdir / name).unlink(missing_ok=True)


def run(args, torch, workdir: Path) -> dict:
    cmd = ce_check_command()
    res = {"shape": [args.n, args.c], "repeat": args.repeat, "python": sys.executable,
           "ce_check_version": ce_cli.__version__, "torch_version": getattr(torch, "__version__", None),
           "as_cpu": os.environ.get(AS_CPU_MARK)}
    # The small finite-difference section first: after the large inputs, page-cache writeback
    # and reclaim slowed gradcheck's per-entry cost by up to 2x on a 2-core machine.
    res["fd"] = bench_fd(torch, args.fd_n, args.fd_c, args.seed, args.repeat, args.gc_rows,
                         args.gradcheck_budget)
    log(f"generating {args.n}x{args.c} inputs in {workdir}")
    paths, source = make_inputs(workdir, args.n, args.c, args.seed, torch)
    res["grad_source"] = source
    if args.reread:
        reread_inputs(cmd, paths, workdir)
    res["end_to_end"] = bench_end_to_end(cmd, paths, workdir, args.repeat)
    tb, why = bench_torch_baseline(args, paths, 1)
    if tb is not None:
        res["torch"] = tb
        res["time_ratio"] = res["end_to_end"]["time"]["best_s"] / tb["time"]["best_s"]
    else:
        res["torch_skipped"] = why
    res["corruption"] = bench_corruption(cmd, paths, workdir, args.n, args.c)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    torch, torch_note = import_torch(args.no_torch)
    if torch is None:
        print(f"PyTorch parts in this process (torch's gradient, gradcheck) skipped: {torch_note}",
              flush=True)
    workdir, created = make_workdir(args.workdir)
    try:
        res = run_kernels(args, torch, workdir) if args.kernels else run(args, torch, workdir)
    finally:
        clean_workdir(workdir, created, args.keep)
    table = Table()
    if args.kernels:
        fill_kernel_table(table, res)
        print(table.render())
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
        return 0 if all(r["correct"] for r in res["kernels"]) else 1
    fill_table(table, res, torch_note)
    print(table.render())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    gc = res["fd"].get("gradcheck", {})
    correct = (res["end_to_end"]["correct"] and res["corruption"]["found"]
               and res["fd"]["ce_check"]["ok"] and gc.get("ok", True))
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
