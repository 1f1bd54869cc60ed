"""Arrays as the Python API takes them: anything numpy.asarray accepts, with bfloat16 arrays
(ml_dtypes', which a JAX array becomes) widened exactly and PyTorch tensors read as the .pt loader
reads one (detached, on the CPU, bfloat16 widened exactly): both tagged as stored bf16; other
float arrays tagged with the narrower format their values prove they were stored in."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ce_cli.io.bfloat16 import widen_if_bfloat16
from ce_cli.io.stored import infer_stored


def api_array(x: Any) -> Any:
    """`x` as the checks read it, its stored format inferred (`ce_cli.io.stored`: a Python float
    too, which may be a float32 loss's `.item()`); None, ints and other objects pass as they are."""
    torch = sys.modules.get("torch")  # a tensor means torch is loaded: nothing is imported here
    if torch is not None and isinstance(x, torch.Tensor):
        from ce_cli.io.torch_pt import tensor_to_numpy
        x = tensor_to_numpy(torch, x, "a tensor argument")
    elif isinstance(x, float):
        x = np.asarray(x)
    return infer_stored(widen_if_bfloat16(x))
