"""check_binary on real PyTorch `F.binary_cross_entropy_with_logits` gradients
(fixtures/binary_frameworks/torch/, made by `scripts/frameworks/torch_binary_cases.py --small`:
f32/f16/bf16, K = 10 (and two K = 1,000 cases), std 1/5/30, mean/sum/none, weight, pos_weight
along the last axis or as (K, 1) on (N, K, d) logits, soft labels). Correct gradients raise no alarm, planted bugs are caught.

Two false alarms this sweep found are fixed, and their cases pass here:
- pos_weight < 1: PyTorch forms (pw y + 1 - y) s(x) - pw y, so 1 + pw y rounds at eps (1 + pw y)
  where the floor took eps |1 + (pw - 1) y|;
- reduction 'none' with soft labels at std 30: PyTorch's element loss (1 - y) x - c logsigmoid(x)
  cancels at x << 0 (an error eps |x| (|1 - y| + |pw y|), which the floor left out).
A float16 sum beyond float16's range is inf in PyTorch, its correctly rounded value: it passes,
with a note.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

import ce_cli

CASES = sorted(glob.glob(str(Path(__file__).parent.parent / "fixtures" / "binary_frameworks"
                             / "torch" / "*.npz")))
FIXED = ("torch_bce_f32_nc_C1000_s30_mean_pw_small", "torch_bce_bf16_nc_C1000_s30_mean_pw_small",
         "torch_bce_bf16_nc_C10_s30_none_soft_none", "torch_bce_f16_nc_C10_s30_none_soft_none",
         "torch_bce_bf16_nc_C10_s30_none_soft_weight_pw_none",
         "torch_bce_f16_nc_C10_s30_none_soft_weight_pw_none",
         "torch_bce_f32_nc_C10_s30_none_soft_weight_pw_none")
OVERFLOW = "torch_bce_f16_nc_C10_s30_sum_soft_weight_pw_sum"  # the sum exceeds float16's range


def _case(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta").reshape(-1)[0]))
    opts = {k: v for k, v in meta["ce_check"].items() if k not in ("weight", "pos_weight")}
    return arrays, opts


def _check(arrays: dict, opts: dict, grad: np.ndarray | None = None):
    return ce_cli.check_binary(arrays["logits"], arrays["labels"],
                               grad=arrays["grad"] if grad is None else grad, loss=arrays["loss"],
                               weight=arrays.get("weight"), pos_weight=arrays.get("pos_weight"),
                               **opts)


def test_binary_framework_fixtures_are_there():
    assert len(CASES) >= 95
    assert sum("pw_axis1" in p for p in CASES) == 6  # pos_weight (K, 1) on (N, K, d) logits
    dtypes = {Path(p).stem.split("_")[2] for p in CASES}
    assert dtypes == {"f32", "f16", "bf16"}
    assert {Path(p).stem for p in CASES} >= {*FIXED, OVERFLOW}


@pytest.mark.parametrize("path", CASES, ids=lambda p: Path(p).stem)
def test_no_false_alarm_on_torch_bce_gradients(path):
    arrays, opts = _case(path)
    report = _check(arrays, opts)
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]


def test_float16_sum_beyond_its_range_is_inf_and_passes_with_a_note():
    """The reference sum is beyond float16's largest number: PyTorch returns inf, its correctly
    rounded value; the loss check passes and says so."""
    arrays, opts = _case(next(p for p in CASES if Path(p).stem == OVERFLOW))
    assert np.isinf(arrays["loss"])
    report = _check(arrays, opts)
    loss = next(c for c in report.checks if c.name == "loss_vs_reference")
    assert report.ok and loss.ok and report.loss > 65520.0
    assert "beyond the f16 range" in loss.note


def _plant(g: np.ndarray, bug: str, seed: int) -> np.ndarray:
    """A bug in a random non-zero row of g (the last axis): its largest entry x1.01 or negated,
    or the whole row x (1 + 2e-3)."""
    a = g.astype(np.float64).reshape(-1, g.shape[-1]).copy()
    live = np.nonzero(np.abs(a).max(axis=1) > 0)[0]
    r = int(live[np.random.default_rng(seed).integers(live.size)])
    c = int(np.argmax(np.abs(a[r])))
    if bug == "entry_x1.01":
        a[r, c] *= 1.01
    elif bug == "row_x(1+2e-3)":
        a[r] *= 1 + 2e-3
    else:
        a[r, c] = -a[r, c]
    return a.reshape(g.shape).astype(g.dtype)


F32 = [p for p in CASES if "_f32_" in Path(p).stem]


@pytest.mark.parametrize("bug", ["entry_x1.01", "row_x(1+2e-3)", "sign_flip"])
def test_planted_bugs_in_float32_torch_bce_gradients_are_caught(bug):
    missed = []
    for k, path in enumerate(F32):
        arrays, opts = _case(path)
        planted = _plant(arrays["grad"], bug, seed=k)
        assert not np.array_equal(planted, arrays["grad"])
        if _check(arrays, opts, grad=planted).ok:
            missed.append(Path(path).stem)
    assert len(F32) >= 25
    assert not missed, missed
