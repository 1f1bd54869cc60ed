"""check_grad / check_linear on Liger-Kernel's real Triton kernels, run by Triton's interpreter
on CPU (fixtures/frameworks_semantics/liger/, made by `scripts/frameworks/liger_cases.py OUT
--small --fixtures`, and with liger-kernel 0.5.8 / 0.8.1 on PYTHONPATH `--small --fixtures --old
--ce` / `... --old --linear`; the .npz files only).

LigerCrossEntropyLoss 0.8.5 (reduction mean / sum / none with an upstream vector, label
smoothing, softcap, z-loss with return_z_loss, class weights (with z-loss: the coefficient times
the mean label weight), combined; float32 and bfloat16) and LigerFusedLinearCrossEntropyLoss
(hidden, weight, bias): no false alarm; the real kernel
run with one argument changed (the z-loss, the smoothing, the class weights left out, every
row's upstream gradient g[0]) is caught. The released bugs: liger-kernel 0.5.8's
reduction='none' backward scales every row by the first row's upstream gradient
(linkedin/Liger-Kernel#678: all zero when that token is masked), and 0.8.1's fused linear
cross-entropy does the same to grad_hidden, grad_weight and grad_bias (#968, PR #1298): caught,
with the loss (the forward was right) passing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_semantic_frameworks import _row_plant

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "frameworks"))
import liger_cases  # noqa: E402  (numpy only at import: torch and Triton load in its generator)

CASES = sorted(str(p) for p in (ROOT / "fixtures" / "frameworks_semantics" / "liger").glob("*.npz"))
META = {p: liger_cases.load(p)[1] for p in CASES}
CORRECT = [p for p in CASES if not META[p]["old"]]
OLD = [p for p in CASES if META[p]["old"]]
PLANTED = [p for p in CORRECT if liger_cases.planted(*liger_cases.load(p))]


def _stem(path: str) -> str:
    return Path(path).stem


def _failed(report) -> dict[str, str]:
    return {c.name: c.note for c in report.checks if not c.ok}


def test_liger_fixtures_are_there():
    metas = [META[p] for p in CORRECT]
    kinds = {(m["call_tag"], m["variant"], m["dtype"]) for m in metas}
    for v in liger_cases.VARIANTS:
        assert ("ce", v, "f32") in kinds and ("ce", v, "bf16") in kinds or v == "weight_zloss", v
    assert ("ce", "weight_zloss", "f32") in kinds
    for v in liger_cases.LINEAR:
        assert ("flce", v, "f32") in kinds, v
    assert {m["liger_version"] for m in metas} == {"0.8.5"}
    assert {META[p]["liger_version"] for p in OLD} == {"0.5.8", "0.8.1"}
    assert all(m["triton_interpret"] for m in META.values())
    assert len(PLANTED) >= 20


@pytest.mark.parametrize("path", CORRECT, ids=_stem)
def test_no_false_alarm_on_liger_kernels(path):
    arrays, meta = liger_cases.load(path)
    report = liger_cases.check(arrays, meta)
    assert report.ok, _failed(report)
    rows = liger_cases.check_rows(arrays, meta)  # reduction='none': the per-row losses too
    assert rows is None or rows.ok, _failed(rows)


@pytest.mark.parametrize("path", PLANTED, ids=_stem)
def test_liger_kernel_with_a_term_left_out_is_caught(path):
    arrays, meta = liger_cases.load(path)
    bugs = liger_cases.planted(arrays, meta)
    assert bugs
    for bug, grads in bugs.items():
        report = liger_cases.check(arrays, meta, grads=grads, loss=False)
        assert not report.ok, bug


def test_one_entry_off_by_one_percent_is_caught():
    tried = 0
    for k, path in enumerate(p for p in CORRECT if META[p]["target"] != "linear"
                             and META[p]["dtype"] == "f32"):
        arrays, meta = liger_cases.load(path)
        grad = _row_plant(arrays["grad"], "entry_x1.01", seed=k)
        assert not liger_cases.check(arrays, meta, grads={"grad": grad}, loss=False).ok, path
        tried += 1
    assert tried >= 20


@pytest.mark.parametrize("path", OLD, ids=_stem)
def test_released_reduction_none_bug_is_caught(path):
    """The old kernel's forward is right (the loss and per-row losses pass); its backward
    scales every row by g[0], which the gradient checks flag, finite differences included."""
    arrays, meta = liger_cases.load(path)
    failed = _failed(liger_cases.check(arrays, meta))
    assert "loss_vs_reference" not in failed
    if meta["target"] == "linear":
        assert "grad_weight_vs_reference" in failed
        # bf16 cases this small are checked entry by entry (linear's default for bf16)
        note = failed["grad_weight_vs_reference"]
        assert "vocabulary rows fail" in note or note.startswith("exact: every entry")
        assert "fd_weight_vs_grad" in failed
    else:
        assert {"grad_vs_reference", "fd_vs_grad"} <= set(failed)
        assert liger_cases.check_rows(arrays, meta).ok


def test_liger_678_zero_gradient_through_the_cli(invoke, tmp_path):
    """liger-kernel 0.5.8, reduction='none', the first token's upstream gradient 0: every row's
    gradient is 0; the CLI says so in its verdict (a wrong scale factor of 0)."""
    path = next(p for p in OLD if META[p]["call_tag"] == "old058" and META[p]["scale"] == 1.0
                and META[p]["dtype"] == "f32" and META[p]["variant"] == "none")
    arrays, _ = liger_cases.load(path)
    assert not np.any(arrays["grad"]) and arrays["sample_weight"][0] == 0
    for k in ("logits", "labels", "grad", "loss", "sample_weight"):
        np.save(tmp_path / f"{k}.npy", arrays[k])
    r = invoke(["grad", tmp_path / "logits.npy", tmp_path / "labels.npy", "--grad",
                tmp_path / "grad.npy", "--loss", tmp_path / "loss.npy", "--sample-weight",
                tmp_path / "sample_weight.npy", "--reduction", "sum"])
    assert r.exit_code == 1, r.output
    assert "verdict: FAIL — gradient vs reference" in r.output
    assert "yours = 0 x reference everywhere" in r.output


# ---------------------------------------------------------------- computed in f32, stored in bf16

ASCEND = sorted(str(p) for p in (ROOT / "fixtures" / "frameworks_semantics" / "liger_ascend")
                .glob("*.npz"))
BF16_CE = [p for p in CORRECT if META[p]["dtype"] == "bf16" and META[p]["call_tag"] == "ce"]


def _as_stored_bf16(arr: dict, meta: dict, precision: str | None):
    """The case with its gradient tagged as stored in bf16 (what a bf16 .npy, .pt or
    .safetensors file loads as) and checked as computed in `precision` (None: bf16)."""
    from ce_cli.io.bfloat16 import BF16

    meta = {**meta, "ce_check": {**meta["ce_check"], "precision": precision}}
    return liger_cases.check(arr, meta, grads={"grad": arr["grad"].astype(BF16)}, loss=False)


@pytest.mark.parametrize("path", BF16_CE, ids=_stem)
def test_liger_bf16_passes_as_computed_in_f32(path):
    """Liger's kernel computes in float32 and writes its bf16 gradient once: `--precision f32`
    on the bf16 gradient (bf16's rounding, f32's floor) raises no alarm."""
    report = _as_stored_bf16(*liger_cases.load(path), "f32")
    assert report.ok, _failed(report)
    assert next(c for c in report.checks if c.name == "grad_vs_reference").rule.startswith(
        "f32 stored as bf16")


def test_ascend_true_class_rounding_is_caught_as_computed_in_f32():
    """liger-kernel 0.8.1's Ascend path rounds p_y to bf16 before taking 1 off (PR #1341): a
    bf16 computation (the default model) may do that and passes; declared computed in f32 it
    fails, at the label entries of confident rows."""
    assert len(BF16_CE) >= 10 and len(ASCEND) == 1
    arr, meta = liger_cases.load(ASCEND[0])
    assert meta["liger_version"] == "0.8.1" and "ascend" in meta["kernel"]
    assert _as_stored_bf16(arr, meta, None).ok
    report = _as_stored_bf16(arr, meta, "f32")
    grad = next(c for c in report.checks if c.name == "grad_vs_reference")
    assert not grad.ok and grad.mismatches >= 10
    labels = arr["labels"]
    assert all(e.index[1] == labels[e.index[0]] for e in grad.worst)
