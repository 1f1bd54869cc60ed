"""check_grad / check_binary on real framework gradients of the training-code options.

PyTorch autograd (fixtures/frameworks_semantics/torch/, made by
`scripts/frameworks/torch_semantic_cases.py --small`: Gemma-2/HF softcap with shifted labels
and num_items_in_batch, PaLM/OLMo z-loss, Cohere
logit scale, per-token sample weights (zeros included), label smoothing in both forms, Liger's
softcap + z-loss + smoothing, bf16 CPU autocast; f32/f16/bf16, std 1/10/30/50, (N, C) and
(B, T, V), mean/sum). JAX on XLA's CPU, flush-to-zero (fixtures/frameworks_semantics/jax/,
`scripts/frameworks/jax_semantic_cases.py --small`: Gemma's soft-cap with optax, T5X's custom-VJP
z-loss cross-entropy with its smoothing and per-token weights, optax's sigmoid BCE; f32/bf16).
optax's own softmax_cross_entropy (probability rows), ..._with_integer_labels, `where=` on tokens
and on classes (fixtures/frameworks_semantics/optax/, `scripts/frameworks/optax_cases.py`) and
Keras 3's SparseCategoricalCrossentropy(from_logits=True, ignore_class=k), sample weights
included (fixtures/frameworks_semantics/keras/, `scripts/frameworks/keras_cases.py`).
Correct gradients raise no alarm; planted bugs are caught.

The JAX sweep (152 cases up to C = 256,000) found two false alarms, since closed: T5X's backward
multiplies the softmax by the weight after XLA flushed it, so flushed results reach the smallest
normal times the weight (the flush threshold now scales with it); and XLA's float32 tanh errs by
up to 2.4 eps, which 1 - tanh^2 turns into 4.75 eps of the soft-cap's T' (the floor's S |dl/dz|
term now allows 8 eps).

PyTorch's float16 label smoothing sums -log a over every class and row in float16 before it
divides: the loss overflows to inf where the true mean is a few units. Its gradient passes; the
loss check flags the overflow, rightly.

The PyTorch sweep (548 cases up to C = 256,000; no false alarm on either kernel) found one blind
spot, since closed: a z-loss left out of the backward is a row factor -2 zeta lse / Qe on the
softmax term (2.2e-3 to 2.6e-3 at zeta 1e-4), inside the float32 normaliser bound
0.5 eps (C - 1) once C exceeds about 42,000; the normaliser check now names a factor that tracks
lse row by row (tests/test_zloss_signature.py emulates it at C = 1,000).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

import ce_cli

# fixture folders with a test of their own (test_liger_real, test_torch_compile_real, ...)
OWN_TESTS = ("liger", "liger_ascend", "torch_compile", "flash_attn", "unsloth", "megatron",
             "empty_mean", "lse16")
CASES = sorted(p for p in glob.glob(str(Path(__file__).parent.parent / "fixtures"
                                       / "frameworks_semantics" / "*" / "*.npz"))
               if Path(p).parent.name not in OWN_TESTS)
ARRAYS = ("sample_weight",)


def _case(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta").reshape(-1)[0]))
    opts = {k: v for k, v in meta["ce_check"].items() if k not in ARRAYS}
    opts["binary"] = meta.get("target") == "binary"
    return arrays, opts


def _check(arrays: dict, opts: dict, grad: np.ndarray | None = None, loss: bool = True,
           **settings):
    kw = {**{k: v for k, v in opts.items() if k != "binary"}, **settings}
    grad = arrays["grad"] if grad is None else grad
    loss_value = arrays["loss"] if loss else None
    if opts["binary"]:
        return ce_cli.check_binary(arrays["logits"], arrays["labels"], grad=grad, loss=loss_value,
                                   **kw)
    return ce_cli.check_grad(arrays["logits"], arrays["labels"], grad=grad, loss=loss_value,
                             sample_weight=arrays.get("sample_weight"), **kw)


def _overflowed(arrays: dict) -> bool:
    return bool(np.isinf(arrays["loss"]).any())


def test_semantic_framework_fixtures_are_there():
    names = [Path(p).stem for p in CASES]
    assert len(CASES) >= 180
    for family in ("softcap_hf", "softcap", "zloss", "scale", "sw", "smooth", "combo", "autocast"):
        assert any(n.startswith(f"torch_{family}_") for n in names), family
    for family in ("gemma", "t5x", "bce"):
        assert any(n.startswith(f"jax_{family}_") for n in names), family
    for variant in ("prob", "prob_mean", "int", "where", "where_classes"):  # optax's own calls
        assert any(n.startswith("optax_ce_") and n.endswith(f"_{variant}") for n in names), variant
    for variant in ("plain", "ignore0", "ignore_neg", "sw"):  # Keras's own loss
        assert any(n.startswith("keras_ce_") and n.endswith(f"_{variant}") for n in names), variant
    torch_names = [n for n in names if n.startswith("torch_") and "_hf_" not in n]
    assert {n.split("_")[2] for n in torch_names} == {"f32", "f16", "bf16"}
    assert sum(_overflowed(_case(p)[0]) for p in CASES) >= 1


@pytest.mark.parametrize("path", CASES, ids=lambda p: Path(p).stem)
def test_no_false_alarm_on_training_code_gradients(path):
    arrays, opts = _case(path)
    report = _check(arrays, opts)
    if _overflowed(arrays):  # PyTorch's float16 smoothing sum: the loss is wrong, not the grad
        bad = [c for c in report.checks if not c.ok]
        assert [c.name for c in bad] == ["loss_vs_reference"]
        assert "overflowed" in bad[0].note
        report = _check(arrays, opts, loss=False)
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]


def _row_plant(g: np.ndarray, bug: str, seed: int) -> np.ndarray:
    """A random non-zero row of g: its largest entry x1.01, or the whole row x (1 + 2e-3)."""
    a = g.astype(np.float64).reshape(-1, g.shape[-1]).copy()
    live = np.nonzero(np.abs(a).max(axis=1) > 0)[0]
    r = int(live[np.random.default_rng(seed).integers(live.size)])
    if bug == "entry_x1.01":
        a[r, int(np.argmax(np.abs(a[r])))] *= 1.01
    else:
        a[r] *= 1 + 2e-3
    return a.reshape(g.shape).astype(g.dtype)


def _denominator(arrays: dict, opts: dict) -> float | None:
    """D of the case's loss when it counts tokens (None with weighted 'mean')."""
    if opts.get("denominator") is not None:
        return float(opts["denominator"])
    if opts["binary"]:
        return float(arrays["labels"].size) if opts["reduction"] == "mean" else None
    if opts["reduction"] == "mean" and arrays["labels"].ndim == arrays["logits"].ndim:
        return float(arrays["labels"].size // arrays["labels"].shape[-1])  # probability rows
    if opts["reduction"] == "mean" and "sample_weight" not in arrays:
        return float(np.count_nonzero(arrays["labels"] != opts.get("ignore_index", -100)))
    return None


def _planted(arrays: dict, opts: dict, bug: str, seed: int) -> np.ndarray | None:
    """The gradient with `bug`, or None where the case has no such term. The recomputed ones
    (`nocap`, `nozloss`, `sw2`) are the framework's gradients of the buggy code, made by the
    scripts."""
    g = arrays["grad"]
    if bug in ("entry_x1.01", "row_x(1+2e-3)"):
        return _row_plant(g, bug, seed)
    if bug == "den+1":  # the loss divided by one token more than it has
        D = _denominator(arrays, opts)
        return None if D is None else (g.astype(np.float64) * (D / (D + 1))).astype(g.dtype)
    return arrays.get("grad_bug_" + bug)


F32 = [p for p in CASES if "_f32_" in Path(p).stem]
BUGS = ["entry_x1.01", "row_x(1+2e-3)", "nocap", "nozloss", "sw2", "den+1", "allrows", "nomask",
        "total", "noignore"]


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bugs_in_float32_training_code_gradients_are_caught(bug):
    missed, tried = [], 0
    for k, path in enumerate(F32):
        arrays, opts = _case(path)
        planted = _planted(arrays, opts, bug, seed=k)
        if planted is None:
            continue
        tried += 1
        assert not np.array_equal(planted, arrays["grad"])
        # the gradient checks catch these; the reference's proof is the no-false-alarm test's
        if _check(arrays, opts, grad=planted, loss=False, fd="sample").ok:
            missed.append(Path(path).stem)
    assert tried >= 4
    assert not missed, missed


KL = [p for p in F32 if "_t5x_" in Path(p).stem and "plain" not in Path(p).stem]


@pytest.mark.parametrize("path", KL[:6], ids=lambda p: Path(p).stem)
def test_t5x_kl_loss_is_named(path):
    """T5X reports each token's loss minus the smoothed targets' entropy: the loss check fails
    (it is not the cross-entropy) and says what it is; the same loss off by as much again
    gets no such note."""
    arrays, opts = _case(path)
    assert "loss_kl" in arrays
    report = _check(dict(arrays, loss=arrays["loss_kl"]), opts)
    bad = [c for c in report.checks if not c.ok]
    assert [c.name for c in bad] == ["loss_vs_reference"]
    assert "smoothed targets' entropy" in bad[0].note and "T5X" in bad[0].note
    off = 2.0 * arrays["loss_kl"].astype(np.float64) - arrays["loss"]
    report = _check(dict(arrays, loss=off.astype(np.float32)), opts)
    bad = [c for c in report.checks if not c.ok]
    assert [c.name for c in bad] == ["loss_vs_reference"]
    assert "entropy" not in bad[0].note
