"""check_grad on flash-attn's real Triton cross-entropy, run by Triton's interpreter on CPU
(fixtures/frameworks_semantics/flash_attn/, made by `scripts/frameworks/flash_attn_cases.py OUT
--src SDIST --small --fixtures`, `... --old --small --fixtures` with flash-attn 2.7.4.post1's
tree and `... --tp 2 --small --fixtures`; the .npz files only), on both kernels.

flash-attn 2.8.3.post2's CrossEntropyLoss (reduction mean / sum / none with an upstream vector,
label smoothing, logit_scale, z-loss with return_z_loss, ignore_index 0, inplace_backward,
precomputed_lse; float32, float16, bfloat16): no false alarm, the half-precision gradients also
checked as flash-attn computes them (in float32, rounded once to their dtype); the real kernel
run with one argument changed (smoothing, z-loss or logit_scale left out, the scale left out of
the gradient, ignore_index changed, every row's upstream gradient g[0], a bf16 precomputed lse)
is caught. Its process_group (vocabulary parallel, 2 gloo ranks): each rank's shard passes as
`grad --shards vocab` and alone with `--vocab-offset`; a rank run without the group is caught.
flash-attn 2.7.4.post1 with a negative logit_scale: NaN where C is not a power of two, caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_semantic_frameworks import _row_plant

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "frameworks"))
import flash_attn_cases as fa  # noqa: E402  (numpy only at import: torch and Triton load in its generator)
import liger_cases  # noqa: E402

pytestmark = pytest.mark.usefixtures("both_kernels")

CASES = sorted(str(p) for p in (ROOT / "fixtures" / "frameworks_semantics" / "flash_attn")
               .glob("*.npz"))
META = {p: liger_cases.load(p)[1] for p in CASES}
TP = [p for p in CASES if META[p]["target"] == "vocab"]
OLD = [p for p in CASES if META[p].get("old")]
CORRECT = [p for p in CASES if p not in TP and p not in OLD]
HALF = [p for p in CORRECT if META[p]["dtype"] != "f32"]
PLANTED = [p for p in CORRECT if any(k.startswith("grad_bug_") for k in liger_cases.load(p)[0])]


def _stem(path: str) -> str:
    return Path(path).stem


def _failed(report) -> dict[str, str]:
    return {c.name: c.note for c in report.checks if not c.ok}


def test_flash_attn_fixtures_are_there():
    kinds = {(META[p]["variant"], META[p]["dtype"]) for p in CORRECT}
    for v in fa.VARIANTS:
        assert (v, "f32") in kinds, v
    assert {d for _, d in kinds} == {"f32", "f16", "bf16"}
    assert {META[p]["flash_attn_version"] for p in CORRECT + TP} == {"2.8.3.post2"}
    assert {META[p]["flash_attn_version"] for p in OLD} == {"2.7.4.post1"}
    assert all(m["triton_interpret"] for m in META.values())
    assert len(PLANTED) >= 20 and len(TP) >= 2 and {META[p]["world"] for p in TP} == {2}


@pytest.mark.parametrize("path", CORRECT, ids=_stem)
def test_no_false_alarm_on_flash_attn(path):
    arrays, meta = liger_cases.load(path)
    report = fa.check(arrays, meta)
    assert report.ok, _failed(report)
    rows = fa.check_rows(arrays, meta)  # reduction='none': the per-row losses and z-losses
    assert rows is None or rows.ok, _failed(rows)
    if "z_loss" in meta["ce_check"] and meta["reduction"] == "mean":
        assert "z_loss_vs_reference" in {c.name for c in report.checks}


@pytest.mark.parametrize("path", HALF, ids=_stem)
def test_half_precision_passes_as_computed_in_f32(path):
    """flash-attn computes in float32 and stores its f16 / bf16 gradient once."""
    report = fa.as_stored(*liger_cases.load(path))
    assert report.ok, _failed(report)
    rule = next(c for c in report.checks if c.name == "grad_vs_reference").rule
    assert rule.startswith("f32 stored as " + META[path]["dtype"]), rule


@pytest.mark.parametrize("path", PLANTED, ids=_stem)
def test_flash_attn_with_an_argument_changed_is_caught(path):
    arrays, meta = liger_cases.load(path)
    for key in (k for k in arrays if k.startswith("grad_bug_")):
        report = fa.check(arrays, meta, grad=arrays[key], loss=False, fd="sample")
        assert not report.ok, key
        assert "grad_vs_reference" in _failed(report), key


def test_one_entry_off_by_one_percent_is_caught():
    tried = 0
    for k, path in enumerate(p for p in CORRECT if META[p]["dtype"] == "f32"):
        arrays, meta = liger_cases.load(path)
        grad = _row_plant(arrays["grad"], "entry_x1.01", seed=k)
        assert not fa.check(arrays, meta, grad=grad, loss=False, fd="sample").ok, path
        tried += 1
    assert tried >= 20


def _cli(invoke, argv: list[str]):
    import json
    r = invoke(["grad", *argv])
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("path", TP, ids=_stem)
def test_vocabulary_parallel_ranks_pass_as_vocab_shards(path, invoke):
    """Each gloo rank's gradient shard: `grad --shards vocab` (the kernel's loss, global lse and
    z-loss compared) and alone with `--vocab-offset K --lse GLOBAL --vocab-size V`."""
    arrays, meta = liger_cases.load(path)
    assert meta["ranks_agree_on_loss"]
    grads = ("grad", None) if meta["reduction"] == "none" else ("grad",)
    for grad in grads:
        rep = _cli(invoke, fa.shard_command(path, meta, grad))
        assert rep["ok"], [c["name"] for c in rep["checks"] if not c["ok"]]
        if grad:
            assert "lse_vs_reference" in {c["name"] for c in rep["checks"]}
    for r in range(meta["world"]):
        report = fa.check_shard_alone(arrays, meta, r)
        assert report.ok, _failed(report)


@pytest.mark.parametrize("path", [p for p in TP if META[p]["dtype"] == "f32"], ids=_stem)
def test_rank_without_its_process_group_is_caught(path, invoke):
    """The rank normalised by its own shard's lse (process_group left out): every shard fails."""
    arrays, meta = liger_cases.load(path)
    rep = _cli(invoke, fa.shard_command(path, meta, "grad_bug_nogroup"))
    assert not rep["ok"]
    assert not next(c for c in rep["checks"] if c["name"] == "grad_vs_reference")["ok"]
    for r in range(meta["world"]):
        assert not fa.check_shard_alone(arrays, meta, r, arrays[f"grad_bug_nogroup_{r}"]).ok


