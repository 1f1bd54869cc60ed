"""check_binary's default rule on JAX sigmoid BCE in 16 bits as training code reduces it, from
fixtures/binary16/ (`scripts/frameworks/jax_binary16_cases.py`, jax 0.10.2, optax 0.2.8): 16-bit
per-element losses times a float32 mask reduced in float32 (the loss passes as such, with a note),
a float16 gradient of subnormals that bfloat16 holds too (float16's subnormal spacing allowed), a
float16 mean and a float16 sum that overflows to +inf. All pass on both kernels with no precision
given; the mask left out of the gradient and the loss divided by every element fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ce_cli

pytestmark = pytest.mark.usefixtures("both_kernels")

CASES = sorted((Path(__file__).parent.parent / "fixtures" / "binary16").glob("*.npz"))


def _case(path: Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("meta").reshape(-1)[0]))


def _check(arrays: dict, meta: dict, **replace):
    a = {**arrays, **replace}
    kw = dict(meta["ce_check"])
    if kw.pop("weight", None):
        kw["weight"] = a["weight"]
    return ce_cli.check_binary(a["logits"], a["labels"], grad=a["grad"], loss=a["loss"], **kw)


def test_fixtures_are_there():
    recipes = {(m["recipe"], m["dtype"]) for m in (_case(p)[1] for p in CASES)}
    assert recipes == {("masked", "bf16"), ("masked", "f16"), ("mean", "f16"), ("sum", "f16")}


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_16_bit_binary_passes_by_default(path):
    arrays, meta = _case(path)
    report = _check(arrays, meta)
    assert report.ok, [(c.name, c.rule, c.note) for c in report.checks if not c.ok]
    if meta["recipe"] == "sum":
        assert np.isinf(arrays["loss"])


MASKED = [p for p in CASES if "_masked_" in p.stem]


@pytest.mark.parametrize("path", MASKED, ids=lambda p: p.stem)
def test_mask_left_out_and_wrong_count_fail(path):
    arrays, meta = _case(path)
    report = _check(arrays, meta, grad=arrays["grad_bug_nomask"])
    assert not next(c for c in report.checks if c.name == "grad_vs_reference").ok
    report = _check(arrays, meta, loss=arrays["loss_bug_count"])
    assert not next(c for c in report.checks if c.name == "loss_vs_reference").ok


def _element_loss_check(dtype: str, label: float, off: float) -> bool:
    """Whether PyTorch's element loss at x = -40, pos_weight 5, `off` times eps |x| (|1 - y| +
    2c) off, passes a 16-bit loss's rule."""
    eps = {"f16": 2.0**-10, "bf16": 2.0**-7}[dtype]
    x, pw = -40.0, 5.0
    c = (pw - 1.0) * label + 1.0
    ref = (1.0 - label) * x + c * np.logaddexp(0.0, -x)  # softplus(-x) = -logsigmoid(x)
    err = eps * abs(x) * (abs(1.0 - label) + 2.0 * c)
    report = ce_cli.check_binary(np.array([[x]]), np.array([[label]]), pos_weight=pw,
                                 loss=np.array([[ref + off * err]]), reduction="none",
                                 precision=dtype)
    return next(c for c in report.checks if c.name == "loss_vs_reference").ok


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("label", [0.0, 0.3, 1.0])
def test_16bit_element_loss_covers_pytorchs_roundings_of_x(dtype, label):
    """PyTorch's 16-bit (1 - y) x - c logsigmoid(x), c = (pw - 1) y + 1, rounds terms of ~|x|
    more than once (c, logsigmoid, their product): eps |x| (|1 - y| + 2c) at x << 0 is within
    a 16-bit loss's rule (k/2 of the element floor's |x| terms, tolerance.BINARY_WEIGHT_16;
    k/4, as for softmax, allowed two thirds of it at y = 0, where the loss is ~0)."""
    assert _element_loss_check(dtype, label, 0.99)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_16bit_element_loss_twice_that_fails_where_the_loss_is_0(dtype):
    assert not _element_loss_check(dtype, 0.0, 2.0)
