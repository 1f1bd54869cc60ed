"""MLX's released cross_entropy before and after ml-explore/mlx#4188 ("Shift by the max in
cross_entropy", first in 0.32.1): run once in a venv with mlx[cpu]==0.32.0 and once with
0.32.4 (numpy too).

    python mlx_released_cases.py OUTDIR

Up to 0.32.0 the loss was `logsumexp(z) - z_y` on the raw logits: logsumexp is exact to its
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
    print("wrote", outdir, mx.__version__)


if __name__ == "__main__":
    main()
