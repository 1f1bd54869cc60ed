"""PyTorch autograd gradients of the training-code losses, for ce-check's options (runs in a venv
with torch + numpy).

    python torch_semantic_cases.py OUTDIR [--small] [--only SUBSTR]

Each case is written the way real training code writes it, computed by autograd in the stated
dtype (f32, f16, bf16; bf16 saved widened exactly to float32), with `meta.ce_check` the
check_grad options that express it (array options name the .npz arrays: `sample_weight`):

- `softcap_hf`  Gemma-2 / HF: z = cap * tanh(x / cap) in the model dtype (cap 30), then
  `ForCausalLMLoss` (`.float()`, labels shifted, -100 ignored, sum / num_items_in_batch) on
  (B, T, V) -> softcap, shift_labels, reduction sum, denominator;
- `softcap`     the same cap in the model dtype, F.cross_entropy mean in the model dtype (native);
- `zloss`       PaLM / OLMo / flash-attn / Liger: lse = logsumexp(x.float()), CE of x.float()
  plus z * lse^2 (z 1e-4), mean over non-ignored tokens -> z_loss (`zloss_native`: lse and CE
  in the model dtype);
- `softcap_hf_accum` as `softcap_hf` with num_items_in_batch of 4 accumulated micro-batches;
- `scale`       Cohere: x * logit_scale (1/16, and 0.3) in the model dtype, CE in the model
  dtype (`native`) or `.float()` -> logit_scale;
- `sw`          (F.cross_entropy(reduction='none') * w).sum() / w.sum() with per-token weights
  (zeros included) -> sample_weight (mean), or (..).sum() / N -> sum + denominator;
- `smooth`      label_smoothing 0.1 (torch form), and the `others` form written by hand
  (1 - eps on the label, eps / (C - 1) elsewhere) -> label_smoothing, smoothing_form;
- `combo`       Liger's softcap + z-loss + smoothing (cap 30, z 1e-4, smoothing 0.1), float32;
- `autocast`    the plain loss and the softcap under torch.autocast('cpu', bf16) from bf16 logits.

float32 cases also hold `grad_bug_nocap` / `grad_bug_nozloss` / `grad_bug_sw2`: autograd's
gradient of the same code with the bug (see BUGS), for the planted-bug test.

Logit std 1, 10, 30, 50; C 10, 1000, 32000 (and 128,256 / 256,000 for the options of BIG_VOCAB);
at most 2^17 logits per case (--small: 2^14), at least 8 rows.
fixtures/frameworks_semantics/torch/ (tests/test_semantic_frameworks.py) is a subset of
`--small`, without the .json files.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from torch_binary_cases import to_np  # noqa: E402  (detached, exactly widened to float32)

from common import SEM_CAP as CAP, SEM_EPS_LS as EPS_LS, SEM_ZETA as ZETA  # noqa: E402

TDT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# variant -> (option family, reduction, layout)
VARIANTS = {
    "softcap_hf": ("softcap_hf", "sum", "btv"),
    "softcap": ("softcap", "mean", "nc"),
    "zloss": ("zloss", "mean", "nc"),
    "zloss_btv": ("zloss", "mean", "btv"),
    "scale16_native": ("scale", "mean", "nc"),
    "scale03_float": ("scale", "sum", "nc"),
    "sw_mean": ("sw", "mean", "btv"),
    "sw_den": ("sw", "sum", "nc"),
    "smooth_torch_softcap": ("smooth", "mean", "nc"),
    "smooth_others_zloss": ("smooth", "sum", "btv"),
    "combo": ("combo", "mean", "nc"),
    "autocast_plain": ("autocast", "mean", "nc"),
    "autocast_softcap": ("autocast", "mean", "btv"),
    "softcap_hf_accum": ("softcap_hf", "sum", "btv"),
    "zloss_native": ("zloss", "mean", "nc"),
}
# planted bugs (float32 cases; `grad_bug_<name>` arrays): the softcap's derivative omitted, the
# z-loss term omitted, the sample weight applied twice
BUGS = {v: tuple(b for b, on in (("nocap", "softcap" in v or v == "combo"),
                                 ("nozloss", "zloss" in v or v == "combo"),
                                 ("sw2", v.startswith("sw"))) if on) for v in VARIANTS}
# Gemma's (256,000) and Llama-3's (128,256) vocabularies for the options real code uses them with
BIG_VOCAB = {"softcap_hf": (256_000,), "softcap_hf_accum": (256_000,), "combo": (256_000,),
             "zloss": (128_256,), "sw_mean": (128_256,), "smooth_torch_softcap": (128_256,)}
ONLY_DTYPES = {"combo": ("f32", "bf16"), "autocast_plain": ("bf16",), "autocast_softcap": ("bf16",)}


def cases(small: bool) -> list[dict]:
    return common.semantic_cases("torch", VARIANTS, TDT, small, BIG_VOCAB, ONLY_DTYPES)


def shape_of(case: dict, small: bool) -> tuple[int, ...]:
    C = case["C"]
    R = max(8, min(256, (1 << (14 if small else 17)) // C))
    if case["layout"] == "btv":
        return (2, R // 2, C)
    return (R, C)


def draw(case: dict, small: bool, seed: int):
    """float64 logits (std = scale), int64 labels with ~15% -100, per-token weights (zeros
    included)."""
    rng = np.random.default_rng(seed)
    shape = shape_of(case, small)
    z = rng.standard_normal(shape) * case["scale"]
    y = rng.integers(0, shape[-1], size=shape[:-1], dtype=np.int64)
    mask = rng.random(y.shape) < 0.15
    mask.flat[-1] = False
    if case["layout"] == "btv":
        mask[:, 1] = False  # a shifted label survives in each sequence
    y[mask] = -100
    w = rng.uniform(0.0, 2.0, size=y.shape)
    w[rng.random(y.shape) < 0.2] = 0.0
    w.flat[0] = 1.0
    return z, y, w


def _cap(x: torch.Tensor, cap: float, bug: str = "") -> torch.Tensor:
    """Gemma-2's final_logit_softcapping, in the tensor's dtype (bug `nocap`: the same values,
    the backward as if there were no cap)."""
    z = cap * torch.tanh(x / cap)
    return x + (z - x).detach() if bug == "nocap" else z


def _others_smoothing(zf: torch.Tensor, y: torch.Tensor, eps: float, red: str) -> torch.Tensor:
    """1 - eps on the label, eps / (C - 1) elsewhere (Megatron / T5X), ignored rows dropped."""
    C = zf.shape[-1]
    keep = y != -100
    logp = torch.log_softmax(zf, dim=-1)
    q = torch.full_like(logp, eps / (C - 1))
    q.scatter_(-1, torch.where(keep, y, 0).unsqueeze(-1), 1.0 - eps)
    per = -(q * logp).sum(-1) * keep
    return per.sum() / keep.sum() if red == "mean" else per.sum()


def forward(case: dict, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, bug: str = ""):
    """(loss, ce_check options, extra arrays) of the case's training code on raw logits x; `bug`
    (see BUGS) changes the loss differentiated, never the options or arrays returned."""
    v, red, C = case["variant"], case["reduction"], case["C"]
    zeta = 0.0 if bug == "nozloss" else ZETA
    wl = w * w if bug == "sw2" else w
    keep = y != -100
    flat = lambda t: t.reshape(-1, C)  # noqa: E731
    if v in ("softcap_hf", "softcap_hf_accum"):
        z = _cap(x, CAP, bug).float()
        sl = F.pad(y, (0, 1), value=-100)[..., 1:]
        # num_items_in_batch: this batch's tokens, or (accum) those of 4 accumulated micro-batches
        n_items = int((sl != -100).sum()) * (4 if v == "softcap_hf_accum" else 1)
        loss = F.cross_entropy(flat(z), sl.reshape(-1), ignore_index=-100, reduction="sum") / n_items
        return loss, dict(softcap=CAP, shift_labels=True, reduction="sum", denominator=n_items), {}
    if v == "softcap":
        return (F.cross_entropy(flat(_cap(x, CAP, bug)), y.reshape(-1), reduction=red),
                dict(softcap=CAP, reduction=red), {})
    if v in ("zloss", "zloss_btv"):
        zf = flat(x.float())
        lse = torch.logsumexp(zf, dim=-1)
        ce = F.cross_entropy(zf, y.reshape(-1), reduction="none")
        m = keep.reshape(-1).float()
        loss = ((ce + zeta * lse**2) * m).sum() / m.sum()
        return loss, dict(z_loss=ZETA, reduction="mean"), {}
    if v == "zloss_native":  # lse and CE in the model dtype, no upcast
        lse = torch.logsumexp(flat(x), dim=-1)
        ce = F.cross_entropy(flat(x), y.reshape(-1), reduction="none")
        m = keep.reshape(-1).to(x.dtype)
        loss = ((ce + zeta * lse**2) * m).sum() / m.sum()
        return loss, dict(z_loss=ZETA, reduction="mean"), {}
    if v == "scale16_native":
        return (F.cross_entropy(flat(x * 0.0625), y.reshape(-1), reduction=red),
                dict(logit_scale=0.0625, reduction=red), {})
    if v == "scale03_float":
        return (F.cross_entropy(flat((x * 0.3).float()), y.reshape(-1), reduction=red),
                dict(logit_scale=float(np.float32(0.3)), reduction=red), {})  # the scalar in float opmath
    if v in ("sw_mean", "sw_den"):
        ce = F.cross_entropy(flat(x), y.reshape(-1), reduction="none").reshape(y.shape)
        wk = w * keep
        if v == "sw_mean":
            return ((ce * wl).sum() / wk.sum(), dict(reduction="mean"), {"sample_weight": w})
        n = int(keep.sum())
        return ((ce * wl).sum() / n, dict(reduction="sum", denominator=n), {"sample_weight": w})
    if v == "smooth_torch_softcap":
        return (F.cross_entropy(flat(_cap(x, CAP, bug)), y.reshape(-1), label_smoothing=EPS_LS,
                                reduction=red),
                dict(softcap=CAP, label_smoothing=EPS_LS, reduction=red), {})
    if v == "smooth_others_zloss":
        zf = flat(x.float())
        lse = torch.logsumexp(zf, dim=-1)
        yy = y.reshape(-1)
        loss = _others_smoothing(zf, yy, EPS_LS, red) + zeta * (lse**2 * (yy != -100)).sum()
        return loss, dict(label_smoothing=EPS_LS, smoothing_form="others", z_loss=ZETA,
                          reduction=red), {}
    if v == "combo":
        z = flat(_cap(x.float(), CAP, bug))  # Liger: cap, z-loss and smoothing in float32 on the row
        lse = torch.logsumexp(z, dim=-1)
        ce = F.cross_entropy(z, y.reshape(-1), label_smoothing=EPS_LS, reduction="none")
        m = keep.reshape(-1).float()
        loss = ((ce + zeta * lse**2) * m).sum() / m.sum()
        return loss, dict(softcap=CAP, z_loss=ZETA, label_smoothing=EPS_LS, reduction="mean"), {}
    if v == "autocast_plain":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(flat(x), y.reshape(-1), reduction=red), dict(reduction=red), {}
    if v == "autocast_softcap":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(flat(_cap(x, CAP, bug)), y.reshape(-1), reduction=red)
        return loss, dict(softcap=CAP, reduction=red), {}
    raise ValueError(v)


def compute(outdir: str, small: bool):
    def one(case: dict, seed: int):
        torch.manual_seed(seed)
        z64, y64, w64 = draw(case, small, seed)
        dt = TDT[case["dtype"]]
        x = torch.from_numpy(z64).to(dt).requires_grad_(True)
        y = torch.from_numpy(y64)
        w = torch.from_numpy(w64).to(dt)
        loss, opts, extra = forward(case, x, y, w)
        loss.backward()
        for bug in BUGS.get(case["variant"], ()) if case["dtype"] == "f32" else ():
            xb = x.detach().clone().requires_grad_(True)
            forward(case, xb, y, w, bug)[0].backward()
            extra["grad_bug_" + bug] = xb.grad
        store = np.float16 if case["dtype"] == "f16" else np.float32
        arrays = {k: to_np(t).astype(np.float64 if k == "sample_weight" else store)
                  for k, t in extra.items()}
        ce_check = dict(opts, precision=case["dtype"], ignore_index=-100,
                        **{k: k for k in arrays if not k.startswith("grad_bug_")})
        common.write_case(
            outdir, case, logits=to_np(x).astype(store), labels=y64,
            grad=to_np(x.grad).astype(store), loss=to_np(loss).astype(
                np.float16 if loss.dtype == torch.float16 else np.float32), axis=-1,
            precision=case["dtype"], seed=seed, arrays_extra=arrays, ce_check=ce_check,
            meta_extra=dict(version=torch.__version__, shape=list(z64.shape),
                            loss_dtype=str(loss.dtype), grad_dtype=str(x.grad.dtype),
                            torch_threads=torch.get_num_threads()))
    return one


def main():
    args = common.parse_args("torch_semantic_cases.py")
    common.run(cases(args.small), args, compute(args.outdir, args.small))


if __name__ == "__main__":
    main()
