"""bfloat16 inputs, read without any library: widened exactly to float32 and tagged as stored bf16.

A bfloat16 is the top half of a float32 (1 sign, 8 exponent, 7 mantissa bits), so its bits
shifted left by 16 and viewed as float32 are its value, exactly: NaN, ±inf and subnormals too.
numpy has no bfloat16, and the optional ml_dtypes (whose bfloat16 .npy files store the bits as
the 2-byte void dtype `V2`) may be absent, so every loader widens to float32 here and tags the
result's dtype (numpy dtype metadata, kept through views and slices) with the precision it was
stored in. `ce_cli.verify.tolerance` reads the tag: a bf16 input is compared in bf16 unless
`--precision` says otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STORED_KEY = "ce_check.stored_precision"
ALSO_KEY = "ce_check.stored_also"  # a second format that holds every value (io/stored.py)
BF16 = np.dtype(np.float32, metadata={STORED_KEY: "bf16"})


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16, or the plain 2-byte void (`V2`) its .npy files are written with."""
    return dtype.name == "bfloat16" or (dtype.kind == "V" and dtype.itemsize == 2
                                        and dtype.fields is None and dtype.subdtype is None)


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 `bits` (uint16 in any byte order, or `V2`/ml_dtypes bfloat16
    in native order): (u16 << 16) viewed as float32, exact. A new array, tagged as stored bf16."""
    if bits.dtype.kind != "u":
        bits = bits.view(np.uint16)
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: a 0-d input stays an array (a scalar would lose the tag)
    return wide.view(BF16)


def widen_if_bfloat16(x: Any) -> Any:
    """`x`, or, when it is a bfloat16 array (ml_dtypes', which a JAX array becomes under
    np.asarray; or `V2`), its exact float32 widening tagged as stored bf16, as the loaders give
    a bf16 file. Anything else (None, numbers, other arrays) passes as it is."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, np.dtype) and is_bfloat16(dtype):
        return widen_bfloat16(np.asarray(x))
    return x


def stored_precision(dtype: np.dtype) -> str | None:
    """The precision an input was stored in before it was widened ('bf16'), or None."""
    meta = dtype.metadata
    return None if meta is None else meta.get(STORED_KEY)


def stored_also(dtype: np.dtype) -> str | None:
    """A second format whose values every entry is too ('f16' beside 'bf16'), or None."""
    meta = dtype.metadata
    return None if meta is None else meta.get(ALSO_KEY)