@pytest.mark.parametrize("path", OLD, ids=_stem)
def test_negative_logit_scale_of_older_flash_attn(path):
    """flash-attn 2.7.4.post1, logit_scale -0.7 (checked as 0.7 on the negated logits): the
    last block's masked columns are -inf * S = +inf, so with C not a power of two the loss and
    every gradient entry are NaN; at C = 1,024 nothing is masked and it passes."""
    arrays, meta = liger_cases.load(path)
    report = fa.check(arrays, meta)
    assert meta["negated"] and meta["kernel_args"]["logit_scale"] < 0
    if meta["old_bug"]:
        assert np.isnan(arrays["grad"]).all()
        failed = _failed(report)
        assert {"grad_vs_reference", "loss_vs_reference"} <= set(failed)
        assert "NaN" in report.verdict or "nan" in report.verdict.lower(), report.verdict
    else:
        assert report.ok, _failed(report)


def test_negative_logit_scale_through_the_cli(invoke):
    path = next(p for p in OLD if META[p]["old_bug"] and META[p]["dtype"] == "f32"
                and META[p]["reduction"] == "mean")
    r = invoke(["grad", f"{path}:logits", f"{path}:labels", "--grad", f"{path}:grad", "--loss",
                f"{path}:loss", "--logit-scale", "0.7"])
    assert r.exit_code == 1, r.output
    assert "your gradient holds NaN or inf" in r.output
