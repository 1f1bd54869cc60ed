"""check_grad on Unsloth's real Triton cross-entropy (`fast_cross_entropy_loss`, unsloth
2026.10.9), run by Triton's interpreter on CPU (fixtures/frameworks_semantics/unsloth/, made by
`scripts/frameworks/unsloth_cases.py OUT --small --fixtures --wheel unsloth-2026.10.9-...whl`
and, with older wheels, `--old`; the .npz files only).

Unsloth's loss is the sum of the per-token losses over n_items (by default the labelled
tokens: `--reduction mean --ignore-index -100`; the caller's n_items: `--reduction sum
--denominator N`), with logit scaling (`--logit-scale`) and soft-capping (`--softcap`), float32
inside and the gradient stored in the logits' dtype. No false alarm on either kernel; the real
kernel with one line changed (the soft-cap's derivative, the scaling's factor, a chunk's lse)
or n_items left out is caught. Released bugs: unsloth <= 2026.8.22 lets the padded lanes past V
join the soft-capped logsumexp at -softcap (unslothai/unsloth#10616), unsloth <= 2026.9.14
writes the gradient into the saved logits, so a z-loss added on the same logits differentiates
the gradient instead (#5002): both caught in float32, both gone in the fixed releases.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "frameworks"))
import unsloth_cases  # noqa: E402  (numpy only at import: torch and Triton load in its generator)

pytestmark = pytest.mark.usefixtures("both_kernels")

CASES = sorted(str(p) for p in (ROOT / "fixtures" / "frameworks_semantics" / "unsloth")
               .glob("*.npz"))
META = {p: unsloth_cases.liger_cases.load(p)[1] for p in CASES}
SWEEP = [p for p in CASES if "scenario" not in META[p]]
OLD = [p for p in CASES if META[p].get("old")]
FIXED = [p for p in CASES if "scenario" in META[p] and not META[p]["old"]]
PLANTED = [p for p in SWEEP if unsloth_cases.planted(unsloth_cases.liger_cases.load(p)[0])]


def _stem(path: str) -> str:
    return Path(path).stem


def _load(path: str):
    return unsloth_cases.liger_cases.load(path)


def _failed(report) -> dict[str, str]:
    return {c.name: c.note for c in report.checks if not c.ok}


def test_unsloth_fixtures_are_there():
    kinds = {(META[p]["variant"], META[p]["dtype"]) for p in SWEEP}
    for v in unsloth_cases.VARIANTS:
        for dt in unsloth_cases.DTYPES:
            assert (v, dt) in kinds, (v, dt)
    assert {META[p]["unsloth_version"] for p in SWEEP} == {"2026.10.9"}
    assert any(META[p]["C"] > 65_536 for p in SWEEP)  # the chunked path
    assert all(META[p]["triton_interpret"] for p in CASES)
    assert {META[p]["scenario"] for p in OLD} == {"pad", "inplace"}
    assert {META[p]["scenario"] for p in FIXED} == {"pad", "inplace"}
    bugs = {b for p in PLANTED for b in unsloth_cases.planted(_load(p)[0])}
    assert bugs == {"nocap", "noscale", "noitems", "chunklabel", "chunkdrop"}


@pytest.mark.parametrize("path", SWEEP + FIXED, ids=_stem)
def test_no_false_alarm_on_unsloth_kernel(path):
    arrays, meta = _load(path)
    report = unsloth_cases.check(arrays, meta)
    assert report.ok, _failed(report)


@pytest.mark.parametrize("path", PLANTED, ids=_stem)
def test_unsloth_kernel_with_one_line_changed_is_caught(path):
    arrays, meta = _load(path)
    for bug, grad in unsloth_cases.planted(arrays).items():
        assert not unsloth_cases.check(arrays, meta, grad=grad, loss=False).ok, bug


def _entry_plant(g: np.ndarray, seed: int) -> np.ndarray:
    """The largest entry x1.01 of a random row among those whose largest entry is at least a
    tenth of the gradient's (half the labels are confident: their rows' entries are near 0,
    where 1 % is below float32's floor eps (1 + |lse|) of the row)."""
    a = g.astype(np.float64).reshape(-1, g.shape[-1]).copy()
    top = np.abs(a).max(axis=1)
    rows = np.nonzero(top >= 0.1 * top.max())[0]
    r = int(rows[np.random.default_rng(seed).integers(rows.size)])
    a[r, int(np.argmax(np.abs(a[r])))] *= 1.01
    return a.reshape(g.shape).astype(g.dtype)


