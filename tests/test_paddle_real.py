"""check_grad / check_binary on PaddlePaddle 3.3.1's own cross_entropy and
binary_cross_entropy_with_logits, differentiated by paddle.grad on CPU
(fixtures/frameworks_semantics/paddle/, made by `scripts/frameworks/paddle_cases.py OUT --small
--fixtures`, the .npz files only; Paddle is not imported here).

The top folder is checked by tests/test_semantic_frameworks.py; own/ holds what it cannot pass
(class weights, pos_weight) and what Paddle itself gets wrong: losses its softmax clips at
64 + log C (Paddle#20994: only the loss check fails) and float64 label smoothing, whose gradient
softmax - t is not its loss's derivative (float32 targets). Released bugs fail against the
semantics users expect: the default mean over every row, ignored ones included (Paddle#48663,
PR #76033: 2.6.2 divides by the non-ignored rows, 3.x regressed), and label smoothing with
ignore_index >= 0 (every row kept, divided by N C; 2.6.2: by N).
Planted bugs (Paddle's code with one thing changed) are caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "frameworks"))
import paddle_cases  # noqa: E402  (numpy only at import: Paddle loads in its generator)

pytestmark = pytest.mark.usefixtures("both_kernels")

DIR = ROOT / "fixtures" / "frameworks_semantics" / "paddle"
CASES = sorted(str(p) for p in list(DIR.glob("*.npz")) + list((DIR / "own").glob("*.npz")))
META = {p: paddle_cases.load(p)[1] for p in CASES}
OWN = [p for p in CASES if Path(p).parent.name == "own"]
CLIPPED = [p for p in OWN if META[p]["loss_clipped"] and not META[p]["grad_p_minus_t"]]
P_MINUS_T = [p for p in OWN if META[p]["grad_p_minus_t"]]
CLEAN = [p for p in OWN if p not in CLIPPED and p not in P_MINUS_T]
RELEASED = [p for p in CASES if "released" in META[p]]
PLANTED = [(p, k) for p in CASES for k in paddle_cases.load(p)[0] if k.startswith("grad_bug_")]


def _failed(report) -> dict[str, str]:
    return {c.name: c.note for c in report.checks if not c.ok}


def test_paddle_fixtures_are_there():
    kinds = {(META[p]["variant"], META[p]["dtype"]) for p in CASES}
    for v in paddle_cases.VARIANTS:
        assert (v, "f32") in kinds and (v, "f64") in kinds, v
    assert {META[p]["paddle"] for p in CASES} == {"3.3.1", "2.6.2"}
    assert len(CLIPPED) >= 4 and len(P_MINUS_T) >= 3 and len(CLEAN) >= 8
    assert {META[p]["variant"] for p in RELEASED} == {"mean_ign", "smooth_ign0"}


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: Path(p).stem)
def test_no_false_alarm_with_weights_and_pos_weight(path):
    arr, meta = paddle_cases.load(path)
    assert not _failed(paddle_cases.check(arr, meta))


@pytest.mark.parametrize("path", CLIPPED, ids=lambda p: Path(p).stem)
def test_clipped_loss_is_flagged_and_the_gradient_passes(path):
    """Paddle's softmax clips z - max at -64: a row's loss reads 64 + log S where the true loss
    is larger. Only the loss check fails; the gradient passes (with atol e^-64 x row factor)."""
    arr, meta = paddle_cases.load(path)
    assert list(_failed(paddle_cases.check(arr, meta))) == ["loss_vs_reference"]
    assert not _failed(paddle_cases.check(arr, meta, loss=False))


@pytest.mark.parametrize("path", P_MINUS_T[:3], ids=lambda p: Path(p).stem)
def test_float64_smoothing_gradient_is_not_its_loss_derivative(path):
    """float32 smoothed targets (rows sum to 1 +- 5e-8) and a backward softmax - t: at f64 the
    gradient and the finite differences of Paddle's own loss disagree; at f32 they agree."""
    arr, meta = paddle_cases.load(path)
    bad = _failed(paddle_cases.check(arr, meta, loss=False, fd="sample"))
    assert "grad_vs_reference" in bad and "fd_vs_grad" in bad
    assert not _failed(paddle_cases.check(arr, meta, loss=False, precision="f32"))


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: Path(p).stem)
def test_released_bugs_fail_against_the_expected_semantics(path):
    arr, meta = paddle_cases.load(path)
    if not meta["loss_clipped"]:
        assert not _failed(paddle_cases.check(arr, meta))  # Paddle's own semantics: passes
    expect = paddle_cases.expected_options(meta)
    report = paddle_cases.check(arr, meta, opts=expect)
    bad = _failed(report)
    assert "grad_vs_reference" in bad and "loss_vs_reference" in bad
    if not meta["loss_clipped"]:  # the diagnosis names the scale: "yours = 0.84 x reference:
        # mean over all 256 rows instead of the 214 not ignored?" (3.3.1's smoothing: x n/(N C))
        assert any(d.code == "scale" for d in report.diagnosis), report.diagnosis


@pytest.mark.parametrize("path,bug", PLANTED, ids=[f"{Path(p).stem}-{b[9:]}" for p, b in PLANTED])
def test_planted_bugs_are_caught(path, bug):
    arr, meta = paddle_cases.load(path)
    assert not paddle_cases.check(arr, meta, grad=arr[bug], loss=False, fd="sample").ok


MEAN_IGN = [p for p in CASES if META[p]["variant"] == "mean_ign" and META[p]["C"] == 10
            and META[p]["dtype"] == "f32"]


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_default_mean_regressed_from_2_6_2_to_3_3_1(scale):
    """The same call, `cross_entropy(z, y)` with labels -100: 2.6.2's gradient is PyTorch's
    mean over the non-ignored rows, 3.3.1's is divided by every row."""
    by_version = {META[p]["paddle"]: p for p in MEAN_IGN if META[p]["scale"] == scale}
    torch_mean = dict(reduction="mean", ignore_index=-100, precision="f32")
    old = paddle_cases.load(by_version["2.6.2"])
    new = paddle_cases.load(by_version["3.3.1"])
    assert paddle_cases.check(*old, opts=torch_mean).ok
    assert not paddle_cases.check(*new, opts=torch_mean).ok
