"""Start-up cost of ce-check as ratios to `python -c "import numpy"`, measured side by side.

    python bench/startup.py [--runs 15] [--no-bytecode-cache] [--compare OTHER_BIN_DIR]

Each command runs --runs times, interleaved with the baseline (hyperfine-style: a warm-up run,
then repeated runs, min and median of the wall time, and of the CPU time, user + system, which
a shared machine's load disturbs less). Targets (issue #15): `ce-check --help` <= 1.0x,
`ce-check grad` on a 4 x 5 fixture <= 2.0x. The machine may be shared: compare minima. A command
that fails (exit code other than 0) stops the benchmark: a fast error is no start-up time.

Bytecode: an installed package runs from the .pyc files pip wrote, but an editable checkout under
PYTHONDONTWRITEBYTECODE=1 compiles every ce_cli module on every run while numpy's are cached.
By default every command runs with a fresh PYTHONPYCACHEPREFIX (the warm-up run fills it), as an
installed ce-check does; --no-bytecode-cache keeps the environment as it is.

--compare DIR also runs the ce-check commands of another installation (DIR: its bin directory,
e.g. a venv with the code before a change) in the same rounds, so a before/after pair shares the
machine's load; each is still a ratio to this interpreter's `import numpy`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np


def commands(tmp: Path, compare: Path | None = None) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 5))
    y = rng.integers(0, 5, 4)
    np.save(tmp / "z.npy", z)
    np.save(tmp / "y.npy", y)
    out = {"import numpy": [sys.executable, "-c", "import numpy"]}
    for bin_dir, tag in [(Path(sys.executable).parent, ""), *([(compare, " (compare)")] if compare else [])]:
        exe = str(bin_dir / "ce-check")
        grad = [exe, "grad", str(tmp / "z.npy"), str(tmp / "y.npy")]
        out |= {f"ce-check --help{tag}": [exe, "--help"],
                f"ce-check grad 4x5{tag}": [*grad, "--json"],
                f"grad 4x5 tables{tag}": grad}
    return out


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of `cmd`; it must exit 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        env=env).returncode
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"startup.py: {' '.join(cmd)} exited {rc}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(name: str, walls: list[float], cpus: list[float], base: dict[str, float],
            target: float | None) -> dict[str, float | None]:
    """Min and median of wall and CPU time, and their ratios to the baseline's."""
    row = {"min": min(walls), "median": statistics.median(walls),
           "cpu_min": min(cpus), "cpu_median": statistics.median(cpus)}
    ratios = {f"ratio_{key}": value / base[key] for key, value in row.items()}
    print(f"{name:28s} wall min {row['min'] * 1e3:6.1f} ms ({ratios['ratio_min']:.2f}x) median "
          f"{row['median'] * 1e3:6.1f} ms ({ratios['ratio_median']:.2f}x) | cpu min "
          f"{row['cpu_min'] * 1e3:6.1f} ms ({ratios['ratio_cpu_min']:.2f}x) median "
          f"{row['cpu_median'] * 1e3:6.1f} ms ({ratios['ratio_cpu_median']:.2f}x)"
          + (f"  target <= {target}x" if target is not None else ""))
    return {**row, **ratios, "target": target}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--no-bytecode-cache", action="store_true",
                   help="run in this environment as it is (PYTHONDONTWRITEBYTECODE included)")
    p.add_argument("--compare", type=Path, metavar="BIN_DIR",
                   help="also time the ce-check in this bin directory (another installation)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp), args.compare)
        env = None
        if not args.no_bytecode_cache:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        print(f"bytecode cache: {'as the environment has it' if env is None else 'on'}; "
              f"typer {version('typer')}")
        walls: dict[str, list[float]] = {k: [] for k in cmds}
        cpus: dict[str, list[float]] = {k: [] for k in cmds}
        for cmd in cmds.values():  # warm-up (page cache, .pyc)
            timed(cmd, env)
        for _ in range(args.runs):
            for name, cmd in cmds.items():
                wall, cpu = timed(cmd, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
    base = {"min": min(walls["import numpy"]), "median": statistics.median(walls["import numpy"]),
            "cpu_min": min(cpus["import numpy"]), "cpu_median": statistics.median(cpus["import numpy"])}
    targets = {"ce-check --help": 1.0, "ce-check grad 4x5": 2.0, "grad 4x5 tables": 2.0}
    out = {name: summary(name, walls[name], cpus[name], base, targets.get(name.removesuffix(" (compare)")))
           for name in cmds}
    print(json.dumps(out), file=sys.stderr)


if __name__ == "__main__":
    main()
