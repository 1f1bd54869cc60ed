"""optax's own softmax cross-entropy losses, differentiated by jax.grad (XLA on CPU), for
ce-check's options (runs in a venv with jax, optax, numpy).

    python optax_cases.py OUTDIR [--small] [--only SUBSTR] [--fixtures]

Each case is the library call as training code writes it, with `meta.ce_check` the check_grad
options that express it:

- `prob`   optax.softmax_cross_entropy(z, t), t probability rows, per example; the gradient of
  their sum -> labels = t, reduction none (the per-example losses are `loss`);
- `prob_mean` the same, .mean() -> reduction mean (probability targets: divided by N);
- `int`    optax.softmax_cross_entropy_with_integer_labels(z, y), per example -> reduction none;
- `where`  ..._with_integer_labels(z, y, where=m), m a per-token mask (~15 % False), summed and
  divided by m.sum() -> labels -100 where m is False, ignore_index -100, reduction mean;
- `where_classes` ..._with_integer_labels(z, y, where=M), M of the logits' shape (~10 % of the
  classes off in each row, never the label): the log-normaliser over the allowed classes only,
  .mean() -> the logits -inf where M is False, reduction mean.

float32 and bfloat16 logits (bf16 saved widened exactly to float32; bf16 probability targets
rounded to bf16 too); logit std 1, 10, 30; C 10, 1000, 32000; at most 2^17 logits per case
(--small: 2^14), at least 8 rows. float32 cases hold planted bugs `grad_bug_<name>`: `where`'s
mean over every token (`allrows`: .mean() instead of / m.sum()), `where_classes`' mask dropped
from the normaliser (`nomask`: where only on the rows).

fixtures/frameworks_semantics/optax/ (tests/test_semantic_frameworks.py): `--small --fixtures`,
without the .json files.
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
import library_cases  # noqa: E402
from jax_cases import to_np  # noqa: E402  (exactly widened to float32)

JDT = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# variant -> (family, reduction, layout, target kind)
VARIANTS = {
    "prob": ("ce", "none", "nc", "prob"), "prob_mean": ("ce", "mean", "nc", "prob"),
    "int": ("ce", "none", "nc", "index"), "where": ("ce", "mean", "nc", "index"),
    "where_classes": ("ce", "mean", "nc", "index"),
}
SCALES = (1.0, 10.0, 30.0)
BUGS = {"where": ("allrows",), "where_classes": ("nomask",)}


def cases(small: bool) -> list[dict]:
    return [c for c in common.semantic_cases("optax", VARIANTS, JDT, small) if c["scale"] in SCALES]


def draw(case: dict, small: bool, seed: int):
    """float64 logits (std = scale), integer labels, probability rows, a token mask (~15 %
    off, the first always, never the last) and a class mask (~10 % off per row, never the label)."""
    rng = np.random.default_rng(seed)
    C = case["C"]
    R = max(8, min(256, (1 << (14 if small else 17)) // C))
    z = rng.standard_normal((R, C)) * case["scale"]
    y = rng.integers(0, C, size=R, dtype=np.int64)
    a = rng.standard_normal((R, C)) * 2.0
    t = np.exp(a - a.max(axis=1, keepdims=True))
    t /= t.sum(axis=1, keepdims=True)
    m = rng.random(R) >= 0.15
    m[0], m[-1] = False, True
    M = rng.random((R, C)) >= 0.1
    M[np.arange(R), y] = True
    return z, y, t, m, M


def forward(v: str, x, y, t, m, M, bug: str = ""):
    """The case's loss (scalar or per example) of logits x."""
    if v in ("prob", "prob_mean"):
        per = optax.softmax_cross_entropy(x, t)
        return per if v == "prob" else per.mean()
    if v == "int":
        return optax.softmax_cross_entropy_with_integer_labels(x, y)
    if v == "where":
        per = optax.softmax_cross_entropy_with_integer_labels(x, y, where=m)
        return per.mean() if bug == "allrows" else per.sum() / m.sum()
    where = jnp.ones_like(M) if bug == "nomask" else M
    return optax.softmax_cross_entropy_with_integer_labels(x, y, where=where).mean()


def grad_of(v: str, x, y, t, m, M, bug: str = ""):
    """(loss, gradient of the loss or of the per-example losses' sum)."""
    def f(xx):
        out = forward(v, xx, y, t, m, M, bug)
        return out.sum() if out.ndim else out
    return forward(v, x, y, t, m, M, bug), jax.grad(f)(x)


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        v, dt = case["variant"], case["dtype"]
        z64, y64, t64, m, M = draw(case, small, seed)
        x = jnp.asarray(z64, dtype=JDT[dt])
        t = jnp.asarray(t64, dtype=JDT[dt])
        args = (jnp.asarray(y64), t, jnp.asarray(m), jnp.asarray(M))
        loss, grad = grad_of(v, x, *args)
        logits = to_np(x).astype(np.float32)
        labels = to_np(t).astype(np.float32) if v.startswith("prob") else y64.copy()
        if v == "where":
            labels[~m] = -100
        if v == "where_classes":
            logits = np.where(M, logits, -np.inf).astype(np.float32)
        arrays = {}
        for bug in BUGS.get(v, ()) if dt == "f32" else ():
            arrays["grad_bug_" + bug] = to_np(grad_of(v, x, *args, bug=bug)[1]).astype(np.float32)
        opts = dict(reduction=case["reduction"], precision=dt)
        if case["target"] == "index":
            opts["ignore_index"] = -100
        common.write_case(
            outdir, case, logits=logits, labels=labels, grad=to_np(grad).astype(np.float32),
            loss=to_np(loss).astype(np.float32), axis=-1, precision=dt, seed=seed,
            arrays_extra=arrays, ce_check=opts,
            meta_extra=dict(version=jax.__version__, optax=optax.__version__,
                            shape=list(z64.shape), loss_dtype=str(loss.dtype),
                            grad_dtype=str(grad.dtype)))
    return one


def main():
    library_cases.main("optax_cases.py", cases, compute)


if __name__ == "__main__":
    main()
