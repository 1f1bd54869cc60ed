"""TensorFlow / Keras cross-entropy gradients for ce-check calibration (venv with tensorflow-cpu, numpy).

    python tf_cases.py OUTDIR [--small] [--only SUBSTR]

Calls (gradient w.r.t. the logits through tf.GradientTape):
  scce  keras.losses.SparseCategoricalCrossentropy(from_logits=True)   (mean: sum_over_batch_size)
        variant ignore: ignore_class=-100
  nn    tf.nn.sparse_softmax_cross_entropy_with_logits, then tf.reduce_mean / tf.reduce_sum
  cce   keras.losses.CategoricalCrossentropy(from_logits=True) on probability targets
        (variant prob_smooth: label_smoothing=0.1)
float32 and float16 logits. Keras losses with dtype=None compute in floatx (float32): float16
logits are cast up inside the loss and the float16 gradient is the float32 one rounded.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TDT = {"f32": tf.float32, "f16": tf.float16}


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        z64, y, t64, w64, axis = common.draw(case, small, seed)
        dt = TDT[case["dtype"]]
        tag, var, red = case["call_tag"], case["variant"], case["reduction"]
        x = tf.constant(z64, dtype=dt)
        labels_saved = y
        if tag == "scce":
            kw = dict(from_logits=True, axis=axis)
            if var == "ignore":
                kw["ignore_class"] = -100
            fn = keras.losses.SparseCategoricalCrossentropy(**kw)
            yt = tf.constant(y)
            call = f"keras.losses.SparseCategoricalCrossentropy({', '.join(f'{k}={v}' for k, v in kw.items())})"

            def total(x):
                return fn(yt, x)
        elif tag == "nn":
            yt = tf.constant(y)
            call = "tf.nn.sparse_softmax_cross_entropy_with_logits + tf.reduce_" + ("sum" if red == "sum" else "mean")

            def total(x):
                per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yt, logits=x)
                return tf.reduce_sum(per) if red == "sum" else tf.reduce_mean(per)
        else:  # cce, probability targets
            tt = tf.cast(tf.constant(t64), dt)
            labels_saved = tt.numpy().copy()
            kw = dict(from_logits=True, axis=axis)
            if "smooth" in var:
                kw["label_smoothing"] = 0.1
            fn = keras.losses.CategoricalCrossentropy(**kw)
            call = f"keras.losses.CategoricalCrossentropy({', '.join(f'{k}={v}' for k, v in kw.items())})"

            def total(x):
                return fn(tt, x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = total(x)
        grad = tape.gradient(loss, x)
        common.write_case(
            outdir, case, logits=x.numpy(), labels=labels_saved, grad=grad.numpy(), loss=loss.numpy(),
            axis=axis, precision=case["dtype"], seed=seed,
            meta_extra=dict(version=f"tensorflow {tf.__version__}, keras {keras.__version__}", call=call,
                            target_kind=case["target"], loss_dtype=loss.dtype.name,
                            grad_dtype=grad.dtype.name))
    return one


def main():
    args = common.parse_args("tf_cases.py")
    variants = [
        dict(tag="scce", variant="ignore"),
        dict(tag="nn", variant="", reduction="sum"),
        dict(tag="cce", variant="prob", target="prob"),
        dict(tag="cce", variant="prob_smooth", target="prob"),
    ]
    cases = common.grid("tf", ("f32", "f16"), ("last",), {"scce": "index", "nn": "index"},
                        small=args.small, variants=variants, variant_dtypes=("f32",))
    common.run(cases, args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
