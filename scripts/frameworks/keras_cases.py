"""Keras 3's own SparseCategoricalCrossentropy (TensorFlow backend), differentiated by
tf.GradientTape on CPU, for ce-check's options (runs in a venv with keras, tensorflow, numpy).

    python keras_cases.py OUTDIR [--small] [--only SUBSTR] [--fixtures]

`keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=k)(y, z)` with the
default reduction "sum_over_batch_size": Keras zeroes the ignored tokens' logits and losses and
marks them with a mask; `apply_mask` then weights each valid token total / valid (0 for the
ignored) and the sum is divided by total, so the loss is the mean over the valid tokens. With
`sample_weight=w` the weights multiply that: sum(w l) / valid, divided by the count of valid
tokens, not by their weights' sum. The Loss computes in its dtype (float32) whatever the
logits' dtype; a bf16 gradient is float32's, rounded once by the cast's backward.

- `plain`       no ignore_class -> reduction mean;
- `ignore0`     ignore_class=0 (a padding id that is also a class) -> ignore_index 0, mean;
- `ignore_neg`  ignore_class=-1 (a void label) -> ignore_index -1, mean;
- `sw`          ignore_class=-1 and sample_weight w in [0, 2) (~20 % zeros) -> ignore_index -1,
  sample_weight w, reduction sum, denominator = the valid count.

Logits (2, T, C); float32 and bfloat16 (saved widened exactly to float32); std 1, 10, 30; C 10,
1000, 32000; at most 2^17 logits per case (--small: 2^14), at least 8 tokens; ~15 % of the
tokens ignored (the first always). float32 cases hold planted bugs `grad_bug_<name>`: the mean
over every token (`total`: reduction "sum" / total), the ignored tokens kept (`noignore`:
ignore_class=None on the same labels, for `ignore0`).

fixtures/frameworks_semantics/keras/ (tests/test_semantic_frameworks.py): `--small --fixtures`,
without the .json files.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import library_cases  # noqa: E402

TDT = {"f32": tf.float32, "bf16": tf.bfloat16}
# variant -> (family, reduction, layout): the ce-check reduction
VARIANTS = {
    "plain": ("ce", "mean", "btv"), "ignore0": ("ce", "mean", "btv"),
    "ignore_neg": ("ce", "mean", "btv"), "sw": ("ce", "sum", "btv"),
}
IGNORE = {"plain": None, "ignore0": 0, "ignore_neg": -1, "sw": -1}
SCALES = (1.0, 10.0, 30.0)
BUGS = {"plain": (), "ignore0": ("total", "noignore"), "ignore_neg": ("total",), "sw": ("total",)}


def cases(small: bool) -> list[dict]:
    return [c for c in common.semantic_cases("keras", VARIANTS, TDT, small) if c["scale"] in SCALES]


def draw(case: dict, small: bool, seed: int):
    """float64 logits (2, T, C) (std = scale), labels with ~15 % the ignored class (the first
    token always; labels 1.. for the others when the ignored class is 0), sample weights."""
    rng = np.random.default_rng(seed)
    C = case["C"]
    n = max(8, min(256, (1 << (14 if small else 17)) // C))
    z = rng.standard_normal((2, n // 2, C)) * case["scale"]
    y = rng.integers(1, C, size=(2, n // 2), dtype=np.int64)
    off = rng.random(y.shape) < 0.15
    off.flat[0], off.flat[-1] = True, False
    k = IGNORE[case["variant"]]
    if k is not None:
        y[off] = k
    w = rng.uniform(0.0, 2.0, size=y.shape)
    w[rng.random(y.shape) < 0.2] = 0.0
    return z, y, w


def loss_fn(v: str, bug: str = ""):
    k = None if bug == "noignore" else IGNORE[v]
    red = "sum" if bug == "total" else "sum_over_batch_size"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=k,
                                                      reduction=red)


def value_and_grad(v: str, x0, y, w, bug: str = ""):
    x = tf.Variable(x0)
    with tf.GradientTape() as tape:
        kw = {"sample_weight": w} if v == "sw" else {}
        loss = loss_fn(v, bug)(y, x, **kw)
        if bug == "total":
            loss = loss / float(np.prod(y.shape))
    return loss, tape.gradient(loss, x)


def to_np(t) -> np.ndarray:
    return tf.cast(t, tf.float32).numpy() if t.dtype == tf.bfloat16 else t.numpy()


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        v, dt = case["variant"], case["dtype"]
        z64, y64, w64 = draw(case, small, seed)
        x0 = tf.cast(tf.constant(z64), TDT[dt])
        y = tf.constant(y64)
        w = tf.constant(w64, dtype=tf.float32)
        loss, grad = value_and_grad(v, x0, y, w)
        opts: dict = dict(reduction=case["reduction"], precision=dt)
        k = IGNORE[v]
        if k is not None:
            opts["ignore_index"] = k
        arrays = {}
        if v == "sw":
            arrays["sample_weight"] = w.numpy().astype(np.float64)
            opts.update(sample_weight="sample_weight", denominator=float((y64 != k).sum()))
        for bug in BUGS[v] if dt == "f32" else ():
            arrays["grad_bug_" + bug] = to_np(value_and_grad(v, x0, y, w, bug)[1]).astype(np.float32)
        common.write_case(
            outdir, case, logits=to_np(x0).astype(np.float32), labels=y64,
            grad=to_np(grad).astype(np.float32), loss=to_np(loss).astype(np.float32), axis=-1,
            precision=dt, seed=seed, arrays_extra=arrays, ce_check=opts,
            meta_extra=dict(keras=keras.__version__, backend=keras.backend.backend(),
                            tensorflow=tf.__version__, shape=list(z64.shape),
                            ignore_class=k, loss_dtype=loss.dtype.name, grad_dtype=grad.dtype.name))
    return one


def main():
    library_cases.main("keras_cases.py", cases, compute)


if __name__ == "__main__":
    main()
