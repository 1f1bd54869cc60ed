"""'mean' over nothing: every target ignored, or class weights summing to 0 over the targets, in
each real framework this interpreter imports (PyTorch, Liger-Kernel on Triton's interpreter,
Keras on TensorFlow, PaddlePaddle, MindSpore, tinygrad): the loss and gradient it returns.

    python scripts/frameworks/empty_mean_cases.py OUTDIR   # once in each framework's venv

Each case is OUTDIR/<framework>_<case>.npz with `logits`, `labels`, `grad`, `loss`, optional
`weight`, and `meta` (JSON: framework, version, ignore_index, the convention the loss shows:
"nan" for 0/0, "zero"). tests/test_empty_mean.py checks them with ce-check's `empty_mean`, no
framework imported. Measured 2026-11-30: PyTorch 2.13 and MindSpore 2.10 NaN, Liger 0.8.5,
Keras 3.15 and Paddle 3.3.1 zero, tinygrad 0.14 a NaN loss and a NaN gradient.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys

import numpy as np

IGNORE = -100
SHAPE = (6, 7)   # rows, classes
KERAS_IGNORE = 3  # Keras's ignore_class is a class id


def _inputs(seed: int, ignore: int):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(SHAPE) * 3).astype(np.float32)
    every = np.full(SHAPE[0], ignore, dtype=np.int64)
    some = rng.integers(0, 2, SHAPE[0])  # targets 0 and 1 only: their weights are 0 below
    w = np.array([0.0, 0.0] + [1.0] * (SHAPE[1] - 2), dtype=np.float32)
    return z, every, some, w


def _torch(z, y, w, liger: bool = False):
    import torch
    x = torch.tensor(z, requires_grad=True)
    t = torch.tensor(y)
    if liger:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        loss = LigerCrossEntropyLoss(ignore_index=IGNORE)(x, t)
    else:
        weight = None if w is None else torch.tensor(w)
        loss = torch.nn.functional.cross_entropy(x, t, weight=weight, ignore_index=IGNORE)
    loss.backward()
    return float(loss.detach()), x.grad.numpy()


def _keras(z, y, _w):
    import keras
    import tensorflow as tf
    x = tf.Variable(z)
    fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=KERAS_IGNORE)
    with tf.GradientTape() as tape:
        loss = fn(y, x)
    return float(loss.numpy()), tape.gradient(loss, x).numpy()


def _paddle(z, y, w):
    import paddle
    x = paddle.to_tensor(z, stop_gradient=False)
    weight = None if w is None else paddle.to_tensor(w)
    loss = paddle.nn.functional.cross_entropy(x, paddle.to_tensor(y), weight=weight,
                                              ignore_index=IGNORE, reduction="mean")
    loss.backward()
    return float(loss.numpy()), x.grad.numpy()


def _mindspore(z, y, w):
    import mindspore as ms
    from mindspore import ops
    weight = None if w is None else ms.Tensor(w)
    t = ms.Tensor(y.astype(np.int32))

    def f(x):
        return ops.cross_entropy(x, t, weight=weight, ignore_index=IGNORE, reduction="mean")
    x = ms.Tensor(z)
    return float(f(x).asnumpy()), ms.grad(f)(x).asnumpy()


def _tinygrad(z, y, _w):
    from tinygrad import Tensor
    x = Tensor(z)
    x.requires_grad = True
    loss = x.sparse_categorical_crossentropy(Tensor(y.astype(np.int32)), ignore_index=IGNORE,
                                             reduction="mean")
    loss.backward()
    return float(loss.numpy()), x.grad.numpy()


# framework -> (module to look for, the call, its distribution, does it take class weights)
FRAMEWORKS = {
    "torch": ("torch", _torch, "torch", True),
    "liger": ("liger_kernel", lambda z, y, w: _torch(z, y, w, liger=True), "liger-kernel", False),
    "keras": ("keras", _keras, "keras", False),
    "paddle": ("paddle", _paddle, "paddlepaddle", True),
    "mindspore": ("mindspore", _mindspore, "mindspore", True),
    "tinygrad": ("tinygrad", _tinygrad, "tinygrad", False),
}


def _liger_ready() -> None:
    """Liger's kernels on Triton's CPU interpreter, with liger_cases.py's shims."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import liger_cases  # noqa: F401  (its interpreter shims)


def write(outdir: str, name: str, fw: str, z, y, w, seed: int) -> None:
    _module, call, dist, _ = FRAMEWORKS[fw]
    loss, grad = call(z, y, w)
    ignore = KERAS_IGNORE if fw == "keras" else IGNORE
    meta = {"framework": fw, "version": importlib.metadata.version(dist), "case": name, "seed": seed,
            "ignore_index": ignore, "returns": "nan" if np.isnan(loss) else
            "zero" if loss == 0.0 else repr(loss),
            "grad_finite": bool(np.all(np.isfinite(grad)))}
    arrays = {"logits": z, "labels": y, "grad": np.asarray(grad, dtype=np.float32),
              "loss": np.float64(loss), "meta": np.array([json.dumps(meta)])}
    if w is not None:
        arrays["weight"] = w
    np.savez_compressed(os.path.join(outdir, f"{fw}_{name}.npz"), **arrays)
    print(f"{fw} {meta['version']} {name}: loss {loss!r}, gradient finite {meta['grad_finite']}")


def main(outdir: str) -> int:
    os.makedirs(outdir, exist_ok=True)
    ran = 0
    for seed, (fw, (module, _call, _dist, weighted)) in enumerate(FRAMEWORKS.items()):
        if importlib.util.find_spec(module) is None:
            continue
        if fw == "liger":
            _liger_ready()
        ignore = KERAS_IGNORE if fw == "keras" else IGNORE
        z, every, some, w = _inputs(seed, ignore)
        write(outdir, "all_ignored", fw, z, every, None, seed)
        if weighted:
            write(outdir, "zero_weights", fw, z, some, w, seed)
        ran += 1
    print(f"{ran} frameworks")
    return 0 if ran else 1


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) of one case file (numpy only)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
        meta = json.loads(str(f["meta"][0]))
    return arrays, meta


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
