"""The tolerance model: what error a *correct* implementation makes in a given precision.

An entry passes when

    |got - ref| <= atol + rtol * |ref| + floor

with `rtol = 2 * eps` and `atol = 0` by default, and a per-entry `floor` that the loss module
computes from the error analysis of softmax cross-entropy in that precision (see the README,
"Tolerance model"): roughly `k * eps * (Q * a * (1 + |log a| + lam |lse|) + q) / D + tiny`, lam
= `Tolerance.lse_weight`.
`eps` is the machine epsilon of the precision the value was computed in (`--precision`; default
the storage dtype's, or the one a widened input was stored in), which the floor scales; `rtol`
takes the larger of it and the storage dtype's, whose final rounding it covers: a value computed
in float32 and stored as bfloat16 (`--precision f32` on bf16 arrays) gets bf16's relative
rounding and float32's floor, so an entry that lost its bits to an intermediate rounding to
bf16 fails (a bf16 computation, the default, admits that). `tiny` is the smallest subnormal of
the storage dtype (storage flushes smaller entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from ce_cli.errors import CeCheckError
from ce_cli.io.bfloat16 import stored_also, stored_precision

# machine epsilon and smallest positive subnormal
PRECISIONS: dict[str, tuple[float, float]] = {
    "f16": (2.0**-10, 2.0**-24),
    "bf16": (2.0**-7, 2.0**-133),
    "f32": (2.0**-23, 2.0**-149),
    "f64": (2.0**-52, 2.0**-1074),
}
# the smallest magnitude that rounds to inf (round to nearest): the largest finite number plus
# half its ulp; float64 is the reference's own format (a float64 reference is inf there too)
OVERFLOW: dict[str, float] = {
    "f16": 65520.0,                                 # 65504 + 16
    "bf16": math.ldexp(1.0 - 2.0**-9, 128),         # (2 - 2^-7) 2^127 + 2^119
    "f32": math.ldexp(1.0 - 2.0**-25, 128),         # (2 - 2^-23) 2^127 + 2^103
    "f64": math.inf,
}
ALIASES = {"float16": "f16", "half": "f16", "bfloat16": "bf16", "float32": "f32",
           "single": "f32", "float64": "f64", "double": "f64"}
SIXTEEN_BIT = ("f16", "bf16")
DEFAULT_FLOOR_FACTOR = 4.0
DEFAULT_RTOL_FACTOR = 2.0
# a 16-bit computation (frameworks compute in float32 inside) rounds lse, and a per-sample loss
# lse - z_y, to 16 bits at most once each: eps/2 of it, which k/4 = 1 (the default k) covers
# twice. The weight of the floor's |lse| term, and of a per-sample loss's floor (`per_sample_16`)
LSE_WEIGHT_16 = 0.25
# PyTorch's sigmoid BCE in 16 bits, (1 - y) x - c logsigmoid(x) with c = (pw - 1) y + 1, rounds
# terms of ~|x| more than once (c, logsigmoid, their product: ~eps |x| (|1 - y| + 2c) where
# x << 0); k/2 of the element floor's |x| (|1 - y| + c) covers that, k/4 did not (float16
# pos_weight losses at 0.82 of it): the weight of the floor of a `binary` loss computed in 16
# bits (`loss_rule`)
BINARY_WEIGHT_16 = 0.5


def precision_of_dtype(dtype: np.dtype) -> str:
    """The precision name for a stored dtype (integers and wider floats count as f64)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize <= 2:
        return "bf16" if dtype.name == "bfloat16" else "f16"
    if dtype.kind == "f" and dtype.itemsize == 4:
        return "f32"
    return "f64"


