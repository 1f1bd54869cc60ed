"""JAX sigmoid BCE in 16 bits the way training code reduces it, for check_binary's default rule
(runs in a venv with jax, optax, numpy).

    python jax_binary16_cases.py OUTDIR

optax.sigmoid_binary_cross_entropy on bfloat16/float16 logits and labels, differentiated by
jax.grad (XLA on CPU), saved widened exactly to float32, each with `meta.ce_check` the
check_binary options that express it:

- `masked`  per-element 16-bit losses times a float32 mask (80% ones), `.sum() / mask.sum()` in
  float32 -> weight (the mask), reduction sum, denominator: a float32 loss that reduces 16-bit
  per-element losses (held to the float32 rule, 27 of 64 such cases failed). The float16 case
  at K = 32,000 keeps two of its 33 rows (their gradient does not depend on the others; the
  loss is their share, over the whole batch's denominator): its entries are float16
  subnormals (~1e-7) whose few bits bfloat16 holds too, and read as bfloat16 the rule had no
  float16 subnormal spacing.
  `grad_bug_nomask` is the gradient without the mask, `loss_bug_count` the loss divided by
  every element;
- `mean`    `.mean()` in float16 (K = 1,000): a float16 loss next to a gradient of float16
  subnormals that bfloat16 holds too;
- `sum`     `.sum()` in float16 (K = 1,000, logit std 10): the sum overflows to +inf, as float16
  must beyond 65,504.

Seeds are fixed: the same arrays on every run. fixtures/binary16/ holds them
(tests/test_binary16.py).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

JDT = {"bf16": jnp.bfloat16, "f16": jnp.float16}
# (recipe, dtype, N, K, logit std, seed, rows kept or None)
CASES = [("masked", dt, n, k, std, 20_000 + i, None)
         for i, (dt, n, k, std) in enumerate([("bf16", 64, 1, 3.0), ("bf16", 96, 10, 10.0),
                                              ("bf16", 16, 1000, 3.0), ("f16", 64, 1, 1.0),
                                              ("f16", 96, 10, 3.0)])]
CASES += [("masked", "f16", 33, 32_000, 1.0, 20_145, [30, 31]),
          ("mean", "f16", 64, 1000, 1.0, 20_200, None),
          ("sum", "f16", 64, 1000, 10.0, 20_201, None)]


def w32(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32)).copy()


def make(recipe: str, dt: str, N: int, K: int, std: float, seed: int, keep, outdir: str) -> str:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, K)).astype(np.float32) * std).astype(JDT[dt])
    y = jnp.asarray(rng.random((N, K)).astype(np.float32)).astype(JDT[dt])
    arrays: dict[str, np.ndarray] = {}
    if recipe == "masked":
        mask = jnp.asarray((rng.random((N, K)) >= 0.2).astype(np.float32))
        den = mask.sum()
        rows = jnp.asarray(keep if keep is not None else np.arange(N))

        def f(x, m, d):  # the kept rows' share of the batch's loss (all rows: the loss)
            return (optax.sigmoid_binary_cross_entropy(x, y) * m)[rows].sum() / d

        loss, g = jax.value_and_grad(f)(x, mask, den)
        nomask = jax.grad(f)(x, jnp.ones_like(mask), den)
        arrays.update(weight=w32(mask), grad_bug_nomask=w32(nomask),
                      loss_bug_count=w32(f(x, mask, jnp.float32(N * K))))
        check = {"reduction": "sum", "denominator": float(den), "weight": "weight"}
    else:
        def f(x):
            l = optax.sigmoid_binary_cross_entropy(x, y)
            return l.mean() if recipe == "mean" else l.sum()

        loss, g = jax.value_and_grad(f)(x)
        check = {"reduction": recipe}
    arrays.update(logits=w32(x), labels=w32(y), grad=w32(g), loss=w32(loss))
    if keep is not None:  # rows of the batch: every (N, K) array
        arrays = {k: (v[keep] if v.shape == (N, K) else v) for k, v in arrays.items()}
    meta = {"recipe": recipe, "dtype": dt, "N": N, "K": K, "std": std, "seed": seed,
            "rows_kept": keep, "jax": jax.__version__, "optax": optax.__version__,
            "ce_check": check}
    name = f"jax_{recipe}_{dt}_K{K}_s{std:g}"
    np.savez_compressed(os.path.join(outdir, name + ".npz"), meta=np.array([json.dumps(meta)]),
                        **arrays)
    return name


def main() -> None:
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    for case in CASES:
        print(make(*case, outdir))


if __name__ == "__main__":
    main()
