"""The precision an input's values were stored in, read from the values themselves.

A float64 array whose every entry is exactly a float32 value went through float32 (a float32
gradient written as CSV, `.double()`, a loss's `.item()`); a float32 array of bfloat16 or float16
values went through that format (a bf16 gradient `.float()`ed to be saved). A computation in the
wider format lands on a narrower format's value by chance with probability 2^-(p_wide - p_narrow)
per entry, so a tag needs evidence: entries of distinct magnitudes whose significand needs more
than half the narrower format's bits and that are not integers (0, 0.5 or 10000 prove nothing;
v and -v are one coincidence), at least the format's EVIDENCE of them (from float64, a float32
coincidence is 2^-29 per entry: 1; from float32, 2^-16 for bfloat16: 2, 2^-13 for float16: 3;
each count keeps a coincidence below 2^-29). Values that both bfloat16 and float16 hold (at
most 8 significand bits, within float16's range) are taken as bfloat16's, the looser rule: a
bf16 gradient of few distinct values (a small batch, saturated rows) keeps bf16's rule, not
float16's or float32's, and a float16 one lands on bf16 values only by chance (2^-3 an
entry). Below float16's smallest normal (2^-14) bfloat16's rule is the stricter: its values
there are float16's subnormals (6e-8 apart) too, which a float16 gradient of a mean over many
elements mostly is, so a tag of such values also names float16 (`ALSO_KEY`) and the rule takes
float16's subnormal spacing.
The evidence is looked for in a spread sample (the first SAMPLE entries and SPREAD blocks
across the array: a computed array shows it at once); only then is every entry read, to see
that the format holds them all. The narrowest format that does wins. The tag is the one a bf16
file gets (`STORED_KEY`), marked inferred; the precision the values were *computed* in is still
`--precision`'s to say. Only the inputs compared with a reference (`COMPARED_ROLES`) are read
for it: their stored format sets a tolerance, the others' sets nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ce_cli.io.bfloat16 import ALSO_KEY, STORED_KEY, Bfloat16Rows, as_array, stored_precision

INFERRED_KEY = "ce_check.stored_inferred"
# format: (significand bits, entries of evidence needed, smallest normal's exponent, largest)
FORMATS = {"bf16": (8, 2, -126, float.fromhex("0x1.FEp127")), "f16": (11, 3, -14, 65504.0),
           "f32": (24, 1, -126, float(np.finfo(np.float32).max))}
# the formats whose values are a subset of a dtype's (by itemsize), narrowest first (so values
# of both bfloat16 and float16 are bfloat16's); float16 values are not bfloat16's (nor the
# reverse), so a float16 array is tagged with neither
NARROWER = {8: ("bf16", "f16", "f32"), 4: ("bf16", "f16")}
SAMPLE = 4096          # entries read first: a wide array's values almost always end it there
SPREAD = (64, 1024)    # blocks of entries across the array, and their size: the evidence's sample
CHUNK = 1 << 20        # entries per step of the full scan (no temporary of the array's size)
# the inputs whose values are compared with a reference (by role name)
COMPARED_ROLES = frozenset({"grad", "loss", "lse", "z_loss_value", "grad_hidden", "grad_weight",
                            "grad_bias"})
NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
F16_NORMAL_MIN = 2.0 ** FORMATS["f16"][2]


def infer_stored(x: Any) -> Any:
    """`x` viewed with its dtype tagged as stored in the narrowest format that holds every
    entry (with the evidence above), or `x` itself (not a float array, already tagged, none)."""
    return _tagged(x, _shown(x)) if _untagged(x) else x


def stored_alike(logits: Any, grad: Any, *values: Any) -> tuple:
    """Your gradient, then `values` (loss, z-loss), each tagged as stored in a 16-bit format
    where its own values show none and every entry is a value of that format: the one the
    logits show (by dtype, tag, or their values' spread sample), for `values` the gradient's
    own first. A loss typed or `.item()`ed from a bf16 computation, or a gradient of a few
    saturated entries, cannot prove its format (`infer_stored` needs 2 or 3 distinct values)."""
    shown = _format_of(logits)
    grad = _tagged_16(grad, [shown])
    own = _dtype_format(grad.dtype) if isinstance(grad, (np.ndarray, Bfloat16Rows)) else None
    return (grad, *(_tagged_16(v, [own, shown]) for v in values))


def _tagged_16(x: Any, formats: list[str | None]) -> Any:
    """`x` tagged with the first 16-bit format of `formats` that holds every entry, when
    untagged."""
    left = [f for f in dict.fromkeys(formats) if f in ("bf16", "f16")]
    if (not left or not _untagged(x) or x.dtype.itemsize <= 2
            or not np.isfinite(x).any()):  # inf or NaN alone: of every format, evidence of none
        return x
    return _tagged(x, left)


def _untagged(x: Any) -> bool:
    return (isinstance(x, np.ndarray) and x.dtype.kind == "f" and not x.dtype.metadata
            and x.size > 0)


def _shown(x: np.ndarray) -> list[str]:
    """The narrower formats that hold the spread sample of `x`, with their EVIDENCE in it,
    narrowest first."""
    sample = _spread(x.reshape(-1))
    held = _holding(sample, list(NARROWER.get(x.dtype.itemsize, ())))
    return [f for f in held if len(_evidence(sample, f, FORMATS[f][1])) >= FORMATS[f][1]]


def _tagged(x: np.ndarray, left: list[str]) -> Any:
    """`x` tagged with the first of the formats `left` that holds every entry (read in steps of
    CHUNK entries), or `x` itself; bfloat16 held as float16 too says so (`ALSO_KEY`)."""
    flat = x.reshape(-1)
    # float16 beside bfloat16 needs no evidence of its own: it only loosens the rule, where
    # some entry lies in its subnormal range
    held = left + ["f16"] if left and left[0] == "bf16" and "f16" not in left else left
    sub16 = False
    for start in range(0, flat.size, CHUNK):
        if not any(f in left for f in held):
            return x
        part = flat[start:start + CHUNK]
        held = _holding(part, held)
        if not sub16 and "f16" in held:
            a = np.abs(part)
            sub16 = bool(np.any((a > 0) & (a < F16_NORMAL_MIN)))
    fmt = next((f for f in held if f in left), None)
    if fmt is None:
        return x
    meta = {STORED_KEY: fmt, INFERRED_KEY: True}
    if fmt == "bf16" and "f16" in held and sub16:
        meta[ALSO_KEY] = "f16"
    return x.view(np.dtype(x.dtype, metadata=meta))


def _dtype_format(dt: np.dtype) -> str | None:
    """The format a dtype says it was stored in: bfloat16 or float16, or a tag."""
    if dt.name == "bfloat16" or dt == np.float16:
        return "bf16" if dt.name == "bfloat16" else "f16"
    return stored_precision(dt)


def _format_of(model: Any) -> str | None:
    """The format `model` was stored in: its dtype's (`_dtype_format`), or for an untagged
    wider float array the narrowest its spread sample shows with evidence; None when it shows
    none (not an array, or its own dtype's values)."""
    if model is None:
        return None
    fmt = _dtype_format(as_array(model).dtype)
    if fmt is not None or not _untagged(model):
        return fmt
    left = _shown(model)
    return left[0] if left else None


def _spread(flat: np.ndarray) -> np.ndarray:
    """The first SAMPLE entries and SPREAD blocks evenly across `flat` (contiguous blocks: a
    memory-mapped file is read a few pages at a time, not one page per entry)."""
    blocks, size = SPREAD
    if flat.size <= SAMPLE + blocks * size:
        return flat
    starts = np.linspace(SAMPLE, flat.size - size, blocks).astype(np.int64)
    return np.concatenate([flat[:SAMPLE], *(flat[s:s + size] for s in starts.tolist())])


def inferred(dtype: np.dtype) -> str | None:
    """The format `infer_stored` tagged `dtype` with, or None."""
    meta = dtype.metadata
    return meta.get(STORED_KEY) if meta is not None and meta.get(INFERRED_KEY) else None


def stored_notes(inputs: dict[str, Any]) -> list[str]:
    """The report's notes on the compared inputs (label -> value) whose stored format was
    inferred."""
    notes = []
    for label, x in inputs.items():
        f = inferred(np.dtype(getattr(x, "dtype", np.float64)))
        if f is not None:
            notes.append(f"{label}: every entry is a {NAMES[f]} value (held as {x.dtype.name}): "
                         f"compared as stored in {f} (`precision` says what it was computed in)")
    return notes


def _holding(values: np.ndarray, formats: list[str]) -> list[str]:
    """The formats in which every entry of `values` is exactly representable (NaN, inf too):
    |v| = m 2^e (frexp) is a format's value iff |v| 2^(p - max(e, emin + 1)) is an integer
    and |v| is at most its largest. Arithmetic, not a cast: numpy's float16 cast raises its
    underflow flag in software for every value it rounds, ~65 ns an entry."""
    a = np.abs(np.asarray(values))
    out = []
    with np.errstate(all="ignore"):
        nonfinite = ~np.isfinite(a)
        _, e = np.frexp(a)
        for f in formats:
            bits, _, emin, top = FORMATS[f]
            s = np.ldexp(a, bits - np.maximum(e, emin + 1))
            if bool(np.all(((s == np.floor(s)) & (a <= top)) | nonfinite)):
                out.append(f)
    return out


def _evidence(values: np.ndarray, f: str, most: int) -> list[float]:
    """Up to `most` distinct magnitudes of entries whose significand needs more than half of
    format f's bits, integers left out (a count, or a loss of exactly |z|, is any format's value
    by nature)."""
    half = FORMATS[f][0] // 2
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(all="ignore"):
        m, e = np.frexp(v)
        short = np.ldexp(np.round(np.ldexp(m, half)), e - half)
        # by magnitude: v and -v share their significand, one coincidence
        telling = np.abs(v[np.isfinite(v) & (short != v) & (np.round(v) != v)])
    distinct = _sorted_distinct(telling[:64 * most])  # most often enough; else the whole part
    if distinct.size < most:
        distinct = _sorted_distinct(telling)
    return distinct[:most].tolist()


def _sorted_distinct(a: np.ndarray) -> np.ndarray:
    """np.unique(a) (no NaN in `a`), without np.unique's import of numpy.ma (~8 ms at start)."""
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s
