"""What bench/run.py and bench/cases.py share: the PyTorch baseline, the memory budget and the
kernel settings of a ce-check child.

The baseline is float64 forward + backward of the loss ce-check verifies, on the same logits
and targets at a given thread count, the upcast to float64 excluded, best of `repeat`:

    index   F.cross_entropy(z, y)                      y: int64 class indices
    bf16    the same, z bfloat16 bits widened exactly  (bench/cases.py's bf16 case)
    probs   F.cross_entropy(z, q)                      q: (N, C) probability targets
    binary  F.binary_cross_entropy_with_logits(z, y)   y: (N, C) labels
    zloss   F.cross_entropy(z, y) + 1e-4 mean(logsumexp(z)^2)    (PaLM's z-loss)
    softcap F.cross_entropy(30 tanh(z / 30), y)                    (Gemma 2's soft-cap)

It runs in a separate interpreter (`--torch-python`, default: the one running the bench), so
torch need not be installed next to ce-check; without torch there it is skipped with a message.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

TORCH_PYTHON_HELP = ("Python interpreter that can import torch, for the PyTorch float64 baseline "
                     "(default: this one, %(default)s); when torch does not import there, the "
                     "baseline is skipped with a message")

Z_LOSS, SOFTCAP = 1e-4, 30.0  # the options of the zloss and softcap cases

TORCH_SCRIPT = r"""
import sys, time
import numpy as np, torch
import torch.nn.functional as F
Z_LOSS, SOFTCAP = %r, %r
kind, z_path, y_path, threads, repeat = sys.argv[1:6]
torch.set_num_threads(int(threads))
z = np.load(z_path)
if z.dtype.kind == "V":  # bfloat16 bits (bench/cases.py's bf16 case): widened exactly
    z = (z.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
z = torch.from_numpy(z).double()
y = torch.from_numpy(np.load(y_path))
y = y.long() if kind in ("index", "zloss", "softcap", "bf16") else y.double()
best = float("inf")
for _ in range(int(repeat)):
    x = z.clone().requires_grad_(True)
    t = time.perf_counter()
    if kind == "binary":
        loss = F.binary_cross_entropy_with_logits(x, y)
    elif kind == "zloss":
        loss = F.cross_entropy(x, y) + Z_LOSS * (torch.logsumexp(x, -1) ** 2).mean()
    elif kind == "softcap":
        loss = F.cross_entropy(SOFTCAP * torch.tanh(x / SOFTCAP), y)
    else:
        loss = F.cross_entropy(x, y)
    loss.backward()
    best = min(best, time.perf_counter() - t)
print(torch.__version__, best)
""" % (Z_LOSS, SOFTCAP)


@functools.cache
def torch_missing(python: str) -> str | None:
    """None when `python` imports torch, else why not (one line)."""
    if not Path(python).exists():
        return f"{python} does not exist"
    res = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    if res.returncode == 0:
        return None
    last = (res.stderr.strip().splitlines() or ["import torch failed"])[-1]
    return f"torch does not import in {python} ({last}); pip install torch there or pass --torch-python"


def run_torch(python: str, kind: str, paths: dict[str, Path], threads: int,
              repeat: int) -> tuple[float | None, str]:
    """(best seconds, torch version) of the baseline for `kind` on paths["logits"] and
    paths["labels"] at `threads` threads; (None, the reason) when it cannot run."""
    why = torch_missing(python)
    if why is not None:
        return None, why
    res = subprocess.run([python, "-c", TORCH_SCRIPT, kind, str(paths["logits"]),
                          str(paths["labels"]), str(threads), str(repeat)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return None, f"the torch baseline failed: {res.stderr.strip().splitlines()[-1:]}"
    version, seconds = res.stdout.split()[-2:]
    return float(seconds), version


AS_CPU_HELP = ("time as on a CPU without AVX-512 (avx2): this script runs again with numpy's "
               "AVX-512 loops turned off (NPY_DISABLE_CPU_FEATURES), PyTorch's too "
               "(ATEN_CPU_CAPABILITY=avx2) and the compiled kernel on its avx2 target "
               "(CE_CHECK_TARGET), in every child as well")
AS_CPU_MARK = "CE_BENCH_AS_CPU"  # set in the run started by `as_cpu`


def as_cpu(cpu: str | None, kernels: list[str]) -> None:
    """Start this script again as on an AVX2-only CPU when `cpu` is "avx2" (it does not
    return), unless this is that run already. An AVX2-only CPU differs from an AVX-512 one in
    more than ce-check's kernel: numpy has AVX-512 loops of float64 exp and log only (on AVX2
    they are libm's scalar functions, ~5x slower here), PyTorch has AVX-512 kernels of its own.
    `kernels` naming a target above avx2 is an error."""
    if cpu is None or os.environ.get(AS_CPU_MARK) == cpu:
        return
    if "avx512" in kernels:
        sys.exit("--as-cpu avx2: the avx512 target is not on such a CPU")
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__
    wide = [f for f in __cpu_dispatch__ if f.startswith(("AVX512", "X86_V4"))]
    env = {**os.environ, AS_CPU_MARK: cpu, "NPY_DISABLE_CPU_FEATURES": " ".join(wide),
           "ATEN_CPU_CAPABILITY": cpu, "CE_CHECK_TARGET": cpu}
    print(f"as an {cpu}-only CPU: NPY_DISABLE_CPU_FEATURES={env['NPY_DISABLE_CPU_FEATURES']!r}, "
          f"ATEN_CPU_CAPABILITY={cpu}, CE_CHECK_TARGET={cpu}", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def input_bytes(paths: dict[str, Path]) -> int:
    """Bytes of every input file ce-check reads (logits, labels, gradient, ...)."""
    return sum(p.stat().st_size for p in paths.values())


def rss_budget(paths: dict[str, Path]) -> float:
    """The peak-RSS target: 1.2 x all input bytes + 256 MiB."""
    return 1.2 * input_bytes(paths) + 256 * 2**20


def kernel_env(kernel: str, threads: int) -> dict[str, str]:
    """Environment overrides running ce-check on `kernel` with `threads` threads: a compiled
    target (CE_CHECK_TARGET: avx512, avx2, sse2, neon, scalar), `compiled` (the best target this
    CPU runs, or --as-cpu's: `as_cpu` sets CE_CHECK_TARGET) or `numpy` (CE_CHECK_FUSED=0)."""
    env = {"CE_CHECK_THREADS": str(threads)}
    if kernel == "numpy":
        env["CE_CHECK_FUSED"] = "0"
    elif kernel == "compiled":
        env["CE_CHECK_FUSED"] = "1"
    else:
        env.update(CE_CHECK_FUSED="1", CE_CHECK_TARGET=kernel)
    return env
