"""JAX / optax cross-entropy gradients for ce-check calibration (runs in a venv with jax, optax, numpy).

    python jax_cases.py OUTDIR [--small] [--only SUBSTR]

Calls: optax.softmax_cross_entropy_with_integer_labels (index targets; `ignore` variants mask with
`where`-style weights: sum(l * m) / sum(m)), optax.softmax_cross_entropy (probability targets, and
one-hot targets through optax.smooth_labels for the `smooth` variant). jax.grad of the mean
(or of the sum for reduction 'sum'), in float32 and bfloat16 (saved widened to float32).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

JDT = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
PREC = {"f32": "f32", "bf16": "bf16", "f16": "f16"}


def to_np(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)  # exact widening
    return a.copy()


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        z64, y, t64, w64, axis = common.draw(case, small, seed)
        dt = JDT[case["dtype"]]
        C = case["C"]
        x = jnp.asarray(z64, dtype=dt)
        red = case["reduction"]
        var = case["variant"]
        call = "optax.softmax_cross_entropy_with_integer_labels"
        labels_saved = y
        if t64 is not None:
            tgt = jnp.asarray(t64, dtype=dt)
            labels_saved = to_np(tgt)
            call = "optax.softmax_cross_entropy"
            if "smooth" in var:
                tgt = optax.smooth_labels(tgt, 0.1)
                call += " + optax.smooth_labels(t, 0.1) (t given unsmoothed)"

            def per(x):
                return optax.softmax_cross_entropy(x, tgt, axis=axis)
        elif "smooth" in var:
            oh = jax.nn.one_hot(jnp.asarray(y), C, axis=axis, dtype=dt)
            tgt = optax.smooth_labels(oh, 0.1) if axis == -1 else None
            if tgt is None:  # smooth_labels works on the last axis
                oh_last = jax.nn.one_hot(jnp.asarray(y), C, dtype=dt)
                tgt = jnp.moveaxis(optax.smooth_labels(oh_last, 0.1), -1, axis)
            call = "optax.softmax_cross_entropy(x, optax.smooth_labels(one_hot(y), 0.1))"

            def per(x):
                return optax.softmax_cross_entropy(x, tgt, axis=axis)
        else:
            mask = (y != -100)
            ysafe = jnp.asarray(np.where(mask, y, 0))

            def per(x):
                return optax.softmax_cross_entropy_with_integer_labels(x, ysafe, axis=axis)

        if var == "ignore":
            m = jnp.asarray(y != -100, dtype=dt)
            call += "; sum(l*m)/sum(m)"

            def total(x):
                return jnp.sum(per(x) * m) / jnp.sum(m)
        elif red == "sum":
            def total(x):
                return jnp.sum(per(x))
        else:
            def total(x):
                return jnp.mean(per(x))

        loss, grad = jax.value_and_grad(total)(x)
        common.write_case(
            outdir, case, logits=to_np(x), labels=labels_saved, grad=to_np(grad), loss=to_np(loss),
            axis=axis, precision=PREC[case["dtype"]], seed=seed,
            meta_extra=dict(version=f"jax {jax.__version__}, optax {optax.__version__}", call=call,
                            target_kind=case["target"], loss_dtype=str(loss.dtype),
                            grad_dtype=str(grad.dtype), backend=jax.default_backend()))
    return one


def variants():
    return [
        dict(tag="int", variant="", reduction="sum"),
        dict(tag="int", variant="ignore"),
        dict(tag="int", variant="smooth"),
        dict(tag="prob", variant="prob", target="prob"),
        dict(tag="prob", variant="prob_smooth", target="prob"),
    ]


def main():
    args = common.parse_args("jax_cases.py")
    cases = common.grid("jax", ("f32", "bf16"), ("last", "axis1"), {"int": "index"}, small=args.small,
                        variants=[dict(v, layouts=("last",)) for v in variants()],
                        variant_dtypes=("f32", "bf16"))
    common.run(cases, args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