def parse_precision(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRECISIONS:
        raise CeCheckError(f"`precision`: unknown precision '{name}' (use f16, bf16, f32 or f64)")
    return key


@dataclass(frozen=True)
class Tolerance:
    """Resolved tolerances for one comparison."""

    precision: str
    eps: float
    tiny: float          # absolute allowance at subnormals: the smallest subnormal, scaled
    rtol: float
    atol: float
    floor_factor: float
    overflow: float = math.inf  # |values| from which a correct result is +-inf (OVERFLOW)
    storage: str = ""    # the stored dtype's precision ("": the computing one)

    @property
    def floor_coef(self) -> float:
        """k * eps, the factor in front of the per-entry error floor."""
        return self.floor_factor * self.eps

    @property
    def lse_weight(self) -> float:
        """The weight of the floor's |lse| term: `LSE_WEIGHT_16` computed in 16 bits, else 1."""
        return LSE_WEIGHT_16 if self.precision in SIXTEEN_BIT else 1.0

    @property
    def coarse(self) -> str:
        """The coarser of the computing and the storage precision: whose normal range and
        subnormals the results live in."""
        stored = self.storage or self.precision
        return stored if PRECISIONS[stored][0] > PRECISIONS[self.precision][0] else self.precision

    def describe(self) -> str:
        name = self.precision if self.coarse == self.precision else (
            f"{self.precision} stored as {self.storage}")
        return (f"{name}: rtol {self.rtol:.2g}, atol {self.atol:.2g}, "
                f"floor {self.floor_factor:g}eps")



# frameworks sum 16-bit values in float32 at least (summing them in 16 bits is a bug: MLX #4379)
EPS_ACCUMULATE = PRECISIONS["f32"][0]


def reduction_floor(tol: Tolerance, n: int, total: float) -> float:
    """The error a correct reduction of n terms to `total` may carry: k times the larger of a
    pairwise or tree sum's log2(n + 1) roundings of the total and a running sum's n - 1
    roundings, which cancel in part to about sqrt(n) of them (MLX's float32 sum of 262,144
    terms: 4.1 sqrt(n) units of 2^-24), both in the accumulating precision (`EPS_ACCUMULATE`
    for 16-bit values; their final rounding is rtol's)."""
    n = max(1, n)
    units = min(tol.eps, EPS_ACCUMULATE) * max(math.log2(n + 1), math.sqrt(n))
    return tol.floor_factor * units * abs(total)


def per_sample_16(tol: Tolerance, fmt: str, binary: bool = False) -> Tolerance:
    """The rule of a loss stored as `tol` that reduces (in float32 or wider) the per-sample
    losses of a computation in the 16-bit `fmt`: each rounded to `fmt` once (k/4 eps of fmt:
    LSE_WEIGHT_16; `binary`: BINARY_WEIGHT_16), the reduction in float32 (`reduction_floor`),
    `tol`'s rtol for the stored result; +-inf where the reference is beyond fmt's range (a
    16-bit sum overflows)."""
    weight = BINARY_WEIGHT_16 if binary else LSE_WEIGHT_16
    return replace(tol, precision=fmt, eps=PRECISIONS[fmt][0],
                   floor_factor=tol.floor_factor * weight,
                   overflow=min(tol.overflow, OVERFLOW[fmt]))


def loss_rule(tol: Tolerance, binary: bool = False) -> Tolerance:
    """The rule of a loss whose precision is `tol`'s: one computed in 16 bits is held to such a
    computation's per-sample model (`per_sample_16`), not to k eps of the float32 analysis."""
    return per_sample_16(tol, tol.precision, binary) if tol.precision in SIXTEEN_BIT else tol


def resolve_tolerance(
    stored: npt.DTypeLike,
    precision: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    floor_factor: float | None = None,
) -> Tolerance:
    """Tolerances for an array stored as `stored`, computed in `precision` (default: stored, or
    the precision a widened input was stored in, e.g. bf16 read as float32): the floor in the
    computing precision's eps, the relative rule in the coarser of it and the storage's. Values
    of a second format too (bf16 ones that are float16's) take the looser of both: its
    subnormals' spacing, its range."""
    storage = stored_precision(np.dtype(stored)) or precision_of_dtype(np.dtype(stored))
    also = stored_also(np.dtype(stored)) or storage
    declared = parse_precision(precision) if precision else storage
    eps = PRECISIONS[declared][0]
    rounding = max(PRECISIONS[storage][0], eps)
    tiny = max(PRECISIONS[storage][1], PRECISIONS[declared][1], PRECISIONS[also][1])
    for flag, value in (("`rtol`", rtol), ("`atol`", atol), ("`floor_factor`", floor_factor)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise CeCheckError(f"{flag}: must be a finite number >= 0, got {value}")
    return Tolerance(
        precision=declared,
        eps=eps,
        tiny=tiny,
        rtol=DEFAULT_RTOL_FACTOR * rounding if rtol is None else float(rtol),
        atol=0.0 if atol is None else float(atol),
        floor_factor=DEFAULT_FLOOR_FACTOR if floor_factor is None else float(floor_factor),
        overflow=min(OVERFLOW[storage], OVERFLOW[declared], OVERFLOW[also]),
        storage=storage,
    )
