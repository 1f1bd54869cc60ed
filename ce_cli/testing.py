"""Assertions for test suites: `assert_ce_grad` and `assert_ce_binary`.

    from ce_cli.testing import assert_ce_grad

    def test_my_cross_entropy():
        logits, labels = make_batch()
        grad, loss = my_backward(logits, labels)
        assert_ce_grad(logits, labels, grad, loss=loss)

Each takes the arrays and the options of `ce_cli.check_grad` / `ce_cli.check_binary`, returns the
`Report` when every check passes and raises `AssertionError` otherwise, with the message of
`ce_cli.report.render.failure_message` (the verdict line, then per failing check the mismatched
elements, greatest differences with their index, the worst entries). The assertions hide their own
frames from pytest's traceback (`__tracebackhide__`). Invalid input raises `ce_cli.CeCheckError`,
as the checks do.

Importing this module is cheap: Rich (used by `ce_cli.report.render`) is imported only to format a failure.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ce_cli.io.arrays import api_array
from ce_cli.io.bfloat16 import Bfloat16Rows
from ce_cli.verify.checks import check_binary, check_grad
from ce_cli.verify.results import Report

__all__ = ["assert_ce_binary", "assert_ce_grad"]


def _array(x: Any) -> Any:
    """Arrays as numpy: a PyTorch tensor as the checks read one (`ce_cli.io.arrays.api_array`),
    another framework's tensor that requires grad or lives on a device detached and copied to the
    CPU first (duck-typed: no framework is imported). None and Python numbers pass as they are."""
    if x is None or isinstance(x, (np.ndarray, int, float)):
        return x
    x = api_array(x)
    if isinstance(x, (np.ndarray, Bfloat16Rows)):
        return x
    if hasattr(x, "detach") and callable(x.detach):
        x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
    return np.asarray(x)


def _assert(check: Callable[..., Report], logits: Any, labels: Any, grad: Any, loss: Any,
            options: dict[str, Any]) -> Report:
    __tracebackhide__ = True
    arrays = {name: _array(options.pop(name)) for name in ("weight", "pos_weight") if name in options}
    with np.errstate(all="ignore"):  # over/underflow is expected and handled
        report = check(_array(logits), _array(labels), grad=_array(grad), loss=_array(loss),
                       **arrays, **options)
    if not report.ok:
        from ce_cli.report.render import failure_message

        raise AssertionError(failure_message(report))
    return report


def assert_ce_grad(logits: Any, labels: Any, grad: Any = None, *, loss: Any = None,
                   **options: Any) -> Report:
    """Assert that `grad` (and `loss`) are the softmax cross-entropy's (PyTorch `F.cross_entropy`
    semantics) for `logits` and `labels`: arrays, or tensors (detached and copied to the CPU).
    Options are those of `ce_cli.check_grad`: `weight`, `reduction`, `ignore_index`,
    `label_smoothing`, `class_axis`, `rtol`, `atol`, `precision`, ... Returns the passing `Report`."""
    __tracebackhide__ = True
    return _assert(check_grad, logits, labels, grad, loss, options)


def assert_ce_binary(logits: Any, labels: Any, grad: Any = None, *, loss: Any = None,
                     **options: Any) -> Report:
    """Assert that `grad` (and `loss`) are sigmoid binary cross-entropy's (PyTorch
    `BCEWithLogitsLoss` semantics). Options are those of `ce_cli.check_binary`: `weight`,
    `pos_weight`, `reduction`, `two_class`, `rtol`, `atol`, `precision`, ... Returns the passing
    `Report`."""
    __tracebackhide__ = True
    return _assert(check_binary, logits, labels, grad, loss, options)
