"""What an input argument names: a file (path, FILE.npz:KEY, '-' for stdin) or a typed number."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import numpy as np

from ce_cli.errors import CeCheckError


def parse_number(text: str, param: str = "loss") -> tuple[np.ndarray, float]:
    """A number typed on the command line: the value, and half a unit of its last typed digit."""
    try:
        dec = Decimal(text.strip())
    except InvalidOperation:
        raise CeCheckError(f"`{param}`: '{text}' is neither a file nor a number") from None
    if not dec.is_finite():
        return np.array(float(dec)), 0.0
    exponent = min(max(int(dec.as_tuple().exponent), -400), 400)  # beyond float64 either way
    return np.array(float(dec)), 0.5 * 10.0**exponent if exponent < 309 else float("inf")
