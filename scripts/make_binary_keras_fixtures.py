"""Real Keras fixtures for `ce-check binary` (fixtures/binary_semantics/keras_real_*.npz).

Run with a Python that has TensorFlow and Keras 3 (never torch, never ce_cli):

    PYTHONPATH= python scripts/make_binary_keras_fixtures.py

Keras computes in float64 (`dtype="float64"`): `keras.losses.BinaryCrossentropy(from_logits=True,
label_smoothing=A, reduction=R)` with `sample_weight`, the gradient w.r.t. the RAW logits by
`tf.GradientTape` (the logit scale written out before the loss). The layout is that of
scripts/make_binary_fixtures.py's training-code cases: inputs, `loss`, `grad`, `call` (the
check_binary settings that express the call, JSON) and `source`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "binary_semantics"


def keras_case(name: str, call: dict, x, y, s, *, smoothing: float, reduction: str,
               scale: float = 1.0) -> None:
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing,
                                              reduction=reduction, dtype="float64")
    xv = tf.Variable(np.asarray(x, dtype=np.float64))
    with tf.GradientTape() as tape:
        loss = loss_fn(tf.constant(y), xv * scale, sample_weight=tf.constant(s))
    grad = tape.gradient(loss, xv).numpy()
    source = (f"real: keras {keras.__version__} BinaryCrossentropy(from_logits=True, "
              f"label_smoothing={smoothing}, reduction='{reduction}') with sample_weight")
    np.savez_compressed(OUT / f"{name}.npz", logits=np.asarray(x), labels=np.asarray(y),
                        sample_weight=np.asarray(s), loss=np.asarray(loss.numpy(), np.float64),
                        grad=grad.astype(np.float64), call=np.array(json.dumps(call, sort_keys=True)),
                        source=np.array(source))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261130)
    N, K = 8, 5
    x, y = rng.normal(size=(N, K)) * 3, (rng.random((N, K)) < 0.4).astype(np.float64)
    s = rng.uniform(0.0, 2.0, N)
    # sum_over_batch_size: sum_n s_n mean_k l_nk / N = sum s l / (N K)
    keras_case("keras_real_sum_over_batch_size",
               {"label_smoothing": 0.2, "reduction": "sum", "denominator": float(N * K)},
               x, y, s, smoothing=0.2, reduction="sum_over_batch_size")
    x = rng.normal(size=(N, K)) * 3
    keras_case("keras_real_mean_with_sample_weight", {"label_smoothing": 0.1, "logit_scale": 0.5},
               x, rng.random((N, K)), s, smoothing=0.1, reduction="mean_with_sample_weight",
               scale=0.5)
    print(f"wrote 2 cases to {OUT} (keras {keras.__version__}, tensorflow {tf.__version__})")


if __name__ == "__main__":
    main()
