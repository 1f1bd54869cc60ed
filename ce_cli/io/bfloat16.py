"""bfloat16 inputs, read without any library: widened exactly to float32 and tagged as stored bf16.

A bfloat16 is the top half of a float32 (1 sign, 8 exponent, 7 mantissa bits), so its bits
shifted left by 16 and viewed as float32 are its value, exactly: NaN, ±inf and subnormals too.
numpy has no bfloat16, and the optional ml_dtypes (whose bfloat16 .npy files store the bits as
the 2-byte void dtype `V2`) may be absent, so every loader widens to float32 here and tags the
result's dtype (numpy dtype metadata, kept through views and slices) with the precision it was
stored in. `ce_cli.verify.tolerance` reads the tag: a bf16 input is compared in bf16 unless
`--precision` says otherwise.

Whole files are not widened when read: `Bfloat16Rows` keeps the 2-byte bits (a memory-mapped
file stays mapped) and widens each slice a check takes, so a bf16 input costs its own bytes
and a chunk, not twice its bytes again as float32.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

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


class Bfloat16Rows(NDArrayOperatorsMixin):
    """A bfloat16 array read as its float32 widening (dtype `BF16`), one slice at a time:
    `x[key]` widens just the entries it selects, and `reshape` reshapes the bits. Anything else
    an ndarray has (np.asarray, ufuncs, operators, other attributes) widens the whole array once
    and answers from that copy, so every consumer sees the same values as from
    `widen_bfloat16`; `materialized` tells whether one did."""

    __slots__ = ("_bits", "_whole")
    dtype = BF16
    itemsize = 4

    def __init__(self, bits: np.ndarray) -> None:
        self._bits = bits if bits.dtype.kind == "u" else bits.view(np.uint16)
        self._whole: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self._bits.shape

    @property
    def ndim(self) -> int:
        return self._bits.ndim

    @property
    def size(self) -> int:
        return self._bits.size

    @property
    def nbytes(self) -> int:
        return 4 * self._bits.size

    @property
    def flags(self) -> Any:
        """The bits' flags: widening keeps the layout (C-contiguous rows stay so)."""
        return self._bits.flags

    @property
    def materialized(self) -> bool:
        return self._whole is not None

    @property
    def bits(self) -> np.ndarray:
        """The bfloat16 bits, as unsigned 16-bit integers (in the source's byte order)."""
        return self._bits

    def block(self, start: int, stop: int) -> Bfloat16Rows:
        """Rows [start, stop), still bits: the compiled kernel widens them on its threads."""
        return Bfloat16Rows(self._bits[start:stop])

    def __len__(self) -> int:
        return len(self._bits)

    def __getitem__(self, key: Any) -> Any:
        part = np.asarray(self._bits[key])
        wide = widen_bfloat16(part)
        return wide[()] if part.ndim == 0 else wide

    def reshape(self, *shape: Any, **kwargs: Any) -> Bfloat16Rows:
        return Bfloat16Rows(self._bits.reshape(*shape, **kwargs))

    def transpose(self, *axes: Any) -> Bfloat16Rows:  # np.moveaxis's way in
        return Bfloat16Rows(self._bits.transpose(*axes))

    def whole(self) -> np.ndarray:
        """The whole array widened (once; later calls return the same array)."""
        if self._whole is None:
            self._whole = widen_bfloat16(self._bits)
        return self._whole

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.whole()
        if dtype is not None and np.dtype(dtype) != whole.dtype:
            return whole.astype(dtype)
        return whole.copy() if copy else whole  # the shared copy only to readers

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        plain = tuple(x.whole() if isinstance(x, Bfloat16Rows) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(x.whole() if isinstance(x, Bfloat16Rows) else x
                                  for x in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle protocols, unset slots: not the array's
            raise AttributeError(name)
        return getattr(self.whole(), name)

    def __repr__(self) -> str:
        return f"Bfloat16Rows(shape={self.shape})"


def bfloat16_rows(bits: np.ndarray) -> np.ndarray:
    """`Bfloat16Rows(bits)`, typed as the float32 array it stands in for (the loaders' type)."""
    return cast(np.ndarray, Bfloat16Rows(bits))


def widen_if_bfloat16(x: Any) -> Any:
    """`x`, or, when it is a bfloat16 array (ml_dtypes', which a JAX array becomes under
    np.asarray; or `V2`), a `Bfloat16Rows` of its bits, read as float32 tagged as stored bf16
    (the loaders give a bf16 file so). Anything else (None, numbers, other arrays) passes as
    it is."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, np.dtype) and is_bfloat16(dtype):
        return bfloat16_rows(np.asarray(x))
    return x


def row_block(a: Any, start: int, stop: int) -> Any:
    """a[start:stop]; a `Bfloat16Rows`' rows as a `Bfloat16Rows` (not widened yet)."""
    return a.block(start, stop) if isinstance(a, Bfloat16Rows) else a[start:stop]


def as_array(x: Any) -> Any:
    """`x` as an ndarray (np.asarray), a `Bfloat16Rows` kept as it is."""
    return x if isinstance(x, (np.ndarray, Bfloat16Rows)) else np.asarray(x)


def stored_precision(dtype: np.dtype) -> str | None:
    """The precision an input was stored in before it was widened ('bf16'), or None."""
    meta = dtype.metadata
    return None if meta is None else meta.get(STORED_KEY)


def stored_also(dtype: np.dtype) -> str | None:
    """A second format whose values every entry is too ('f16' beside 'bf16'), or None."""
    meta = dtype.metadata
    return None if meta is None else meta.get(ALSO_KEY)
