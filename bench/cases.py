"""`binary` and probability targets end to end against PyTorch float64, plus a scaling table.

    python bench/cases.py                       # 4096 x 32000 float32, threads 1 and all cores
    python bench/cases.py --n 1024 --c 8000     # smaller
    python bench/cases.py --kernels avx512,avx2,numpy --workdir /tmp/cases   # targets; keep inputs
    python bench/cases.py --scaling             # only the scaling table (in-process kernel)
    python bench/cases.py --cases zloss,softcap # grad --z-loss 1e-4 / --softcap 30, index targets
    python bench/cases.py --as-cpu avx2         # as on an AVX2-only CPU (numpy, PyTorch, ce-check)
    python bench/cases.py --cases bf16          # index targets, bfloat16 logits and gradient

For each case (`binary`: multi-label logits, labels 0/1 at 5%; `probs`: softmax with dense soft
targets; `zloss`, `softcap`: index targets with `--z-loss 1e-4` or `--softcap 30`; `bf16`:
index targets, logits and gradient rounded to bfloat16 and written as ml_dtypes writes them,
2-byte `V2`) it writes float32 logits, labels and a correct float32 gradient as .npy (into --workdir
if given, where they are kept and reused, else a temporary directory), then times
`ce-check binary|grad logits labels --grad grad --json` as a subprocess (whole process: start-up,
loading, checking) for each --kernels entry (`compiled`: the best target this CPU runs; a target
name forces it, CE_CHECK_TARGET; `numpy`: CE_CHECK_FUSED=0) at each thread count
(CE_CHECK_THREADS), min and median of --repeat, and the child's peak RSS. The baseline is
PyTorch float64 forward + backward (BCEWithLogitsLoss, or F.cross_entropy with probability
targets) on the same logits at the same thread count, run by --torch-python (default: this
interpreter; skipped with a message when torch does not import there) as a subprocess, upcast
excluded. Every round runs each configuration and the baseline once, so load from other
processes spreads over all of them (PyTorch: the best of --repeat passes in its process, as
its passes vary with the first touch of fresh buffers); ratios are min / min
(bench/torch_baseline.py). The peak-RSS
budget counts every input file: 1.2 x (logits + labels + grad bytes) + 256 MiB. The machine may
be shared: report minima.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from torch_baseline import (AS_CPU_HELP, AS_CPU_MARK, SOFTCAP, TORCH_PYTHON_HELP, Z_LOSS, as_cpu, kernel_env,
                            rss_budget, run_torch)

WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL); "
           "dt = time.perf_counter() - t; "
           "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, "
           "b'\"ok\": true' in r.stdout)")


# index targets with a training-code option: the flags, and the loss PyTorch computes (torch_baseline)
OPTION_CASES = {"zloss": ["--z-loss", str(Z_LOSS)], "softcap": ["--softcap", str(SOFTCAP)]}


def _option_case(kind: str, z64: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the float32 gradient of the mean loss with a z-loss (2 zeta lse a added), a
    soft-cap (through z = cap tanh(x / cap): times 1 - tanh^2) or neither (bf16)."""
    n, c = z64.shape
    y = rng.integers(0, c, n)
    t = np.tanh(z64 / SOFTCAP) if kind == "softcap" else None
    zz = SOFTCAP * t if t is not None else z64
    m = zz.max(axis=1, keepdims=True)
    a = np.exp(zz - m)
    s = a.sum(axis=1, keepdims=True)
    a /= s
    g = a.copy()
    g[np.arange(n), y] -= 1.0
    if kind == "zloss":
        g += 2.0 * Z_LOSS * (m + np.log(s)) * a
    elif t is not None:
        g *= 1.0 - t * t
    return y, (g / n).astype(np.float32)


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even) as the 2-byte `V2` .npy dtype."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view("V2")


