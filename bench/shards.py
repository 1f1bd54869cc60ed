"""`grad --shards` / `binary --shards` scaling: the single-process path vs Dask with 1 and 2 local
worker processes.

Writes a row-sharded batch (float32 logits and gradients; index labels, or for --kind binary
soft labels of the logits' shape) to a temporary folder
and times, best of --repeat, the whole sharded check (fd off: the gradient comparison, the bulk
of a large check) three ways:

- single process, CE_CHECK_THREADS=1 and =2 (the threaded kernel at equal cores);
- Dask LocalCluster, 1 worker x 1 thread and 2 workers x 1 thread (the cluster started once,
  outside the timing: a long-lived cluster is the case that matters).

    python bench/shards.py [--rows 400000] [--classes 1024] [--shards 8] [--repeat 3]
                           [--kind grad|binary]

On a shared machine the timings are noisy: it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import sys, time
from ce_cli.verify.shards import ShardFiles, run_shards
from ce_cli.verify.options import CheckOptions
folder, n, repeat, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
files = [ShardFiles(f"{folder}/logits_{i}.npy", f"{folder}/labels_{i}.npy", f"{folder}/grad_{i}.npy") for i in range(n)]
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter(); r = run_shards(files, "rows", CheckOptions(fd="off"), kind=kind); best = min(best, time.perf_counter() - t)
    assert r.report.ok
print(best)
"""


def write(folder: Path, rows: int, classes: int, shards: int, kind: str) -> None:
    rng = np.random.default_rng(0)
    for i, part in enumerate(np.array_split(np.arange(rows), shards)):
        z = rng.normal(size=(part.size, classes)).astype(np.float32)
        z64 = z.astype(np.float64)
        if kind == "binary":
            y = rng.random((part.size, classes))
            p = 1.0 / (1.0 + np.exp(-z64)) - y
            scale = rows * classes
        else:
            y = rng.integers(0, classes, part.size)
            p = np.exp(z64 - z64.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(part.size), y] -= 1.0
            scale = rows
        np.save(folder / f"logits_{i}.npy", z)
        np.save(folder / f"labels_{i}.npy", y)
        np.save(folder / f"grad_{i}.npy", (p / scale).astype(np.float32))


def single(folder: Path, shards: int, repeat: int, threads: int, kind: str) -> float:
    env = {**os.environ, "CE_CHECK_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(shards), str(repeat), kind],
                         capture_output=True, text=True, env=env, check=True)
    return float(out.stdout)


def on_dask(folder: Path, shards: int, repeat: int, workers: int, kind: str) -> float:
    import distributed

    from ce_cli.distributed.dask_run import run_on_dask
    from ce_cli.verify.options import CheckOptions
    from ce_cli.verify.shards import ShardFiles

    files = [ShardFiles(f"{folder}/logits_{i}.npy", f"{folder}/labels_{i}.npy",
                        f"{folder}/grad_{i}.npy") for i in range(shards)]
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  env={"CE_CHECK_THREADS": "1"}) as cluster, \
            distributed.Client(cluster) as client:
        run_on_dask(files, "rows", CheckOptions(fd="off"), client=client, kind=kind)  # warm up
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            assert run_on_dask(files, "rows", CheckOptions(fd="off"), client=client,
                               kind=kind).report.ok
            best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--classes", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kind", choices=("grad", "binary"), default="grad")
    a = ap.parse_args()
    kind = "softmax" if a.kind == "grad" else "binary"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder, a.rows, a.classes, a.shards, kind)
        gb = 2 * 4 * a.rows * a.classes / 1e9
        print(f"{a.kind}: {a.rows:,} rows x {a.classes:,} classes float32 in {a.shards} shards "
              f"(logits + grad {gb:.2f} GB), fd off, best of {a.repeat}; {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f} (a shared machine: other jobs run too)")
        s1 = single(folder, a.shards, a.repeat, 1, kind)
        s2 = single(folder, a.shards, a.repeat, 2, kind)
        d1 = on_dask(folder, a.shards, a.repeat, 1, kind)
        d2 = on_dask(folder, a.shards, a.repeat, 2, kind)
        print(f"single process, 1 thread : {s1:7.2f} s")
        print(f"single process, 2 threads: {s2:7.2f} s")
        print(f"dask, 1 worker           : {d1:7.2f} s  (overhead vs 1 thread: {d1 / s1 - 1:+.0%})")
        print(f"dask, 2 workers          : {d2:7.2f} s  (overhead vs 2 threads: {d2 / s2 - 1:+.0%}; "
              f"scaling 1->2 workers: {d1 / d2:.2f}x)")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
