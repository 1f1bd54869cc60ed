"""Write fixtures/linear/: fused linear cross-entropy cases computed by PyTorch.

    python scripts/make_linear_fixtures.py   (where torch is installed)

- hidden.npy (2, 24, 32), weight.npy (200, 32), bias.npy (200,), labels.npy (2, 24) with two
  ignored tokens (-100): the README's worked example, in float32; grad_hidden.npy,
  grad_weight.npy, grad_bias.npy, loss.npy from `F.cross_entropy(F.linear(h, W, b), y)` and
  backward in float32; grad_weight_bad.npy: one vocabulary block (rows 64-127) accumulated twice.
- bf16.npz: the same in bfloat16 (stored as float32, exactly).
- parity.npz: float64 cases `<case>/<array>` with and without bias and with the options, for the
  parity tests (losses and all three gradients to ~1e-12 relative).
- semantics.npz: float64 cases `<case>/<array>` with the training-code options (z-loss, softcap,
  logit scale, the others' smoothing form, a denominator, sample weights, shifted labels), the
  loss written out in PyTorch (`extended_loss`, checked against F.cross_entropy without the
  options); `<case>/<grad>_without` are the gradients of the same inputs without the option
  (what a kernel that forgot the term returns).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "linear"

CASES = {
    "bias": dict(bias=True),
    "nobias": dict(bias=False),
    "sum_smooth": dict(bias=True, reduction="sum", label_smoothing=0.1),
    "weighted": dict(bias=False, class_weight=True, ignore=True),
    "none": dict(bias=True, reduction="none", ignore=True),
    "weighted_smooth": dict(bias=True, class_weight=True, label_smoothing=0.2, ignore=True),
}


def inputs(seed: int, B: int = 2, T: int = 24, H: int = 32, V: int = 200, ignore: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        y[0, 3] = -100
        y[1, 7] = -100
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return h, w, b, y, cw


def run(h, w, b, y, *, reduction="mean", label_smoothing=0.0, cw=None):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    z = F.linear(h, w, b)
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), weight=cw,
                           reduction=reduction, label_smoothing=label_smoothing)
    (loss.sum() if reduction == "none" else loss).backward()
    if reduction == "none":
        loss = loss.reshape(y.shape)
    out = {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}
    if b is not None:
        out["grad_bias"] = b.grad
    return out


SEMANTICS = {
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "logit_scale": dict(logit_scale=0.7),
    "smoothing_others": dict(label_smoothing=0.2, smoothing_form="others"),
    "denominator": dict(denominator=37.0, reduction="sum"),
    "sample_weight": dict(sample_weight=True),
    "shift_labels": dict(shift_labels=True),
    "all": dict(z_loss=1e-3, softcap=4.0, logit_scale=1.3, sample_weight=True, label_smoothing=0.1,
                class_weight=True),
}


def extended_loss(h, w, b, y, *, z_loss=0.0, softcap=None, logit_scale=1.0, label_smoothing=0.0,
                  smoothing_form="torch", denominator=None, sample_weight=None, shift_labels=False,
                  reduction="mean", cw=None):
    """s_n (-q . log softmax(z) + z_loss v_n lse^2) over z = cap tanh(S x / cap), x = F.linear,
    summed and divided by the denominator (mean: sum_n s_n w_y over the counted rows)."""
    x = F.linear(h, w, b)
    V = x.shape[-1]
    if shift_labels:
        y = torch.cat([y[..., 1:], torch.full_like(y[..., :1], -100)], dim=-1)
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z, y = z.reshape(-1, V), y.reshape(-1)
    valid = y != -100
    ys = torch.where(valid, y, torch.zeros_like(y))
    wv = cw if cw is not None else torch.ones(V, dtype=z.dtype)
    eps = label_smoothing
    onehot = F.one_hot(ys, V).to(z.dtype)
    if smoothing_form == "others":
        q = onehot * (1 - eps - eps / (V - 1)) * wv[ys][:, None] + eps / (V - 1) * wv
    else:
        q = onehot * (1 - eps) * wv[ys][:, None] + eps / V * wv
    q = q * valid[:, None]
    lse = torch.logsumexp(z, dim=-1)
    row = -(q * torch.log_softmax(z, dim=-1)).sum(-1) + z_loss * valid.to(z.dtype) * lse**2
    s = sample_weight.reshape(-1) if sample_weight is not None else torch.ones_like(row)
    if reduction == "none":
        return (s * row).reshape(y.shape)
    total = (s * row).sum()
    if denominator is not None:
        return total / denominator
    return total / (s * wv[ys] * valid).sum() if reduction == "mean" else total


def grads_of(loss_fn, h, w, b):
    h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
    loss = loss_fn(h, w, b)
    (loss.sum() if loss.ndim else loss).backward()
    return {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad, "grad_bias": b.grad}


def semantics() -> None:
    arrays = {}
    for i, (case, spec) in enumerate(SEMANTICS.items()):
        h, w, b, y, cw = inputs(40 + i, B=2, T=12, H=16, V=64)
        g = torch.Generator().manual_seed(90 + i)
        sw = torch.rand(y.shape, generator=g, dtype=torch.float64) * 2 if spec.get("sample_weight") else None
        cw = cw if spec.get("class_weight") else None
        opts = {k: v for k, v in spec.items() if k not in ("sample_weight", "class_weight")}
        out = grads_of(lambda h_, w_, b_: extended_loss(h_, w_, b_, y, sample_weight=sw, cw=cw, **opts),
                       h, w, b)
        plain = grads_of(lambda h_, w_, b_: extended_loss(h_, w_, b_, y, cw=cw), h, w, b)
        torch_plain = run(h, w, b, y, cw=cw)
        for k in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
            assert torch.allclose(plain[k], torch_plain[k], rtol=1e-12, atol=1e-15), (case, k)
        given = {"hidden": h, "weight": w, "bias": b, "labels": y, "sample_weight": sw,
                 "class_weight": cw, **out,
                 **{f"{k}_without": plain[k] for k in ("grad_hidden", "grad_weight", "grad_bias")}}
        arrays.update({f"{case}/{k}": v.numpy() for k, v in given.items() if v is not None})
        arrays[f"{case}/call"] = np.array(json.dumps(opts))  # the ce-check settings of the call
    np.savez_compressed(OUT / "semantics.npz", **arrays)


def example() -> None:
    h, w, b, y, _ = inputs(0)
    h32, w32, b32 = h.float(), w.float(), b.float()
    for name, arr in (("hidden", h32), ("weight", w32), ("bias", b32), ("labels", y)):
        np.save(OUT / f"{name}.npy", arr.numpy())
    out = run(h32, w32, b32, y)
    for name, arr in out.items():
        np.save(OUT / f"{name}.npy", arr.numpy())
    bad = out["grad_weight"].clone()
    bad[64:128] *= 2.0  # one vocabulary block accumulated twice
    np.save(OUT / "grad_weight_bad.npy", bad.numpy())
    hb, wb, bb = h.bfloat16(), w.bfloat16(), b.bfloat16()
    ob = run(hb, wb, bb, y)
    arrays = {"hidden": hb, "weight": wb, "bias": bb, **ob}
    np.savez_compressed(OUT / "bf16.npz", labels=y.numpy(),
                        **{k: v.float().numpy() for k, v in arrays.items()})


def parity() -> None:
    arrays = {}
    for i, (case, spec) in enumerate(CASES.items()):
        h, w, b, y, cw = inputs(10 + i, ignore=spec.get("ignore", False))
        b = b if spec["bias"] else None
        cw = cw if spec.get("class_weight") else None
        out = run(h, w, b, y, reduction=spec.get("reduction", "mean"),
                  label_smoothing=spec.get("label_smoothing", 0.0), cw=cw)
        given = {"hidden": h, "weight": w, "labels": y, "bias": b, "class_weight": cw, **out}
        arrays.update({f"{case}/{k}": v.numpy() for k, v in given.items() if v is not None})
    np.savez_compressed(OUT / "parity.npz", **arrays)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    example()
    parity()
    semantics()
