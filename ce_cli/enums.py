"""The choices every layer shares, defined once: kinds of check, reductions, precisions,
finite-difference modes. `str` enums, so a member compares equal to its value."""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    multiclass = "multiclass"
    binary = "binary"


class Reduction(str, Enum):
    mean = "mean"
    sum = "sum"
    none = "none"


class FDMode(str, Enum):
    auto = "auto"
    full = "full"
    directional = "directional"
    sample = "sample"
    off = "off"


class Precision(str, Enum):
    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"
    f64 = "f64"
