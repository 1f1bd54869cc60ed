"""PyTorch autograd gradients of 16-bit cross-entropy at large |lse|, for the floor's |lse| term
(runs in a venv with torch + numpy).

    python torch_lse16_cases.py OUTDIR

A 16-bit computation rounds lse to 16 bits at most once: `logits.logsumexp(-1)` in the model
dtype, whose backward is exp(z - lse) with that rounded lse (`lse`), against the fused kernel
(`F.cross_entropy`, `fused`), PaLM's z-loss on that lse (`zloss`, 1e-4 lse^2), and the stable
logsumexp written by hand with its max not detached (`mlse`: autograd adds the row max's path
(1 - sum a) at the arg-max, 1/2 to 1 ulp of 1 in 16 bits). All are correct; the floor must
pass them. `grad_bug_double` is autograd's gradient of the lse counted twice (2 lse - z_y: the
softmax term doubled), which the floor must catch: before its |lse| term took a quarter weight
in 16 bits it passed at logit std 30 (and std 10 at C = 8,192), and with the z-loss also before
its |z| term was left to transformed logits. float16 and bfloat16; logit std 1, 5, 10, 30;
C = 1,000 (8 rows) and 8,192 (4 rows); mean over the rows. fixtures/frameworks_semantics/lse16/
holds these (tests/test_lse16.py).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from torch_binary_cases import to_np  # noqa: E402  (detached, exactly widened to float32)

TDT = {"f16": torch.float16, "bf16": torch.bfloat16}
ZETA = 1e-4  # PaLM's z-loss coefficient
SHAPES = ((8, 1000, (1.0, 5.0, 10.0, 30.0)), (4, 8192, (5.0, 10.0, 30.0)))


def cases() -> list[dict]:
    return [dict(framework="lse16", call_tag=call, dtype=dt, layout="last", C=C, scale=s,
                 reduction="mean", variant="", rows=N)
            for call in ("lse", "fused", "zloss", "mlse") for dt in TDT
            for N, C, scales in SHAPES for s in scales]


def _grad(z, y, loss_of):
    x = z.detach().clone().requires_grad_()
    loss = loss_of(x, y)
    loss.backward()
    return loss, x.grad


def compute(case: dict, seed: int, outdir: str) -> None:
    g = torch.Generator().manual_seed(seed)
    N, C = case["rows"], case["C"]
    z = (torch.randn(N, C, generator=g) * case["scale"]).to(TDT[case["dtype"]])
    y = torch.randint(0, C, (N,), generator=g)

    def picked(x, y):
        return x.gather(1, y[:, None])[:, 0]

    check = dict(reduction="mean", precision=case["dtype"])
    if case["call_tag"] in ("lse", "zloss"):
        zeta = ZETA if case["call_tag"] == "zloss" else 0.0

        def ce(x, y, k):
            lse = x.logsumexp(-1)
            return (k * lse - picked(x, y)).mean() + zeta * (lse * lse).mean()

        loss, grad = _grad(z, y, lambda x, y: ce(x, y, 1))
        _l, bug = _grad(z, y, lambda x, y: ce(x, y, 2))
        extra = {"grad_bug_double": to_np(bug)}
        if zeta:
            check["z_loss"] = zeta
    elif case["call_tag"] == "mlse":
        def mlse(x, y):
            m = x.max(-1, keepdim=True).values  # not detached
            lse = ((x - m).exp().sum(-1, keepdim=True).log() + m).squeeze(-1)
            return (lse - picked(x, y)).mean()

        loss, grad = _grad(z, y, mlse)
        extra = {}
    else:
        loss, grad = _grad(z, y, F.cross_entropy)
        extra = {}
    common.write_case(outdir, case, logits=to_np(z), labels=y.numpy(), grad=to_np(grad),
                      loss=to_np(loss), axis=-1, precision=case["dtype"], seed=seed,
                      ce_check=check,
                      arrays_extra=extra, meta_extra={"torch": torch.__version__})


def main() -> None:
    args = common.parse_args("torch_lse16_cases.py")
    common.run(cases(), args, lambda case, seed: compute(case, seed, args.outdir))


if __name__ == "__main__":
    main()
