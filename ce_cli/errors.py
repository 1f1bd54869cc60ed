"""The one exception users see: bad input or usage, reported in one line, exit code 2."""

from __future__ import annotations


class CeCheckError(Exception):
    """Input or usage error: the message names the file, the shape and the offending index."""
