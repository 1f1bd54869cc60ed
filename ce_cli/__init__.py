"""ce-check: verify cross-entropy losses and gradients against a float64 reference, with proof.

    import ce_cli
    report = ce_cli.check_grad(logits, labels, grad=my_grad, loss=my_loss)
    assert report.ok, report
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names load on first use (PEP 562): `import ce_cli` and the CLI's start-up pay only
# for the modules a command needs (verify.linear, the bridge, Rich's tables stay unloaded).
_PUBLIC = {
    "Reference": "ce_cli.verify.checks", "check_binary": "ce_cli.verify.checks",
    "check_grad": "ce_cli.verify.checks", "reference": "ce_cli.verify.checks",
    "CeCheckError": "ce_cli.errors",
    "LinearSettings": "ce_cli.verify.linear", "check_linear": "ce_cli.verify.linear",
    "CheckResult": "ce_cli.verify.results", "Entry": "ce_cli.verify.results",
    "Report": "ce_cli.verify.results",
}

if TYPE_CHECKING:
    from ce_cli import testing
    from ce_cli.errors import CeCheckError
    from ce_cli.verify.checks import Reference, check_binary, check_grad, reference
    from ce_cli.verify.linear import LinearSettings, check_linear
    from ce_cli.verify.results import CheckResult, Entry, Report

__all__ = ["CeCheckError", "CheckResult", "Entry", "Reference", "Report", "__version__",
           "LinearSettings", "check_binary", "check_grad", "check_linear", "reference", "testing"]


def __getattr__(name: str) -> Any:
    if name == "testing":
        return importlib.import_module("ce_cli.testing")
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ce_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
