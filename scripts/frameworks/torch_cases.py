"""PyTorch F.cross_entropy gradients for ce-check calibration (runs in a venv with torch + numpy).

    python torch_cases.py OUTDIR [--small] [--only SUBSTR]

One OUTDIR/<case>.npz (+ .json) per case; see common.py. dtypes: f32, f16, bf16 (logits in that
dtype) and autocast-bf16 (a float32 linear layer under torch.autocast("cpu", bfloat16) makes bf16
logits; the gradient w.r.t. those logits is saved). Layouts: (N, C) and (N, C, d) (class_axis 1).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TDT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "autocast-bf16": torch.bfloat16}
PREC = {"f32": "f32", "f16": "f16", "bf16": "bf16", "autocast-bf16": "bf16"}
HIDDEN = 64


def to_np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()  # exact widening
    return t.numpy().copy()


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        torch.manual_seed(seed)
        z64, y, t64, w64, axis = common.draw(case, small, seed)
        dt = TDT[case["dtype"]]
        red = case["reduction"]
        smoothing = 0.1 if "smooth" in case["variant"] else 0.0
        autocast = case["dtype"] == "autocast-bf16"
        if autocast:
            # logits = h @ W^T under autocast: bf16 logits of std ~ scale
            shape = z64.shape
            C = case["C"]
            rng = np.random.default_rng(seed + 7)
            if case["layout"] == "axis1":
                N, _, d = shape
                h = torch.from_numpy(rng.standard_normal((N, d, HIDDEN))).float()
            else:
                h = torch.from_numpy(rng.standard_normal((shape[0], HIDDEN))).float()
            W = torch.from_numpy(rng.standard_normal((C, HIDDEN)) * (case["scale"] / np.sqrt(HIDDEN))).float().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lg = h @ W.T
                if case["layout"] == "axis1":
                    lg = lg.permute(0, 2, 1).contiguous()
                lg.retain_grad()
                wt = torch.from_numpy(w64).float() if w64 is not None else None
                tgt = torch.from_numpy(y) if t64 is None else torch.from_numpy(t64).float()
                loss = F.cross_entropy(lg, tgt, weight=wt, reduction=red, label_smoothing=smoothing)
            logits_t = lg
            computed_loss_dtype = str(loss.dtype)
        else:
            logits_t = torch.from_numpy(z64).to(dt).requires_grad_(True)
            wt = torch.from_numpy(w64).to(dt) if w64 is not None else None
            tgt = torch.from_numpy(y) if t64 is None else torch.from_numpy(t64).to(dt)
            loss = F.cross_entropy(logits_t, tgt, weight=wt, reduction=red, label_smoothing=smoothing)
            computed_loss_dtype = str(loss.dtype)
        (loss.sum() if red == "none" else loss).backward()
        grad = logits_t.grad
        labels = y if t64 is None else to_np(tgt)
        weight = None if wt is None else to_np(wt).astype(np.float64)
        common.write_case(
            outdir, case, logits=to_np(logits_t), labels=labels, grad=to_np(grad), loss=to_np(loss),
            weight=weight, axis=axis, precision=PREC[case["dtype"]], seed=seed,
            meta_extra=dict(version=torch.__version__, call="F.cross_entropy",
                            target_kind=case["target"], loss_dtype=computed_loss_dtype,
                            grad_dtype=str(grad.dtype), torch_threads=torch.get_num_threads()))
    return one


VARIANTS_LAST = ["sum", "none", "ignore", "smooth", "weight", "weight_smooth", "ignore_smooth",
                 "prob", "prob_smooth", "prob_weight"]
VARIANTS_AXIS1 = ["sum", "none", "ignore", "smooth", "prob"]


def variants():
    out = []
    for v in VARIANTS_LAST:
        red = v if v in ("sum", "none") else "mean"
        var = "" if v in ("sum", "none") else v
        tgt = "prob" if v.startswith("prob") else "index"
        out.append(dict(tag="ce", variant=var, reduction=red, target=tgt, layouts=("last",)))
        if v in VARIANTS_AXIS1:
            out.append(dict(tag="ce", variant=var, reduction=red, target=tgt, layouts=("axis1",),
                            classes=(1000, 32_000)))
    return out


def main():
    args = common.parse_args("torch_cases.py")
    cases = common.grid("torch", ("f32", "f16", "bf16", "autocast-bf16"), ("last", "axis1"),
                        {"ce": "index"}, small=args.small, variants=variants(),
                        variant_dtypes=("f32", "bf16"))
    common.run(cases, args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
