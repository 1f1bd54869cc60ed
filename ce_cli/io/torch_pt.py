"""`.pt`/`.pth` files holding one tensor, read by PyTorch when it is installed.

Only `torch.load(weights_only=True)`: PyTorch's restricted unpickler, which builds tensors and
plain containers and refuses every other global, so a file cannot run code. A PyTorch before
2.6 is refused rather than used unsafely: before 1.13 it has no weights_only, and up to 2.5.1
weights_only=True could still be made to run code (CVE-2025-32434). Zip-format files are memory-mapped (`mmap=True`)
where PyTorch supports it. A bfloat16 tensor, which PyTorch cannot hand to numpy, is widened
exactly to float32 from its bits (ce_cli.io.bfloat16).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.io.bfloat16 import bfloat16_rows

ZIP_MAGIC = b"PK\x03\x04"
MAX_DETAIL = 200  # characters of PyTorch's own message kept in ours
SAFE_TORCH = (2, 6)  # the first release whose weights_only=True is not known to run code


def read_pt(path: Path, label: str) -> np.ndarray:
    """The tensor the .pt/.pth file `path` holds, as a numpy array (bfloat16 widened)."""
    torch = _import_torch(label)
    return tensor_to_numpy(torch, _load(torch, path, label), label)


def _import_torch(label: str) -> ModuleType:
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CeCheckError(f"{label}: reading .pt/.pth needs PyTorch, which is not installed "
                           "(pip install torch, or save the tensor as .safetensors or .npy)") from None
    version = str(getattr(torch, "__version__", "?"))
    match = re.match(r"(\d+)\.(\d+)", version)
    try:
        has_weights_only = "weights_only" in inspect.signature(torch.load).parameters
    except (TypeError, ValueError):
        has_weights_only = False
    if not has_weights_only or match is None or tuple(map(int, match.groups())) < SAFE_TORCH:
        raise CeCheckError(f"{label}: PyTorch {version} is too old to load .pt files safely "
                           "(ce-check never unpickles; torch.load(weights_only=True) needs "
                           f"PyTorch >= {'.'.join(map(str, SAFE_TORCH))})")
    return torch


def _detail(exc: BaseException) -> str:
    """The telling part of PyTorch's (often many-line) message, on one short line."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:  # keep the refusal, not the advice on loosening it that follows
        text = text.split(marker, 1)[1].split(". ", 1)[0]
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL - 3] + "..."


def _load(torch: ModuleType, path: Path, label: str) -> Any:
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    try:
        with path.open("rb") as fh:
            zipped = fh.read(4) == ZIP_MAGIC
        if zipped and "mmap" in inspect.signature(torch.load).parameters:
            kwargs["mmap"] = True
        return torch.load(str(path), **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # what a damaged or refused file raises varies with the version
        raise CeCheckError(f"{label}: not a weights-only PyTorch file ({_detail(exc)})") from None


def tensor_to_numpy(torch: ModuleType, obj: Any, label: str) -> np.ndarray:
    """A dense CPU tensor as numpy; anything else is refused."""
    if not isinstance(obj, torch.Tensor):
        raise CeCheckError(f"{label}: holds a {type(obj).__name__}, not a tensor "
                           "(save one tensor: torch.save(t, PATH))")
    if obj.layout != torch.strided or obj.is_quantized:
        raise CeCheckError(f"{label}: a {obj.layout} tensor{' (quantized)' * obj.is_quantized}; "
                           "save a dense one (t.to_dense(), t.dequantize())")
    t = obj.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return bfloat16_rows(t.view(torch.int16).numpy())
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        raise CeCheckError(f"{label}: tensor dtype {t.dtype} has no numpy equivalent "
                           "(save it as float32 or float64)") from None