def _widened(bits: np.ndarray) -> np.ndarray:
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def make_case(kind: str, n: int, c: int, workdir: Path, seed: int) -> dict[str, Path]:
    paths = {name: workdir / f"{kind}_{n}x{c}_{name}.npy" for name in ("logits", "labels", "grad")}
    if all(p.is_file() for p in paths.values()):
        return paths
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c), dtype=np.float32) * 2).astype(np.float32)
    z64 = z.astype(np.float64)
    if kind == "binary":
        y = (rng.random((n, c)) < 0.05).astype(np.float32)
        g = ((1.0 / (1.0 + np.exp(-z64)) - y) / y.size).astype(np.float32)
    elif kind in OPTION_CASES:
        y, g = _option_case(kind, z64, rng)
    elif kind == "bf16":
        z = _bf16(z)
        z64 = _widened(z).astype(np.float64)
        y, g = _option_case(kind, z64, rng)
        g = _bf16(g)
    else:
        y = rng.random((n, c), dtype=np.float32) ** 8
        y /= y.sum(axis=1, keepdims=True)
        z64 -= z64.max(axis=1, keepdims=True)
        np.exp(z64, out=z64)
        z64 /= z64.sum(axis=1, keepdims=True)
        g = ((z64 - y) / n).astype(np.float32)
    del z64
    for name, arr in (("logits", z), ("labels", y), ("grad", g)):
        np.save(paths[name], arr)
    return paths


def run_ce_check(kind: str, paths: dict[str, Path], threads: int, kernel: str) -> tuple[float, int, bool]:
    """One whole-process run: (wall seconds, peak RSS bytes, exit 0 with "ok": true)."""
    cmd = [str(Path(sys.executable).parent / "ce-check"), "binary" if kind == "binary" else "grad",
           str(paths["logits"]), str(paths["labels"]), "--grad", str(paths["grad"]), "--json",
           *OPTION_CASES.get(kind, [])]
    # its threads are CE_CHECK_THREADS' (kernel_env); a BLAS pool, which grad and binary never
    # use, would busy-wait a core away from them (as in bench/run.py's children)
    env = {**os.environ, **kernel_env(kernel, threads), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]) * 1024, out[2] == "0" and out[3] == "True"


def run_case(kind: str, paths: dict[str, Path], args, threads: list[int]) -> list[dict]:
    """Every (threads, kernel) and the torch baseline at each thread count, once per round."""
    configs = [(t, k) for t in threads for k in args.kernels]
    runs: dict = {c: [] for c in configs}
    rss = {c: 0 for c in configs}
    ok = {c: True for c in configs}
    torch_runs: dict[int, list[float]] = {t: [] for t in threads}
    for i in range(args.repeat):
        for t in threads:
            # --repeat passes in its process too: each may pay the first touch of fresh buffers
            torch_s, note = run_torch(args.torch_python, kind, paths, t, args.repeat)
            if torch_s is None and i == 0:
                print(f"PyTorch baseline skipped: {note}", file=sys.stderr, flush=True)
            if torch_s is not None:
                torch_runs[t].append(torch_s)
        for c in configs:
            wall, peak, good = run_ce_check(kind, paths, *c)
            runs[c].append(wall)
            rss[c], ok[c] = max(rss[c], peak), ok[c] and good
            print(f"round {i + 1}/{args.repeat}: {kind}, {c[1]}, {c[0]} thread(s): {wall:.2f} s",
                  file=sys.stderr, flush=True)
    budget = rss_budget(paths)
    rows = []
    for t, k in configs:
        torch_s = min(torch_runs[t]) if torch_runs[t] else None
        best = min(runs[t, k])
        rows.append({"kind": kind, "n": args.n, "c": args.c, "threads": t, "kernel": k,
                     "min": best, "median": statistics.median(runs[t, k]), "peak_rss": rss[t, k],
                     "ok": ok[t, k], "torch_f64": torch_s, "ratio": best / torch_s if torch_s else None,
                     "rss_budget": budget, "rss_ok": rss[t, k] <= budget})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict]) -> str:
    """The cases as a Markdown table: time and ratio to PyTorch per kernel and thread count."""
    lines = ["| case | kernel | threads | ce-check | PyTorch f64 | ratio | peak RSS / budget |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        torch_s = f"{r['torch_f64']:.2f} s" if r["torch_f64"] else "skipped"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        lines.append(f"| {r['kind']} | {r['kernel']} | {r['threads']} | {r['min']:.2f} s | {torch_s} "
                     f"| {ratio} | {r['peak_rss'] / r['rss_budget']:.2f}{'' if r['ok'] else ' (NOT OK)'} |")
    return "\n".join(lines)


