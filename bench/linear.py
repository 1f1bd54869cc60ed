"""Benchmark `ce-check linear` against PyTorch float64 forward + backward.

    python bench/linear.py [--tokens 4096 --hidden 4096 --vocab 32000] [--threads 2]
        [--repeat 1] [--torch-python PYTHON] [--ce-check CMD] [--inputs DIR] [--skip-exact]

PyTorch makes the float32 inputs (hidden, weight, labels) and its float32 gradients (the "kernel"
under test); it runs in `--torch-python` (default: this interpreter), so ce-check's environment
needs no torch. Then, each as a whole process at the same thread count and `--repeat` times in
turn (the minimum is reported, the machine being shared): `ce-check linear` (projections),
PyTorch float64 `F.linear` + `F.cross_entropy` forward and backward, and `ce-check linear
--exact`. Peak RSS is each process's ru_maxrss (memory-mapped inputs count once touched).
`--inputs DIR` keeps the inputs there and reuses them on the next call. Prints one JSON object
(`rss_within_budget`: each ce-check run's peak against 1.2 x input bytes + 512 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE_INPUTS = """
import sys, numpy as np, torch, torch.nn.functional as F
d, n, hdim, v, threads = sys.argv[1], *map(int, sys.argv[2:6])
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
    np.save(f"{d}/{name}.npy", arr.numpy())
"""

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

ARRAYS = ("hidden", "weight", "labels", "grad_hidden", "grad_weight", "loss")


def make_inputs(d: Path, args: argparse.Namespace, env: dict[str, str]) -> int:
    """The inputs in `d` (made by PyTorch unless all there); their bytes (the loss excluded)."""
    if not all((d / f"{k}.npy").exists() for k in ARRAYS):
        subprocess.run([args.torch_python, "-c", MAKE_INPUTS, str(d), str(args.tokens),
                        str(args.hidden), str(args.vocab), str(args.threads)], env=env, check=True)
    return sum((d / f"{k}.npy").stat().st_size for k in ARRAYS if k != "loss")


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


def cases(d: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    ce = shlex.split(args.ce_check) if args.ce_check else (
        [shutil.which("ce-check")] if shutil.which("ce-check") else [sys.executable, "-m", "ce_cli"])
    files = [str(d / f"{k}.npy") for k in ("hidden", "weight", "labels")]
    base = [*ce, "linear", *files, "--grad-hidden", str(d / "grad_hidden.npy"),
            "--grad-weight", str(d / "grad_weight.npy"), "--loss", str(d / "loss.npy"), "-q"]
    out = {"ce_check": base,
           "torch_f64": [args.torch_python, "-c", TORCH_F64, str(d), str(args.threads)]}
    if not args.skip_exact:
        out["ce_check_exact"] = base + ["--exact"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--torch-python", default=sys.executable,
                    help="a Python with torch for the inputs and the baseline (default: this one)")
    ap.add_argument("--ce-check", default=None, help="the ce-check command (default: on PATH)")
    ap.add_argument("--inputs", default=None, help="keep the inputs in this directory, reuse them")
    ap.add_argument("--skip-exact", action="store_true")
    args = ap.parse_args()
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.inputs or tmp)
        d.mkdir(parents=True, exist_ok=True)
        input_bytes = make_inputs(d, args, env)
        todo = cases(d, args)
        results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in todo}
        for _ in range(args.repeat):
            for name, cmd in todo.items():
                results[name].append(run(cmd, env))
                print(name, results[name][-1], file=sys.stderr, flush=True)
    best = {k: min(r[0] for r in v) for k, v in results.items()}
    rss = {k: max(r[1] for r in v) for k, v in results.items()}
    budget = 1.2 * input_bytes / 2**20 + 512
    out = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
           "threads": args.threads, "repeat": args.repeat, "input_mb": input_bytes / 2**20,
           "seconds_min": best, "peak_rss_mb": rss,
           "exit_codes": {k: [r[2] for r in v] for k, v in results.items()},
           "ratio_vs_torch": {k: best[k] / best["torch_f64"] for k in best if k != "torch_f64"},
           "rss_budget_mb": budget,
           "rss_within_budget": {k: rss[k] <= budget for k in rss if k != "torch_f64"}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
