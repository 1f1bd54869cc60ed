"""ce-check: verify cross-entropy losses and gradients against a float64 reference, with proof.

    import ce_cli
    report = ce_cli.check_grad(logits, labels, grad=my_grad, loss=my_loss)
    assert report.ok, report
"""

__version__ = "0.1.0"

from ce_cli.verify.checks import Reference, check_binary, check_grad, reference  # noqa: E402
from ce_cli.errors import CeCheckError  # noqa: E402
from ce_cli.verify.linear import LinearSettings, check_linear  # noqa: E402
from ce_cli.verify.results import CheckResult, Entry, Report  # noqa: E402
from ce_cli import testing  # noqa: E402  (cheap: imports Rich only to format a failure)

__all__ = ["CeCheckError", "CheckResult", "Entry", "Reference", "Report", "__version__",
           "LinearSettings", "check_binary", "check_grad", "check_linear", "reference", "testing"]
