"""The dtypes a stress grid runs in: names, the --dtypes parser, bfloat16 (optional ml_dtypes),
storage as .npy, and where the textbook forms break in each, analytically.

Whether bfloat16 is available is asked of `bfloat16_dtype()` alone, here, so that a test can
stand it in or take it away in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ce_cli.enums import Precision
from ce_cli.errors import CeCheckError
from ce_cli.verify.tolerance import PRECISIONS, parse_precision

DTYPES: tuple[str, ...] = tuple(p.value for p in Precision)   # f16, bf16, f32, f64
DTYPE_NAMES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64"}
BF16_MISSING = "bf16 skipped: install the optional ml_dtypes package (pip install ml_dtypes)"

# largest finite value of each dtype: (2 - 2^-p) 2^emax
MAX_FINITE = {"f16": 65504.0, "bf16": (2.0 - 2.0**-7) * 2.0**127,
              "f32": (2.0 - 2.0**-23) * 2.0**127, "f64": float(np.finfo(np.float64).max)}


@dataclass(frozen=True)
class Thresholds:
    """Where the textbook forms break, analytically, for one dtype."""

    dtype: str
    exp_overflow: float        # exp(z) = inf past z = ln(max)
    softmax_underflow: float   # exp(-g) rounds to 0 (log -> -inf) for gaps g past -ln(min subnormal)
    sigmoid_saturation: float  # s(x) rounds to 1 (1 - s(x) = 0) past x = ln(2/eps)
    eps: float


def thresholds(dtype: str) -> Thresholds:
    """ln(max), -ln(tiny) and ln(2/eps) of the dtype (eps and tiny from the tolerance model)."""
    eps, tiny = PRECISIONS[dtype]
    return Thresholds(dtype, math.log(MAX_FINITE[dtype]), -math.log(tiny), math.log(2.0 / eps), eps)


def bfloat16_dtype() -> type | None:
    """ml_dtypes.bfloat16 when the optional `ml_dtypes` package is installed, else None."""
    try:
        import ml_dtypes  # type: ignore[import-not-found,unused-ignore]  # optional: bf16 extra
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def numpy_dtype(name: str) -> np.dtype | None:
    """The numpy dtype for f16/bf16/f32/f64 (None for bf16 without ml_dtypes)."""
    if name == "bf16":
        bf = bfloat16_dtype()
        return None if bf is None else np.dtype(bf)
    return np.dtype(DTYPE_NAMES[name])


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes.bfloat16, or the raw 2-byte void type a .npy written with it loads as."""
    dtype = np.dtype(dtype)
    return dtype.name == "bfloat16" or (dtype.kind == "V" and dtype.itemsize == 2)


def bf16_to_f32(arr: np.ndarray) -> np.ndarray:
    """bfloat16 -> float32, exactly: the 16 bits become the high half of a float32."""
    bits = np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def as_storable(arr: np.ndarray) -> np.ndarray:
    """bfloat16 has no .npy type any other reader knows: it travels as float32 (exactly)."""
    arr = np.asarray(arr)
    return arr.astype(np.float32) if is_bfloat16(arr.dtype) else arr


def parse_dtypes(text: str | None) -> tuple[tuple[str, ...], list[str]]:
    """The dtypes to run (in f16, bf16, f32, f64 order) and notes about skipped ones.

    By default every dtype, bf16 only when ml_dtypes imports; asking for bf16 without it is an
    error."""
    notes: list[str] = []
    if text is None:
        chosen = list(DTYPES)
        if bfloat16_dtype() is None:
            chosen.remove("bf16")
            notes.append(BF16_MISSING)
        return tuple(chosen), notes
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CeCheckError("--dtypes: empty list (use f16, bf16, f32, f64, comma separated)")
    wanted: set[str] = set()
    for name in names:
        try:
            wanted.add(parse_precision(name))
        except CeCheckError:
            raise CeCheckError(f"--dtypes: unknown dtype '{name}' (use f16, bf16, f32, f64)") from None
    if "bf16" in wanted and bfloat16_dtype() is None:
        raise CeCheckError("--dtypes: bf16 needs the optional ml_dtypes package (pip install ml_dtypes)")
    return tuple(d for d in DTYPES if d in wanted), notes
