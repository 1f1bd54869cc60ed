"""Start-up cost of ce-check as ratios to `python -c "import numpy"`, measured side by side.

    python bench/startup.py [--runs 15]

Each command runs --runs times, interleaved with the baseline (hyperfine-style: a warm-up run,
then repeated runs, min and median of the wall time). Targets (issue #15): `ce-check --help`
<= 1.0x, `ce-check grad` on a 4 x 5 fixture <= 2.0x. The machine may be shared: compare minima.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def commands(tmp: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 5))
    y = rng.integers(0, 5, 4)
    np.save(tmp / "z.npy", z)
    np.save(tmp / "y.npy", y)
    exe = str(Path(sys.executable).parent / "ce-check")
    return {"import numpy": [sys.executable, "-c", "import numpy"],
            "ce-check --help": [exe, "--help"],
            "ce-check grad 4x5": [exe, "grad", str(tmp / "z.npy"), str(tmp / "y.npy"), "--json"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp))
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for name, cmd in cmds.items():  # warm-up (page cache, .pyc)
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(args.runs):
            for name, cmd in cmds.items():
                t = time.perf_counter()
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t)
    base_min, base_med = min(times["import numpy"]), statistics.median(times["import numpy"])
    targets = {"ce-check --help": 1.0, "ce-check grad 4x5": 2.0}
    out = {}
    for name, ts in times.items():
        out[name] = {"min": min(ts), "median": statistics.median(ts),
                     "ratio_min": min(ts) / base_min, "ratio_median": statistics.median(ts) / base_med,
                     "target": targets.get(name)}
        print(f"{name:20s} min {min(ts) * 1e3:7.1f} ms  median {statistics.median(ts) * 1e3:7.1f} ms  "
              f"ratio {out[name]['ratio_min']:.2f}x (median {out[name]['ratio_median']:.2f}x)"
              + (f"  target <= {targets[name]}x" if name in targets else ""))
    print(json.dumps(out), file=sys.stderr)


if __name__ == "__main__":
    main()
