"""bfloat16 arrays through the Python API: what a JAX array becomes under np.asarray (ml_dtypes'
bfloat16), or the raw `V2` bits, is widened exactly and compared as stored bf16, as a bf16 file
is on the command line; a PyTorch bf16 tensor (a stand-in here: torch is not a test dependency)
reaches the checks and `ce_cli.testing` the way the .pt loader reads one."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import ce_cli
from ce_cli.io.bfloat16 import stored_precision, widen_if_bfloat16
from ce_cli.testing import assert_ce_grad
from tests.conftest import FIXTURES, softmax

D = FIXTURES / "example"


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even), as uint16 bits."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def as_float(bits: np.ndarray) -> np.ndarray:
    """The float64 values of bfloat16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def as_void(bits: np.ndarray) -> np.ndarray:
    return bits.view("V2")


def as_ml_dtypes(bits: np.ndarray) -> np.ndarray:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return bits.view(ml_dtypes.bfloat16)


@pytest.fixture(params=[as_void, as_ml_dtypes], ids=["V2", "ml_dtypes"])
def bf16(request):
    return request.param


def case():
    z = np.load(D / "logits.npy")
    y = np.load(D / "labels.npy")
    g = softmax(z.astype(np.float64))
    g[np.arange(len(y)), y] -= 1.0
    return z, y, g / len(y)


def test_widen_if_bfloat16_is_exact_and_tagged(bf16):
    bits = to_bf16_bits(np.array([1.0, -2.5e-3, 3.0e38, 1e-40], np.float32))
    wide = widen_if_bfloat16(bf16(bits))
    assert wide.dtype == np.float32 and stored_precision(wide.dtype) == "bf16"
    np.testing.assert_array_equal(wide.view(np.uint32) >> 16, bits)
    for other in (None, 1.5, np.ones(3, np.float16), "x"):
        assert widen_if_bfloat16(other) is other


def test_check_grad_takes_bf16_arrays(bf16):
    z, y, g = case()
    zb, gb = bf16(to_bf16_bits(z)), bf16(to_bf16_bits(g))
    report = ce_cli.check_grad(zb, y, grad=gb)
    assert report.ok
    grad = next(c for c in report.checks if c.name == "grad_vs_reference")
    assert grad.rule.startswith("bf16")
    # the same report as the widened float32 arrays with the precision said
    same = ce_cli.check_grad(widen_if_bfloat16(zb).astype(np.float32), y,
                             grad=widen_if_bfloat16(gb).astype(np.float32), precision="bf16")
    assert [(c.name, c.ok, c.max_abs_err) for c in report.checks] == \
        [(c.name, c.ok, c.max_abs_err) for c in same.checks]
    # a wrong bf16 gradient fails: row 7's label entry with the wrong sign (a + y for a - y)
    g_bad = g.copy()
    g_bad[7, y[7]] = -g_bad[7, y[7]]
    assert not ce_cli.check_grad(zb, y, grad=bf16(to_bf16_bits(g_bad))).ok


def test_bf16_gradient_computed_in_f32(bf16):
    """`precision="f32"` on a bf16 array: computed in f32, rounded to bf16 once."""
    z, y, g = case()
    report = ce_cli.check_grad(z, y, grad=bf16(to_bf16_bits(g)), precision="f32")
    assert report.ok
    assert next(c for c in report.checks if c.name == "grad_vs_reference").rule.startswith(
        "f32 stored as bf16")


def test_check_binary_and_linear_and_reference_take_bf16(bf16):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    t = (rng.random((8, 6)) < 0.5).astype(np.float32)
    xb = bf16(to_bf16_bits(x))
    xw = widen_if_bfloat16(xb).astype(np.float64)
    gb = (1.0 / (1.0 + np.exp(-xw)) - t) / x.size
    assert ce_cli.check_binary(xb, t, grad=bf16(to_bf16_bits(gb))).ok
    h = rng.standard_normal((8, 4)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    y = rng.integers(0, 6, 8)
    assert ce_cli.check_linear(bf16(to_bf16_bits(h)), bf16(to_bf16_bits(w)), y).ok
    ref = ce_cli.reference(xb, np.arange(8) % 6)
    np.testing.assert_array_equal(ref.grad, ce_cli.reference(xw, np.arange(8) % 6).grad)


class _StandInTensor:
    """Enough of a torch.Tensor for io.torch_pt.tensor_to_numpy: a bf16 tensor's int16 view."""

    def __init__(self, torch, bits: np.ndarray) -> None:
        self.bits, self.dtype, self.layout, self.is_quantized = bits, torch.bfloat16, "strided", False

    def detach(self):
        return self

    cpu = resolve_conj = resolve_neg = detach

    def view(self, dtype):
        return types.SimpleNamespace(numpy=lambda: self.bits.view(np.int16))


def test_testing_takes_a_torch_bf16_tensor(monkeypatch):
    torch = types.ModuleType("torch")
    torch.bfloat16, torch.int16, torch.strided = "bfloat16", "int16", "strided"
    torch.Tensor = _StandInTensor
    monkeypatch.setitem(sys.modules, "torch", torch)
    z, y, g = case()
    report = assert_ce_grad(_StandInTensor(torch, to_bf16_bits(z)), y,
                            _StandInTensor(torch, to_bf16_bits(g)))
    assert next(c for c in report.checks if c.name == "grad_vs_reference").rule.startswith("bf16")
    direct = ce_cli.check_grad(_StandInTensor(torch, to_bf16_bits(z)), y,
                               grad=_StandInTensor(torch, to_bf16_bits(g)))
    assert direct.ok and direct.checks == report.checks