def scaling(kind: str, shapes: list[tuple[int, int]], threads: list[int], repeat: int) -> list[dict]:
    """In-process: the compiled kernel's comparison pass (what `--grad` runs per chunk) over the
    whole (N, C) float32 problem, min of `repeat`; ns per entry shows linearity in N*C."""
    from ce_cli.verify.checks import check_binary, check_grad
    rows = []
    for n, c in shapes:
        rng = np.random.default_rng(1)
        z = rng.standard_normal((n, c), dtype=np.float32)
        if kind == "binary":
            y = (rng.random((n, c)) < 0.05).astype(np.float32)
            g = ((1 / (1 + np.exp(-z.astype(np.float64))) - y) / y.size).astype(np.float32)
            check = check_binary
        else:
            y = rng.integers(0, c, n)
            e = np.exp(z - z.max(axis=1, keepdims=True))
            g = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
            g[np.arange(n), y] -= 1
            g /= n
            check = check_grad
        for t in threads:
            os.environ["CE_CHECK_THREADS"] = str(t)
            best = float("inf")
            for _ in range(repeat):
                s = time.perf_counter()
                rep = check(z, y, grad=g, fd="off")
                best = min(best, time.perf_counter() - s)
            rows.append({"kind": kind, "n": n, "c": c, "threads": t, "seconds": best,
                         "ns_per_entry": best / (n * c) * 1e9, "ok": rep.ok})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


CASES = ("binary", "probs", *OPTION_CASES, "bf16")


def _cases(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CASES]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown case {', '.join(unknown) or text!r}; "
                                          f"choose from {', '.join(CASES)}")
    return kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--c", type=int, default=32000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    p.add_argument("--cases", default="binary,probs", type=_cases,
                   help=f"comma-separated: {', '.join(CASES)} (index targets: bench/run.py)")
    p.add_argument("--kernels", default="compiled,numpy",
                   help="comma-separated: compiled, a target (avx512, avx2, sse2, neon, scalar), numpy")
    p.add_argument("--workdir", help="keep the inputs here and reuse them (default: a temporary directory)")
    p.add_argument("--torch-python", default=sys.executable, help=TORCH_PYTHON_HELP)
    p.add_argument("--scaling", action="store_true", help="only the scaling table")
    p.add_argument("--json-out")
    p.add_argument("--as-cpu", choices=["avx2"], help=AS_CPU_HELP)
    args = p.parse_args()
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    as_cpu(args.as_cpu, args.kernels)
    threads = sorted({int(t) for t in args.threads.split(",")})
    from ce_cli.kernels.compiled import target
    res: dict = {"target": target(), "cpu_count": os.cpu_count(), "as_cpu": os.environ.get(AS_CPU_MARK),
                 "cases": [], "scaling": []}
    print(f"compiled kernel target: {res['target']}", file=sys.stderr)
    if args.scaling:
        shapes = ([(n, 2000) for n in (1024, 4096, 16384, 65536)]
                  + [(512, c) for c in (1000, 8000, 32000, 128000, 256000)])
        for kind in ("index", "binary"):
            res["scaling"] += scaling(kind, shapes, threads, args.repeat)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for kind in args.cases:
                res["cases"] += run_case(kind, make_case(kind, args.n, args.c, workdir, 0), args, threads)
        print(render(res["cases"]), file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
