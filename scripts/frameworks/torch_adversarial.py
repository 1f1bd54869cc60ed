"""Adversarial but plausible logits for PyTorch float32 F.cross_entropy: one dominant class, every
other class ~17 nats lower (each exp just under half an ulp of the running sum), so a sequential
float32 sum drops them and the row normaliser of a *correct* gradient is off by up to 0.45*eps*C
((N, C, d) layout; 0.028*eps*C class-last). Dominant class first in even rows, last in odd rows.

    python torch_adversarial.py OUTDIR
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
eps = 2.0**-23
for C in (1000, 10000, 32000, 50257, 128256, 256000):
    for lay in ("last", "axis1"):
        for gap_name, gap in (("halfulp", np.log(0.45 * eps)), ("ulp", np.log(0.9 * eps)), ("quarter", np.log(0.24*eps))):
            rng = np.random.default_rng(C)
            R = 8
            z = np.full((R, C), gap) + rng.uniform(-0.02, 0.02, (R, C))
            z[:, 0] = 0.0
            z[1::2] = z[1::2, ::-1]  # dominant class last in odd rows
            y = np.full(R, 5, np.int64)
            if lay == "axis1":
                zz = np.ascontiguousarray(z.T[None, :, :])  # (1, C, 8)
                yy = y[None, :]
                axis = 1
            else:
                zz, yy, axis = z, y, -1
            x = torch.from_numpy(zz).float().requires_grad_(True)
            loss = F.cross_entropy(x, torch.from_numpy(yy))
            loss.backward()
            case = dict(framework="torch", call_tag="ce", dtype="f32", layout=lay, C=C, scale=0.0,
                        reduction="mean", variant="adv_" + gap_name, target="index")
            common.write_case(out, case, logits=x.detach().numpy(), labels=yy, grad=x.grad.numpy(),
                              loss=loss.detach().numpy(), axis=axis, precision="f32", seed=C,
                              meta_extra=dict(version=torch.__version__, call="F.cross_entropy",
                                              note="dominant class first (even rows) / last (odd rows), others at gap"))
print("ok")
