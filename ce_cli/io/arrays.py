"""Arrays as the Python API takes them: anything numpy.asarray accepts, with bfloat16 arrays
(ml_dtypes', which a JAX array becomes) widened exactly and PyTorch tensors read as the .pt loader
reads one (detached, on the CPU, bfloat16 widened exactly): both tagged as stored bf16; other
float arrays compared with a reference tagged with the narrower format their values prove they
were stored in."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ce_cli.io.bfloat16 import widen_if_bfloat16
from ce_cli.io.stored import infer_stored


def api_array(x: Any, compared: bool = False) -> Any:
    """`x` as the checks read it; an array `compared` with a reference (a gradient, a loss: a
    Python float too, which may be a float32 loss's `.item()`) with its stored format inferred
    (`ce_cli.io.stored`). None, ints and other objects pass as they are."""
    torch = sys.modules.get("torch")  # a tensor means torch is loaded: nothing is imported here
    if torch is not None and isinstance(x, torch.Tensor):
        from ce_cli.io.torch_pt import tensor_to_numpy
        x = tensor_to_numpy(torch, x, "a tensor argument")
    elif isinstance(x, (float, np.floating)):  # a numpy scalar too: np.float32(loss)
        x = np.asarray(x)
    x = widen_if_bfloat16(x)
    return infer_stored(x) if compared else x


def compared_array(x: Any) -> Any:
    """`api_array` of an array compared with a reference (its stored format inferred)."""
    return api_array(x, compared=True)
