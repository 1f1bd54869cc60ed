"""Make fixtures/formats: one softmax cross-entropy case written by the real libraries in every
input format ce-check reads, for tests/test_formats.py (which runs without any of them).

Run with torch, safetensors and ml_dtypes installed (this script never imports ce_cli):

    python scripts/make_format_fixtures.py   (in an environment with torch, e.g. pip install torch)

The case: (6, 10) logits k/16 (exact in bf16, f16, f32 and f64), int64 labels with one
ignore_index (-100), and for each dtype DT of f64, f32, f16, bf16 PyTorch's own
`F.cross_entropy(logits.to(DT), labels)` (reduction mean) and its gradient w.r.t. the logits,
computed by autograd in DT (bf16 on the CPU: what a bf16 training step returns).

    logits.npy, labels.npy, grad_DT.npy, loss_DT.npy        numpy (bf16: ml_dtypes, stored `V2`)
    logits_bf16.npy                                         the logits as ml_dtypes bfloat16
    case.safetensors                                        every tensor above, by name
                                                            (safetensors.torch.save_file)
    grad_bf16.safetensors                                   the bf16 gradient alone, as "grad"
    logits.pt, logits_bf16.pt, labels.pt, grad_DT.pt,
    loss_DT.pt                                              torch.save of each tensor
    dict.pt                                                 {"grad": grad_f32}: not a tensor
    object.pt                                               a Fraction: refused by weights_only
    cases.json                                              versions, shape, dtypes

torch.save writes a random serialization id, so the .pt files differ byte-wise between runs;
their tensors do not.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors  # type: ignore[import-not-found,unused-ignore]
import torch  # type: ignore[import-not-found,unused-ignore]
import torch.nn.functional as F  # type: ignore[import-not-found,unused-ignore]
from safetensors.torch import save_file  # type: ignore[import-not-found,unused-ignore]

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "formats"
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MAX_BYTES = 200_000


def case() -> dict[str, torch.Tensor]:
    """The tensors of the case, by name."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randint(-64, 65, (6, 10), generator=g).to(torch.float32) / 16
    labels = torch.randint(0, 10, (6,), generator=g)
    labels[2] = -100
    tensors = {"logits": logits, "logits_bf16": logits.to(torch.bfloat16), "labels": labels}
    for name, dtype in DTYPES.items():
        z = logits.detach().to(dtype).clone().requires_grad_()
        loss = F.cross_entropy(z, labels, ignore_index=-100, reduction="mean")
        loss.backward()
        assert z.grad is not None
        tensors[f"grad_{name}"] = z.grad.detach()
        tensors[f"loss_{name}"] = loss.detach()
    return tensors


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy of a tensor; bfloat16 through ml_dtypes, as a bf16 user would save it."""
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = case()
    for name, t in tensors.items():
        np.save(OUT / f"{name}.npy", to_numpy(t), allow_pickle=False)
        torch.save(t, OUT / f"{name}.pt")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "case.safetensors"))
    save_file({"grad": tensors["grad_bf16"]}, str(OUT / "grad_bf16.safetensors"))
    torch.save({"grad": tensors["grad_f32"]}, OUT / "dict.pt")
    torch.save(Fraction(1, 3), OUT / "object.pt")
    manifest = {
        "torch": torch.__version__, "safetensors": safetensors.__version__,
        "ml_dtypes": ml_dtypes.__version__, "shape": list(tensors["logits"].shape),
        "tensors": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
        "reduction": "mean", "ignore_index": -100,
    }
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    assert total < MAX_BYTES, f"fixtures/formats is {total} bytes"
    print(f"wrote {len(list(OUT.iterdir()))} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
