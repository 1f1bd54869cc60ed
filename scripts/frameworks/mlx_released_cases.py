"""MLX's released losses before and after two fixes, for ce-check: run in a venv with
mlx[cpu]==0.32.0 (#4188), one with 0.32.2 (#4379) and one with 0.32.4 (numpy too).

    python mlx_released_cases.py OUTDIR

ml-explore/mlx#4379 (fixed by #4387 in 0.32.3): the CPU `sum` of float16 / bfloat16 arrays
accumulated in the input dtype, so a running sum stalls where half an ulp passes the addend
(bfloat16 sums of ones stop at 256, float16 at 2048) and every `mean` built on it is too small.
Writes OUTDIR/mlx<version>_sum16_<loss>_<dtype>.npz: `cross_entropy(z, y, reduction="mean")`
over 1,024 x 8 bfloat16 logits (std 1) and `binary_cross_entropy(z, y)` (mean) over 256 x 10
bfloat16 and 32 x 256 float16 logits (std 1, y in {0, 1}), with the gradient of the mean.
The fixtures keep 0.32.0's offset cases, 0.32.2's sum16 cases and 0.32.4's of both.

ml-explore/mlx#4188 ("Shift by the max in cross_entropy", first in 0.32.1): up to 0.32.0
the loss was `logsumexp(z) - z_y` on the raw logits: logsumexp is exact to its
float32 accumulation, but its result, rounded at ~|lse|, is subtracted from z_y, so a large
common offset o costs ~eps |o| per row. 0.32.1 subtracts the (stop-gradient) row max first.
The gradient (softmax, one-hot) is the same. Writes OUTDIR/mlx<version>_offset_<dtype>.npz:
32 x 100 logits (std 1 plus the offset: 1e6 in float32, 300 in bfloat16, bf16 widened to
float32), per-row losses (reduction 'none'), the gradient of their sum, and `meta`.
fixtures/frameworks_semantics/mlx/released/ (tests/test_mlx_real.py).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OFFSETS = {"f32": (mx.float32, 1e6), "bf16": (mx.bfloat16, 300.0)}


def main() -> None:
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    for dt, (mdt, offset) in OFFSETS.items():
        rng = np.random.default_rng(4188)
        z = rng.standard_normal((32, 100)) + offset
        y = rng.integers(0, 100, size=32)
        x = mx.array(z.astype(np.float32)).astype(mdt)
        labels = mx.array(y)
        loss = nn.losses.cross_entropy(x, labels)
        grad = mx.grad(lambda xx: nn.losses.cross_entropy(xx, labels).sum())(x)
        meta = dict(mlx=mx.__version__, dtype=dt, offset=offset, issue="ml-explore/mlx#4188",
                    ce_check=dict(reduction="none", precision=dt), target="index")
        np.savez_compressed(
            os.path.join(outdir, f"mlx{mx.__version__}_offset_{dt}.npz"),
            logits=np.array(x.astype(mx.float32)), labels=y,
            loss=np.array(loss.astype(mx.float32)), grad=np.array(grad.astype(mx.float32)),
            meta=np.array([json.dumps(meta)]))
    sum16(outdir)
    print("wrote", outdir, mx.__version__)


SUM16 = {("ce", "bf16"): (mx.bfloat16, (1024, 8)), ("bce", "bf16"): (mx.bfloat16, (256, 10)),
         ("bce", "f16"): (mx.float16, (32, 256))}


def sum16(outdir: str) -> None:
    """The #4379 cases: MLX's mean losses over 16-bit logits and their gradients."""
    for (kind, dt), (mdt, shape) in SUM16.items():
        rng = np.random.default_rng(4379)
        z = rng.standard_normal(shape)
        x = mx.array(z.astype(np.float32)).astype(mdt)
        if kind == "ce":
            y = rng.integers(0, shape[1], size=shape[0])
            labels = mx.array(y)
            f = lambda xx: nn.losses.cross_entropy(xx, labels, reduction="mean")  # noqa: E731
        else:
            y = (rng.random(shape) < 0.5).astype(np.float32)
            labels = mx.array(y).astype(mdt)
            f = lambda xx: nn.losses.binary_cross_entropy(xx, labels)  # noqa: E731
        loss, grad = mx.value_and_grad(f)(x)
        opts: dict = dict(reduction="mean", precision=dt)
        meta = dict(mlx=mx.__version__, dtype=dt, issue="ml-explore/mlx#4379", ce_check=opts,
                    target="binary" if kind == "bce" else "index")
        np.savez_compressed(
            os.path.join(outdir, f"mlx{mx.__version__}_sum16_{kind}_{dt}.npz"),
            logits=np.array(x.astype(mx.float32)), labels=y,
            loss=np.array(loss.astype(mx.float32)), grad=np.array(grad.astype(mx.float32)),
            meta=np.array([json.dumps(meta)]))


if __name__ == "__main__":
    main()
