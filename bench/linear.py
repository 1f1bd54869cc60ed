"""Benchmark `ce-check linear` against PyTorch float64 forward + backward.

    /work/fw/venv-torch/bin/python bench/linear.py [--tokens 4096 --hidden 4096 --vocab 32000]
        [--threads 2] [--repeat 2] [--ce-check PATH]

Makes float32 inputs (hidden, weight, labels) and PyTorch float32 gradients (the "kernel" under
test), then times, each as a whole process at the same thread count and `--repeat` times (the
minimum is reported, the machine being shared): `ce-check linear` (projections), `ce-check
linear --exact`, and PyTorch float64 `F.linear` + `F.cross_entropy` forward and backward.
Peak RSS is each process's ru_maxrss. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_F64 = """
import sys, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[2]))
d = sys.argv[1]
h = torch.from_numpy(np.load(d + '/hidden.npy')).double().requires_grad_()
w = torch.from_numpy(np.load(d + '/weight.npy')).double().requires_grad_()
y = torch.from_numpy(np.load(d + '/labels.npy'))
loss = F.cross_entropy(F.linear(h, w), y)
loss.backward()
print(float(loss))
"""


def make_inputs(d: Path, n: int, hdim: int, v: int, threads: int) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(v, hdim, generator=g) * (1.0 / hdim**0.5)
    y = torch.randint(0, v, (n,), generator=g)
    h.requires_grad_()
    w.requires_grad_()
    loss = F.cross_entropy(F.linear(h, w), y)
    loss.backward()
    arrays = {"hidden": h.detach(), "weight": w.detach(), "labels": y, "grad_hidden": h.grad,
              "grad_weight": w.grad, "loss": loss.detach()}
    for name, arr in arrays.items():
        np.save(d / f"{name}.npy", arr.numpy())
    return sum((d / f"{k}.npy").stat().st_size for k in arrays if k != "loss")


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if proc.stderr is not None:
        err = proc.stderr.read().decode()[-400:]
        if err.strip():
            print(err, file=sys.stderr)
    return seconds, usage.ru_maxrss / 1024.0, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ce-check", default=shutil.which("ce-check") or "ce-check")
    ap.add_argument("--skip-exact", action="store_true")
    args = ap.parse_args()
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        input_bytes = make_inputs(d, args.tokens, args.hidden, args.vocab, args.threads)
        files = [str(d / f"{k}.npy") for k in ("hidden", "weight", "labels")]
        base = [args.ce_check, "linear", *files, "--grad-hidden", str(d / "grad_hidden.npy"),
                "--grad-weight", str(d / "grad_weight.npy"), "--loss", str(d / "loss.npy"), "-q"]
        cases = {"ce_check": base, "torch_f64": [sys.executable, "-c", TORCH_F64, tmp, threads]}
        if not args.skip_exact:
            cases["ce_check_exact"] = base + ["--exact"]
        results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in cases}
        for _ in range(args.repeat):
            for name, cmd in cases.items():
                results[name].append(run(cmd, env))
                print(name, results[name][-1], file=sys.stderr, flush=True)
    best = {k: min(r[0] for r in v) for k, v in results.items()}
    rss = {k: max(r[1] for r in v) for k, v in results.items()}
    out = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
           "threads": args.threads, "repeat": args.repeat, "input_mb": input_bytes / 2**20,
           "seconds_min": best, "peak_rss_mb": rss,
           "exit_codes": {k: [r[2] for r in v] for k, v in results.items()},
           "ratio_vs_torch": best["ce_check"] / best["torch_f64"],
           "rss_budget_mb": 1.2 * input_bytes / 2**20 + 512}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