def test_one_entry_off_by_one_percent_is_caught():
    tried = 0
    for k, path in enumerate(p for p in SWEEP if META[p]["dtype"] == "f32"):
        arrays, meta = _load(path)
        grad = _entry_plant(arrays["grad"], seed=k)
        assert not unsloth_cases.check(arrays, meta, grad=grad, loss=False).ok, path
        tried += 1
    assert tried >= 20


@pytest.mark.parametrize("path", [p for p in SWEEP if META[p]["dtype"] != "f32"], ids=_stem)
def test_16_bit_gradient_passes_as_computed_in_f32(path):
    """Unsloth computes in float32 and writes the 16-bit gradient once: `--precision f32` on
    the gradient stored in its dtype raises no alarm."""
    from ce_cli.io.bfloat16 import BF16

    arrays, meta = _load(path)
    stored = arrays["grad"].astype(BF16 if meta["dtype"] == "bf16" else np.float16)
    meta = {**meta, "ce_check": {**meta["ce_check"], "precision": "f32"}}
    report = unsloth_cases.check(arrays, meta, grad=stored, loss=False)
    assert report.ok, _failed(report)


@pytest.mark.parametrize("path", OLD, ids=_stem)
def test_released_unsloth_bug_is_caught(path):
    """#10616 (the padded lanes at -softcap in the logsumexp): the loss carries the extra mass,
    and so does the gradient, a row factor the normaliser check names (the bf16 case with 24
    padded lanes: the loss only, checked as computed in float32). #5002 (the gradient written
    into the saved logits): the z-loss's gradient is taken at the CE gradient, not the logits."""
    arrays, meta = _load(path)
    failed = _failed(unsloth_cases.check(arrays, meta))
    if meta["scenario"] == "pad":
        assert "loss_vs_reference" in failed, failed
    if meta["scenario"] == "inplace" or meta["dtype"] == "f32" or meta["C"] > 65_536:
        assert {"grad_vs_reference", "normaliser"} <= set(failed), failed
        assert "rows pass with it; normaliser off by" in failed["normaliser"]


def test_released_bugs_have_their_fixed_twin():
    """The same scenario and seed run by the fixed release passes (above), so the failure is
    the bug's, not the scenario's."""
    key = {p: (META[p]["scenario"], META[p]["dtype"], META[p]["C"], META[p]["scale"])
           for p in OLD + FIXED}
    assert {key[p] for p in OLD} <= {key[p] for p in FIXED}
    for p in OLD:
        twin = next(q for q in FIXED if key[q] == key[p])
        a, b = _load(p)[0], _load(twin)[0]
        assert np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["labels"], b["labels"])


def test_unsloth_10616_through_the_cli(invoke, tmp_path):
    """unsloth 2026.8.22, softcap 30, V 70,000 (61,072 padded lanes in the second chunk): the
    CLI fails the check and names the row factor; 2026.9.14 on the same inputs passes."""
    for version, code in (("2026822", 1), ("2026914", 0)):
        path = next(p for p in OLD + FIXED if f"pad{version}_f32_btv_C70000" in p)
        arrays, _ = _load(path)
        for k in ("logits", "labels", "grad", "loss"):
            np.save(tmp_path / f"{k}.npy", arrays[k])
        r = invoke(["grad", tmp_path / "logits.npy", tmp_path / "labels.npy", "--grad",
                    tmp_path / "grad.npy", "--loss", tmp_path / "loss.npy", "--softcap", "30",
                    "--precision", "f32"])
        assert r.exit_code == code, r.output
        if code:
            assert "verdict: FAIL" in r.output and "normaliser off by" in r.output
