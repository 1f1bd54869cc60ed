"""Arrays as the Python API takes them: anything numpy.asarray accepts, with bfloat16 arrays
(ml_dtypes', which a JAX array becomes) widened exactly and PyTorch tensors read as the .pt loader
reads one (detached, on the CPU, bfloat16 widened exactly): both tagged as stored bf16."""

from __future__ import annotations

import sys
from typing import Any

from ce_cli.io.bfloat16 import widen_if_bfloat16


def api_array(x: Any) -> Any:
    """`x` as the checks read it; None, numbers and other arrays pass as they are."""
    torch = sys.modules.get("torch")  # a tensor means torch is loaded: nothing is imported here
    if torch is not None and isinstance(x, torch.Tensor):
        from ce_cli.io.torch_pt import tensor_to_numpy
        return tensor_to_numpy(torch, x, "a tensor argument")
    return widen_if_bfloat16(x)
