"""The one exception users see: bad input or usage, reported in one line, exit code 2."""

from __future__ import annotations

import re

# a parameter named in a message: `label_smoothing` or `reduction=none`
_MENTION = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


class CeCheckError(Exception):
    """Input or usage error: the message names the file, the shape and the offending index.

    Messages name the library's parameters in backquotes (`label_smoothing`, `reduction=none`);
    the command line shows them as its flags (`as_flags`)."""

    def as_flags(self) -> str:
        return as_flags(str(self))


def as_flags(text: str) -> str:
    """`text` with every `param` as --param and `param=value` as --param value."""
    def flag(m: re.Match[str]) -> str:
        name = "--" + m[1].replace("_", "-")
        return name if m[2] is None else f"{name} {m[2]}"

    return _MENTION.sub(flag, text)
