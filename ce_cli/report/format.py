"""Formatting shared by every renderer: numbers, pass/fail marks, JSON without bare NaN."""

from __future__ import annotations

import json
import math
from typing import Any

PASS, FAIL = "✓", "✗"


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}e}" if x != 0 else "0"


def fmt_value(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.10g}"


def json_safe(obj: Any) -> Any:
    """Non-finite floats become null: JSON never carries a bare NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(data: dict) -> str:
    """One JSON document: non-finite floats are null (`allow_nan=False` proves it)."""
    return json.dumps(json_safe(data), allow_nan=False)
