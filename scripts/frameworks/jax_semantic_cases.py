"""JAX gradients of training-code losses, for ce-check's options (runs in a venv with jax,
optax, numpy).

    python jax_semantic_cases.py OUTDIR [--small] [--only SUBSTR]

Each case is written the way JAX training code writes it, differentiated by jax.grad (XLA on
CPU: float32 with flush-to-zero; bf16 saved widened exactly to float32), with `meta.ce_check`
the check_grad / check_binary options that express it (array options name the .npz arrays):

- `gemma`    Gemma's final-logit soft-cap in the model dtype, z = tanh(x / cap) * cap (cap 30),
  then optax.softmax_cross_entropy_with_integer_labels on z in float32, masked mean
  sum(l m) / sum(m) -> softcap, ignore_index, mean;
- `t5x`      T5X's losses.compute_weighted_cross_entropy: its custom-VJP cross_entropy_with_logits
  (backward (1 + 2 z lse) softmax - targets), on one-hot targets smoothed to 1 - eps on the label
  and eps / (V - 1) elsewhere (eps 0.1), z-loss 1e-4, per-token weights (zeros included), the sum
  (`t5x`) or divided by the weights' sum (`t5x_lnf`, NUM_REAL_TARGET_TOKENS) -> label_smoothing,
  smoothing_form others, z_loss, sample_weight, reduction sum (+ denominator). T5X subtracts the
  smoothed targets' entropy from each token's loss (a constant: the gradient is unchanged), so
  these cases store that loss under `loss_kl` and the cross-entropy (the loss plus the weighted
  constants, in float64) under `loss`;
- `t5x_plain` the same without smoothing (the constant is 0): the loss is T5X's own;
- `bce`      optax.sigmoid_binary_cross_entropy(x, y).mean() on multi-label 0/1 labels
  (`bce_soft`: labels in [0, 1]) -> check_binary, mean.

float32 cases also hold `grad_bug_<name>` arrays: jax.grad of the same code with a bug (BUGS).

The loss is differentiated at the model dtype's logits (f32, bf16). Logit std 1, 10, 30, 50;
C 10, 1000, 32000 (and Gemma's 256,000 for `gemma`); at most 2^17 logits per case (--small:
2^14), at least 8 rows. fixtures/frameworks_semantics/jax/ (tests/test_semantic_frameworks.py)
is a subset of `--small`, without the .json files.
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

from common import SEM_CAP as CAP, SEM_EPS_LS as EPS_LS, SEM_ZETA as ZETA  # noqa: E402
from jax_cases import to_np  # noqa: E402  (exactly widened to float32)

JDT = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# variant -> (family, reduction, layout, target kind)
VARIANTS = {
    "gemma": ("gemma", "mean", "nc", "index"),
    "t5x": ("t5x", "sum", "nc", "index"),
    "t5x_lnf": ("t5x", "sum", "nc", "index"),
    "t5x_plain": ("t5x", "sum", "nc", "index"),
    "bce": ("bce", "mean", "nc", "binary"),
    "bce_soft": ("bce", "mean", "nc", "binary"),
}
BIG_VOCAB = {"gemma": (256_000,)}
# planted bugs (float32 cases; `grad_bug_<name>` arrays): the soft-cap's derivative omitted, the
# z-loss factor left out of T5X's backward, the per-token weight applied twice
BUGS = {"gemma": ("nocap",), "t5x": ("nozloss", "sw2"), "t5x_lnf": ("nozloss",),
        "t5x_plain": ("nozloss", "sw2")}


def cases(small: bool) -> list[dict]:
    return common.semantic_cases("jax", VARIANTS, JDT, small, BIG_VOCAB)


def draw(case: dict, small: bool, seed: int):
    """float64 logits (std = scale), int64 labels with ~15% -100 (binary: 0/1 labels, or
    uniform in [0, 1]), per-token weights in [0, 2) with ~20% zeros."""
    rng = np.random.default_rng(seed)
    C = case["C"]
    R = max(8, min(256, (1 << (14 if small else 17)) // C))
    z = rng.standard_normal((R, C)) * case["scale"]
    if case["target"] == "binary":
        y = (rng.random((R, C)) < 0.1).astype(np.float64)
        if case["variant"] == "bce_soft":
            y = rng.random((R, C))
        return z, y, None
    y = rng.integers(0, C, size=R, dtype=np.int64)
    mask = rng.random(R) < 0.15
    mask[-1] = False
    y[mask] = -100
    w = rng.uniform(0.0, 2.0, size=R)
    w[rng.random(R) < 0.2] = 0.0
    w[0] = 1.0
    return z, y, w


def _t5x_xent(logits, targets, z_loss, bug: str = ""):
    """T5X's cross_entropy_with_logits: forward and its custom backward (bug `nozloss`: the
    backward without the z-loss factor)."""

    @jax.custom_vjp
    def xent(lg, tg):
        return _fwd(lg, tg)[0]

    def _fwd(lg, tg):
        max_logit = lg.max(axis=-1, keepdims=True)
        shifted = lg - max_logit
        exp_shifted = jnp.exp(shifted)
        sum_exp = jnp.sum(exp_shifted, axis=-1, keepdims=True)
        log_softmax = shifted - jnp.log(sum_exp)
        loss = -jnp.sum(tg * log_softmax, axis=-1)
        log_z = jnp.squeeze(jnp.log(sum_exp) + max_logit, axis=-1)
        loss += z_loss * jax.lax.square(log_z)
        return loss, (tg, exp_shifted, sum_exp, log_softmax, log_z)

    def _bwd(res, g):
        tg, exp_shifted, sum_exp, log_softmax, log_z = res
        zf = 0.0 if bug == "nozloss" else z_loss
        deriv = jnp.expand_dims(1 + 2 * zf * log_z, -1) * exp_shifted / sum_exp - tg
        g_logits = jnp.expand_dims(g, axis=-1) * deriv
        return jnp.asarray(g_logits, logits.dtype), -jnp.expand_dims(g, axis=-1) * log_softmax

    xent.defvjp(_fwd, _bwd)
    return xent(logits, targets)


def _t5x_loss(x, y, w, eps: float, lnf: bool, bug: str = ""):
    """T5X compute_weighted_cross_entropy (targets y, -100 rows weighted 0): (loss, the
    smoothed targets' entropy it subtracts per token)."""
    V = x.shape[-1]
    confidence = 1.0 - eps
    low = (1.0 - confidence) / (V - 1)
    constant = -(confidence * jnp.log(confidence) + (V - 1) * low * jnp.log(low + 1e-20))
    soft = jax.nn.one_hot(jnp.where(y < 0, 0, y), V, dtype=x.dtype) * (confidence - low) + low
    soft = soft.astype(x.dtype)
    per = (_t5x_xent(x, soft, ZETA, bug) - constant) * (w * w if bug == "sw2" else w)
    total = jnp.sum(per)
    return (total / jnp.sum(w) if lnf else total), constant


def forward(case: dict, x, y, w, bug: str = ""):
    """(loss, ce_check options, extra arrays, entropy constant or None) of the case's code;
    `bug` (see BUGS) changes the loss differentiated, never the options or arrays returned."""
    v = case["variant"]
    if v == "gemma":
        z = jnp.tanh(x / CAP) * CAP
        if bug == "nocap":  # the same values, the backward as if there were no cap
            z = x + jax.lax.stop_gradient(z - x)
        keep = y != -100
        per = optax.softmax_cross_entropy_with_integer_labels(z.astype(jnp.float32),
                                                              jnp.where(keep, y, 0))
        m = keep.astype(jnp.float32)
        return (jnp.sum(per * m) / jnp.sum(m), dict(softcap=CAP, reduction="mean"), {}, None)
    if v.startswith("t5x"):
        eps = 0.0 if v == "t5x_plain" else EPS_LS
        wj = jnp.asarray(w * (y != -100), x.dtype)
        loss, const = _t5x_loss(x, y, wj, eps, v == "t5x_lnf", bug)
        opts = dict(z_loss=ZETA, reduction="sum")
        if eps:
            opts.update(label_smoothing=eps, smoothing_form="others")
        if v == "t5x_lnf":
            opts["denominator"] = float(np.sum(to_np(wj).astype(np.float64)))
        return loss, opts, {"sample_weight": to_np(wj).astype(np.float64)}, (const if eps else None)
    return (jnp.mean(optax.sigmoid_binary_cross_entropy(x, y)), dict(reduction="mean"), {}, None)


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        z64, y64, w64 = draw(case, small, seed)
        dt = JDT[case["dtype"]]
        x = jnp.asarray(z64, dtype=dt)
        y = jnp.asarray(y64, dtype=dt) if case["target"] == "binary" else jnp.asarray(y64)

        def f(xx):
            return forward(case, xx, y, w64)[0]

        loss, grad = jax.value_and_grad(f)(x)
        _, opts, extra, const = forward(case, x, y, w64)
        arrays = dict(extra)
        for bug in BUGS.get(case["variant"], ()) if case["dtype"] == "f32" else ():
            arrays["grad_bug_" + bug] = to_np(jax.grad(
                lambda xx, b=bug: forward(case, xx, y, w64, b)[0])(x)).astype(np.float32)
        saved_loss = to_np(loss).astype(np.float32)
        if const is not None:  # T5X's loss is the cross-entropy minus the targets' entropy
            arrays["loss_kl"] = saved_loss
            den = opts.get("denominator", 1.0)
            sw = extra["sample_weight"]
            saved_loss = np.float32(float(saved_loss) + float(np.asarray(const, np.float64))
                                    * float(sw.sum()) / den)
        ce_check = dict(opts, precision=case["dtype"],
                        **({"ignore_index": -100} if case["target"] == "index" else {}),
                        **{k: k for k in extra})
        labels = to_np(y).astype(np.float32) if case["target"] == "binary" else y64
        common.write_case(
            outdir, case, logits=to_np(x).astype(np.float32), labels=labels,
            grad=to_np(grad).astype(np.float32), loss=saved_loss, axis=-1,
            precision=case["dtype"], seed=seed, arrays_extra=arrays, ce_check=ce_check,
            meta_extra=dict(version=jax.__version__, optax=optax.__version__,
                            shape=list(z64.shape), loss_dtype=str(loss.dtype),
                            grad_dtype=str(grad.dtype)))
    return one


def main():
    args = common.parse_args("jax_semantic_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
