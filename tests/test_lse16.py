"""The floor's |lse| term in 16 bits (verify/tolerance.py LSE_WEIGHT_16), on PyTorch 2.13 autograd
gradients from fixtures/frameworks_semantics/lse16/ (`scripts/frameworks/torch_lse16_cases.py`):
float16 and bfloat16 cross-entropy through a 16-bit `logsumexp` (lse rounded to 16 bits: the
largest error a correct 16-bit computation makes in lse) and through `F.cross_entropy`, logit
std 1 to 30, pass on both kernels; the lse counted twice (a softmax term twice too large) fails,
also at std 30, where the full-weight term (k eps |lse| > 100%) let it pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ce_cli
from ce_cli.verify.tolerance import LSE_WEIGHT_16, resolve_tolerance

pytestmark = pytest.mark.usefixtures("both_kernels")

CASES = sorted((Path(__file__).parent.parent / "fixtures" / "frameworks_semantics" / "lse16")
               .glob("*.npz"))


def _case(path: Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("meta").reshape(-1)[0]))


def _check(arrays: dict, meta: dict, grad: np.ndarray, loss: bool = True):
    return ce_cli.check_grad(arrays["logits"], arrays["labels"], grad=grad,
                             loss=arrays["loss"] if loss else None, fd="sample",
                             **meta["ce_check"])


def test_fixtures_are_there():
    metas = [_case(p)[1] for p in CASES]
    assert {(m["call_tag"], m["dtype"]) for m in metas} == {
        (c, d) for c in ("lse", "fused", "zloss", "mlse") for d in ("f16", "bf16")}
    assert max(m["scale"] for m in metas) == 30.0 and max(m["C"] for m in metas) == 8192


def test_weight_is_a_quarter_in_16_bits_only():
    assert resolve_tolerance(np.float32, "bf16").lse_weight == LSE_WEIGHT_16 == 0.25
    assert resolve_tolerance(np.float16).lse_weight == LSE_WEIGHT_16
    assert resolve_tolerance(np.float32).lse_weight == 1.0
    assert resolve_tolerance(np.float32, "f32").lse_weight == 1.0  # bf16 storage, f32 computing


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_16_bit_gradients_pass(path):
    arrays, meta = _case(path)
    report = _check(arrays, meta, arrays["grad"])
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]


BUGGY = [p for p in CASES if "_lse_" in p.stem or "_zloss_" in p.stem]


@pytest.mark.parametrize("path", BUGGY, ids=lambda p: p.stem)
def test_softmax_term_doubled_is_caught(path):
    arrays, meta = _case(path)
    report = _check(arrays, meta, arrays["grad_bug_double"], loss=False)
    grad = next(c for c in report.checks if c.name == "grad_vs_reference")
    assert not grad.ok
