"""check_grad on gradients compiled by torch.compile (Inductor's generated CPU code: its fused
online softmax, reduction order and vectorised exp), from fixtures/frameworks_semantics/
torch_compile/ (a subset of `scripts/frameworks/torch_compile_cases.py OUT --small`, torch 2.13;
the .npz files only).

The training code of torch_semantic_cases.py (HF's soft-capped ForCausalLMLoss, z-loss, torch-form
smoothing with a soft-cap, Liger's combination, per-token weights, a logit scale) and plain,
smoothed-sum and weighted-with-ignored-rows cross-entropy, in float32 and bfloat16: no false alarm
with the case's precision, nor, for the bf16 cases whose code upcasts to float32 first, with
`precision="f32"` (computed in f32, rounded to bf16 once: the smoothed sum at C = 32,000 was a
false alarm of the median-fitted row factor, verify/allowance.py); the planted bugs (the softcap's
derivative, the z-loss, a sample weight applied twice) are caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "frameworks"))
import torch_compile_cases as tcc  # noqa: E402  (numpy only at import: torch loads in its generator)

pytestmark = pytest.mark.usefixtures("both_kernels")

CASES = sorted(str(p) for p in (ROOT / "fixtures" / "frameworks_semantics" / "torch_compile")
               .glob("*.npz"))
LOADED = {p: tcc.load(p) for p in CASES}
RUNS = [(p, prec) for p in CASES for prec in sorted({LOADED[p][1]["dtype"],
                                                      LOADED[p][1]["computed_in"]})]
FD = "sample"  # the reference's proof is the other suites' business: the verdicts are this one's
BUGS = [(p, k) for p in CASES for k in LOADED[p][0] if k.startswith("grad_bug_")]


def _id(run) -> str:
    return f"{Path(run[0]).stem}-{run[1]}"


def test_fixtures_are_there():
    metas = [m for _a, m in LOADED.values()]
    kinds = {(m["variant"], m["dtype"]) for m in metas}
    for v in (*tcc.SEMANTIC, *tcc.OWN):
        assert (v, "f32") in kinds and (v, "bf16") in kinds, v
    assert all(m["compiled"].startswith("torch.compile") for m in metas)
    assert any(m["C"] == 32_000 and m["dtype"] == "bf16" and m["computed_in"] == "f32"
               for m in metas)
    assert len(BUGS) >= 6


@pytest.mark.parametrize("run", RUNS, ids=_id)
def test_compiled_gradient_passes(run):
    path, precision = run
    report = tcc.check_case(*LOADED[path], precision, fd=FD)
    assert report.ok, {c.name: (c.mismatches, c.note) for c in report.checks if not c.ok}


@pytest.mark.parametrize("bug", BUGS, ids=lambda b: f"{Path(b[0]).stem}-{b[1]}")
def test_planted_bug_is_caught(bug):
    path, key = bug
    arrays, meta = LOADED[path]
    assert not tcc.check_case(arrays, meta, meta["dtype"], key, fd=FD).ok
