"""Write fixtures/linear/: fused linear cross-entropy cases computed by PyTorch.

    /work/fw/venv-torch/bin/python scripts/make_linear_fixtures.py

- hidden.npy (2, 24, 32), weight.npy (200, 32), bias.npy (200,), labels.npy (2, 24) with two
  ignored tokens (-100): the README's worked example, in float32; grad_hidden.npy,
  grad_weight.npy, grad_bias.npy, loss.npy from `F.cross_entropy(F.linear(h, W, b), y)` and
  backward in float32; grad_weight_bad.npy: one vocabulary block (rows 64-127) accumulated twice.
- bf16.npz: the same in bfloat16 (stored as float32, exactly).
- parity.npz: float64 cases `<case>/<array>` with and without bias and with the options, for the
  parity tests (losses and all three gradients to ~1e-12 relative).
"""

from __future__ import annotations

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
