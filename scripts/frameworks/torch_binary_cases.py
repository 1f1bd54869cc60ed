"""PyTorch F.binary_cross_entropy_with_logits gradients for ce-check's sigmoid BCE check (runs in
a venv with torch + numpy).

    python torch_binary_cases.py OUTDIR [--small] [--only SUBSTR]

One OUTDIR/<case>.npz (+ .json) per case, written as common.py does (`pos_weight` as one more
array; `meta.ce_check` holds check_binary's kwargs, with `weight`/`pos_weight` naming the arrays).
dtypes f32, f16, bf16 (bf16 saved widened exactly to float32, `precision` bf16). Shapes (N, K)
with K in {1, 10, 1000, 32000} and (N, K, d) (d = 8); logit std 1, 5, 30; at most 2^19 logits.
Base cases: hard 0/1 labels, reduction mean. Variants: sum, none, weight (broadcast along K, or
the logits' full shape), pos_weight (below 1, large, mixed; one value), soft labels in [0, 1]
(exact 0 and 1 included) and combinations. pos_weight runs along the last axis, or (variant
`pw_axis1`, (N, K, d) logits only) along axis 1 as a (K, 1) array: PyTorch broadcasts it like the
target, and so does ce-check.

fixtures/binary_frameworks/torch/ (tests/test_binary_frameworks.py) is `--small --only _C10_` plus
`--small --only f32_nc_C1000_s30_mean_pw_small`, `bf16_...` and the `_C10_` cases of `--small
--only pw_axis1`, without the .json files.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TDT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SHAPES = (("nc", 1), ("nc", 10), ("nc", 1000), ("nc", 32_000), ("ncd", 10), ("ncd", 1000),
          ("ncd", 32_000))
VARIANT_SHAPES = (("nc", 1), ("nc", 10), ("nc", 1000), ("nc", 32_000), ("ncd", 1000))
SCALES = (1.0, 5.0, 30.0)
VARIANT_SCALES = (1.0, 30.0)
# variant -> (reduction, labels, weight, pos_weight)
VARIANTS = {
    "sum": ("sum", "hard", None, None),
    "none": ("none", "hard", None, None),
    "weight": ("mean", "hard", "k", None),
    "weight_full": ("mean", "hard", "full", None),
    "pw_small": ("mean", "hard", None, "small"),
    "pw_large": ("mean", "hard", None, "large"),
    "pw_one": ("mean", "hard", None, "one"),
    "weight_pw": ("mean", "hard", "k", "mixed"),
    "soft": ("mean", "soft", None, None),
    "soft_pw": ("mean", "soft", None, "mixed"),
    "soft_none": ("none", "soft", None, None),
    "soft_weight_pw_sum": ("sum", "soft", "k", "mixed"),
    "soft_weight_pw_none": ("none", "soft", "full", "mixed"),
    "pw_axis1": ("mean", "soft", None, "axis1"),
}
AXIS1_SHAPES = (("ncd", 10), ("ncd", 1000))  # pw_axis1: pos_weight (K, 1) on (N, K, d)


def to_np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()  # exact widening
    return t.numpy().copy()


def cases(small: bool) -> list[dict]:
    shapes = SHAPES[:3] if small else SHAPES
    vshapes = VARIANT_SHAPES[:3] if small else VARIANT_SHAPES
    out = [dict(framework="torch", call_tag="bce", dtype=dt, layout=lay, C=K, scale=s,
                reduction="mean", variant="", target="binary")
           for dt in TDT for lay, K in shapes for s in SCALES]
    for v, (red, *_rest) in VARIANTS.items():
        out += [dict(framework="torch", call_tag="bce", dtype=dt, layout=lay, C=K, scale=s,
                     reduction=red, variant=v, target="binary")
                for dt in TDT for lay, K in (AXIS1_SHAPES if v == "pw_axis1" else vshapes)
                for s in VARIANT_SCALES]
    return out


def shape_of(case: dict, small: bool) -> tuple[int, ...]:
    K = case["C"]
    R = common.rows_for(K, False) if not small else max(8, min(64, (1 << 14) // K))
    if case["layout"] == "ncd":
        return (max(1, R // common.D_AXIS1), K, common.D_AXIS1)
    return (R, K)


def draw(case: dict, small: bool, seed: int):
    """float64 logits (std = scale), labels, weight (or None), pos_weight (or None)."""
    rng = np.random.default_rng(seed)
    shape = shape_of(case, small)
    _red, labels, weight, pos_weight = VARIANTS.get(case["variant"], ("mean", "hard", None, None))
    z = rng.standard_normal(shape) * case["scale"]
    if labels == "hard":
        y = (rng.random(shape) < 0.3).astype(np.float64)
    else:
        y = rng.random(shape)
        u = rng.random(shape)
        y[u < 0.1] = 0.0
        y[u > 0.9] = 1.0
    w = None
    if weight == "k":
        wshape = (shape[1],) if len(shape) == 2 else (shape[1], 1)
        w = rng.uniform(0.5, 2.0, size=wshape)
    elif weight == "full":
        w = rng.uniform(0.0, 2.0, size=shape)
    last = shape[-1]
    pw = {None: None,
          "small": lambda: rng.uniform(0.05, 0.9, size=last),
          "large": lambda: rng.uniform(10.0, 300.0, size=last),
          "mixed": lambda: np.exp(rng.uniform(np.log(0.1), np.log(50.0), size=last)),
          "one": lambda: np.array([3.0]),
          "axis1": lambda: np.exp(rng.uniform(np.log(0.1), np.log(50.0), size=(shape[1], 1)))
          }[pos_weight]
    return z, y, w, (pw() if pw else None)


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        torch.manual_seed(seed)
        z64, y64, w64, pw64 = draw(case, small, seed)
        dt = TDT[case["dtype"]]
        red = case["reduction"]
        x = torch.from_numpy(z64).to(dt).requires_grad_(True)
        y = torch.from_numpy(y64).to(dt)
        w = None if w64 is None else torch.from_numpy(w64).to(dt)
        pw = None if pw64 is None else torch.from_numpy(pw64).to(dt)
        loss = F.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=pw, reduction=red)
        (loss.sum() if red == "none" else loss).backward()
        extra = {} if pw is None else {"pos_weight": to_np(pw).astype(np.float64)}
        store = np.float16 if case["dtype"] == "f16" else np.float32
        common.write_case(
            outdir, case, logits=to_np(x).astype(store), labels=to_np(y),
            grad=to_np(x.grad).astype(store), loss=to_np(loss).astype(store),
            weight=None if w is None else to_np(w).astype(np.float64), axis=-1,
            precision=case["dtype"], seed=seed, arrays_extra=extra,
            ce_check=dict(reduction=red, precision=case["dtype"],
                          weight="weight" if w is not None else None,
                          pos_weight="pos_weight" if pw is not None else None),
            meta_extra=dict(version=torch.__version__, call="F.binary_cross_entropy_with_logits",
                            shape=list(z64.shape), loss_dtype=str(loss.dtype),
                            grad_dtype=str(x.grad.dtype), torch_threads=torch.get_num_threads()))
    return one


def main():
    args = common.parse_args("torch_binary_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
