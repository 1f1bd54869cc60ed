"""Parity with PyTorch: ce_cli's float64 reference against torch 2.13's float64 `F.cross_entropy`.

The fixtures (fixtures/parity/, made by scripts/make_fixtures.py) hold torch's loss and gradient,
computed in float64 from the exact (upcast) stored logits. This file never imports torch.

Comparison rule (strict but sound). Both sides compute the same function in float64, so the only
legitimate differences are rounding errors, and torch's are the larger ones: its log_softmax forms
log p_c = x_c - lse with lse = m + log(sum exp(x - m)) rounded at the magnitude of lse, i.e. an
ABSOLUTE error of ~eps*|lse| in every log-probability. Where that cancels (a confident row: the
true loss ~1e-21 but torch returns 0 and p_y - 1 = 0; logits ~1e3 with the target at the max)
no relative rule can hold, however accurate ce_cli is. So, entry by entry,

    |ours - torch| <= 1e-10 * |torch| + scale * K * eps * Q_n * (1 + |lse_n|)       (K = 16)

where Q_n = sum_c q_nc is row n's total target weight (0 for an ignored row, so ignored rows must
match torch's zeros exactly), lse_n the row's log-sum-exp and scale the reduction's 1/D. The
second term is a bound on torch's own float64 rounding (~4 eps Q (1 + |lse|) by the analysis
above, K = 16 leaves 4x); it is < 1e-14 * Q_n * (1 + |lse_n|), so wherever torch is accurate the
rule is a plain 1e-10 relative test, elementwise (stronger than a norm-wise one). For a reduced
loss the budget is the sum of the rows'. NaN must be NaN on both sides, +-inf the same infinity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import ce_cli

# every test runs through the compiled kernel and through the numpy kernel
pytestmark = pytest.mark.usefixtures("both_kernels")

PARITY = Path(__file__).resolve().parent.parent / "fixtures" / "parity"
CASES: dict[str, dict] = json.loads((PARITY / "cases.json").read_text())
EPS = np.finfo(np.float64).eps
RTOL = 1e-10
K = 16.0

# The one deliberate difference (README, "Semantics"): a probability target of exactly 0 on a
# -inf logit contributes 0 (the limit of t*log a) where torch computes 0 * -inf = NaN.
DIVERGENCES = {
    "soft_neginf_zero_target_mean": (
        "probability target 0 at a -inf logit: torch's loss is NaN (0 * -inf), ce_cli treats "
        "the -inf as a mask and returns the finite limit"),
}
HAS_NEGINF = {name for name in CASES if np.isneginf(
    np.load(PARITY / CASES[name]["file"], allow_pickle=False)["logits"]).any()}


def load(name: str) -> dict:
    opts = CASES[name]
    with np.load(PARITY / opts["file"], allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return {**opts, **arrays, "weight": arrays.get("weight")}


def params() -> list[str]:
    """Every case but the documented divergences (tested on their own below)."""
    return [name for name in sorted(CASES) if name not in DIVERGENCES]


def kwargs(c: dict) -> dict:
    return dict(weight=c["weight"], reduction=c["reduction"], ignore_index=c["ignore_index"],
                label_smoothing=c["label_smoothing"], class_axis=c["class_axis"])


# ----------------------------------------------------------------------------- tolerance model


def rows_of(arr: np.ndarray, class_axis: int) -> np.ndarray:
    """(..., C, ...) in the case's layout -> (N, C) float64 rows (batch order as ce_cli's)."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        return arr.reshape(1, -1)
    axis = class_axis % arr.ndim
    return np.moveaxis(arr, axis, -1).reshape(-1, arr.shape[axis])


def from_rows(rows: np.ndarray, shape: tuple[int, ...], class_axis: int) -> np.ndarray:
    """Inverse of rows_of: (N, C) rows back to the case's layout `shape`."""
    if len(shape) == 1:
        return rows.reshape(shape)
    axis = class_axis % len(shape)
    batch = shape[:axis] + shape[axis + 1:]
    return np.moveaxis(rows.reshape(batch + (shape[axis],)), -1, axis)


def torch_rounding_budget(c: dict) -> tuple[np.ndarray, float]:
    """Per-row budget K*eps*Q_n*(1 + |lse_n|) (batch order) and the reduction's scale 1/D.

    scale is 0 when D = 0 (every target ignored or weightless under 'mean'): then both sides'
    gradients must be exact (zeros, or NaN matched separately).
    """
    x = rows_of(c["logits"], c["class_axis"])
    N, C = x.shape
    m = x.max(axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    w = np.ones(C) if c["weight"] is None else np.asarray(c["weight"], dtype=np.float64)
    eps = c["label_smoothing"]
    labels = np.asarray(c["labels"])
    if labels.dtype.kind == "f":  # probability targets
        t = rows_of(labels, c["class_axis"]) * (1.0 - eps) + eps / C
        Q = np.abs(t * w).sum(axis=1)
        D = float(N)
    else:
        y = labels.reshape(-1)
        valid = y != c["ignore_index"]
        wy = np.where(valid, w[np.where(valid, y, 0)], 0.0)
        Q = np.where(valid, (1.0 - eps) * np.abs(wy) + eps / C * np.abs(w).sum(), 0.0)
        D = float(wy.sum())
    if c["reduction"] == "mean":
        scale = 1.0 / D if D != 0 else 0.0
    else:
        scale = 1.0
    return K * EPS * Q * (1.0 + np.abs(lse)), scale


def mismatch(ours, theirs, budget) -> np.ndarray:
    """Boolean mask of entries violating |ours - torch| <= RTOL*|torch| + budget (NaN/inf aware)."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    budget = np.broadcast_to(budget, theirs.shape)
    finite = np.isfinite(theirs)
    with np.errstate(invalid="ignore"):
        ok = np.abs(ours - theirs) <= RTOL * np.abs(theirs) + budget
    same_special = ~finite & ((np.isnan(theirs) & np.isnan(ours)) | (theirs == ours))
    return ~np.where(finite, ok & np.isfinite(ours), same_special)


def describe(mask, ours, theirs, what: str) -> str:
    idx = np.argwhere(np.atleast_1d(mask))[:5]
    o, t = np.atleast_1d(ours), np.atleast_1d(theirs)
    shown = "; ".join(f"{tuple(int(i) for i in ix)}: ours {o[tuple(ix)]!r} torch {t[tuple(ix)]!r}"
                      for ix in idx)
    return f"{what}: {int(np.count_nonzero(mask))} mismatches, e.g. {shown}"


def compare_case(c: dict):
    """ce_cli.reference vs the torch fixture: (loss mismatches, grad mismatches, reference, grad budget)."""
    ref = ce_cli.reference(c["logits"], c["labels"], **kwargs(c))
    budget, scale = torch_rounding_budget(c)
    batch_shape = np.shape(c["labels"]) if np.asarray(c["labels"]).dtype.kind != "f" else None
    if c["reduction"] == "none":
        loss_bad = mismatch(ref.per_sample, c["loss"], budget.reshape(np.shape(c["loss"])))
        assert ref.per_sample.shape == c["loss"].shape
        if batch_shape is not None:
            assert c["loss"].shape == batch_shape
    else:
        loss_bad = mismatch(ref.loss, c["loss"], scale * math.fsum(budget))
    C = ref.grad.shape[0] if ref.grad.ndim == 1 else ref.grad.shape[c["class_axis"]]
    g_budget = from_rows(np.repeat((scale * budget)[:, None], C, axis=1), ref.grad.shape,
                         c["class_axis"])
    assert ref.grad.shape == c["grad"].shape
    grad_bad = mismatch(ref.grad, c["grad"], g_budget)
    return loss_bad, grad_bad, ref, g_budget


# ----------------------------------------------------------------------------- tests


def test_manifest_matches_files():
    assert len(CASES) >= 25
    for name, opts in CASES.items():
        assert (PARITY / opts["file"]).is_file(), name
        for key in ("reduction", "ignore_index", "label_smoothing", "class_axis", "weighted", "note"):
            assert key in opts, (name, key)
        with np.load(PARITY / opts["file"], allow_pickle=False) as data:
            assert {"logits", "labels", "loss", "grad"} <= set(data.files), name
            assert ("weight" in data.files) == opts["weighted"], name
            assert data["grad"].dtype == np.float64 and data["loss"].dtype == np.float64
            assert data["grad"].shape == data["logits"].shape
            assert str(data["logits"].dtype) == opts["dtype"]
    total = sum(p.stat().st_size for p in PARITY.iterdir())
    assert total < 3e6, f"fixtures/parity is {total / 1e6:.2f} MB"


def test_budget_is_negligible_where_torch_is_accurate():
    """The torch-rounding term only matters for cancelling rows: elsewhere it is far below 1e-10."""
    c = load("btv_weights_ignore_mean")
    budget, scale = torch_rounding_budget(c)
    assert np.max(budget) < 1e-12 * np.max(np.abs(c["loss"]))
    assert np.max(scale * budget) < 1e-3 * RTOL * np.max(np.abs(c["grad"]))


@pytest.mark.parametrize("name", params())
def test_reference_matches_torch(name):
    c = load(name)
    loss_bad, grad_bad, ref, _ = compare_case(c)
    ours_loss = ref.per_sample if c["reduction"] == "none" else ref.loss
    assert not loss_bad.any(), describe(loss_bad, ours_loss, c["loss"], f"{name} loss")
    assert not grad_bad.any(), describe(grad_bad, ref.grad, c["grad"], f"{name} grad")
    if c["reduction"] == "none":
        # Reference.loss for 'none' is the sum of the per-sample losses
        total = math.fsum(np.ravel(c["loss"]).tolist())
        budget, _ = torch_rounding_budget(c)
        assert not mismatch(ref.loss, total, math.fsum(budget)).any(), (ref.loss, total)


def run_check_grad(c: dict, **extra):
    return ce_cli.check_grad(c["logits"], c["labels"], grad=c["grad"], loss=c["loss"], **kwargs(c),
                             **extra)


def failed_checks(report) -> list:
    return [(ch.name, ch.mismatches, ch.max_abs_err, ch.note, ch.worst[:2])
            for ch in report.checks if not ch.ok]


@pytest.mark.parametrize("name", params())
def test_check_grad_accepts_torch(name):
    """torch's float64 loss and gradient must pass ce_cli's comparisons against its reference.

    Finite differences off, so this isolates the tolerance model (grad and loss vs reference).
    """
    c = load(name)
    report = run_check_grad(c, fd="off")
    assert report.ok, failed_checks(report)
    assert {ch.name for ch in report.checks} == {"grad_vs_reference", "loss_vs_reference"}


@pytest.mark.parametrize("name", params())
def test_check_grad_accepts_torch_with_finite_differences(name):
    """The same with the default fd='auto': the finite differences must accept torch's gradient
    and prove ce_cli's reference (whichever finite-difference mode 'auto' picks for the size)."""
    c = load(name)
    report = run_check_grad(c)
    assert report.ok, failed_checks(report)
    names = {ch.name for ch in report.checks}
    assert names >= {"grad_vs_reference", "loss_vs_reference", "fd_vs_reference", "fd_vs_grad"}


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_documented_divergence_from_torch(name):
    """Zero target on a -inf logit: the gradient is torch's, the loss the finite limit
    -sum_{t_c > 0} w_c t_c log a_c (torch: NaN), and check_grad accepts torch's gradient."""
    c = load(name)
    assert np.isnan(c["loss"])
    ref = ce_cli.reference(c["logits"], c["labels"], **kwargs(c))
    z = rows_of(c["logits"], c["class_axis"])
    t = rows_of(c["labels"], c["class_axis"])
    logp = z - np.max(z, axis=1, keepdims=True)
    logp -= np.log(np.sum(np.exp(logp), axis=1, keepdims=True))
    with np.errstate(invalid="ignore"):
        limit = -np.sum(np.where(t > 0, t * logp, 0.0)) / z.shape[0]
    assert ref.loss == pytest.approx(limit, rel=1e-12)
    np.testing.assert_allclose(ref.grad, c["grad"], rtol=1e-10, atol=1e-15)
    assert ce_cli.check_grad(c["logits"], c["labels"], grad=c["grad"], **kwargs(c)).ok


@pytest.mark.parametrize("name", ["btv_smooth_weights_ignore_mean", "soft_dirichlet_mean",
                                  "large_vocab_32000_f32_mean", "class_axis1_weights_ignore_mean"])
def test_check_grad_rejects_perturbed_torch_grad(name):
    """The other direction: the tolerance model is not vacuous, a 1e-6 relative change fails."""
    c = load(name)
    bad = c["grad"].copy()
    flat = bad.reshape(-1)
    i = int(np.argmax(np.abs(flat)))
    flat[i] *= 1.0 + 1e-6
    report = ce_cli.check_grad(c["logits"], c["labels"], grad=bad, loss=c["loss"], **kwargs(c),
                               fd="off")
    assert not report.ok
    failed = {ch.name for ch in report.checks if not ch.ok}
    assert "grad_vs_reference" in failed


def test_max_relative_error_over_all_cases():
    """Measure (print with -s) the error of ce_cli vs torch over every case.

    Columns: loss rel / grad rel = max elementwise relative error where torch is itself accurate
    to 1e-10 (its rounding budget below 1e-10 * |torch|; cancelling entries are covered by the
    rule above); grad nrm = max |d| / max |torch grad| over the whole case, unfiltered; ratio =
    max |d| / allowed under the rule of this module (must be <= 1).
    """
    worst_loss = worst_grad = worst_ratio = 0.0
    lines = [f"{'case':46s} {'loss rel':>9s} {'grad rel':>9s} {'grad nrm':>9s} {'ratio':>9s}"]
    for name in sorted(CASES):
        if name in DIVERGENCES:
            continue
        c = load(name)
        ref = ce_cli.reference(c["logits"], c["labels"], **kwargs(c))
        budget, scale = torch_rounding_budget(c)
        if c["reduction"] == "none":
            ours_l, torch_l, b_l = ref.per_sample.ravel(), c["loss"].ravel(), budget
        else:
            ours_l, torch_l = np.array([ref.loss]), np.array([float(c["loss"])])
            b_l = np.array([scale * math.fsum(budget)])
        _, _, _, g_budget = compare_case(c)
        tg, og = c["grad"].ravel(), ref.grad.ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            sel = np.isfinite(torch_l) & (torch_l != 0) & (b_l < RTOL * np.abs(torch_l))
            l_rel = float(np.max(np.abs(ours_l - torch_l)[sel] / np.abs(torch_l[sel]), initial=0.0))
            gsel = np.isfinite(tg) & (tg != 0) & (g_budget.ravel() < RTOL * np.abs(tg))
            g_rel = float(np.max(np.abs(og - tg)[gsel] / np.abs(tg[gsel]), initial=0.0))
            fin = np.isfinite(tg)
            g_max = max(float(np.max(np.abs(tg[fin]), initial=0.0)), 1e-300)
            g_nrm = float(np.max(np.abs(og - tg)[fin], initial=0.0)) / g_max
            tol = RTOL * np.abs(tg) + g_budget.ravel()
            ratio = np.where(fin & (tol > 0), np.abs(og - tg) / np.where(tol > 0, tol, 1.0), 0.0)
            ratio = float(np.max(ratio))
        worst_loss, worst_grad = max(worst_loss, l_rel), max(worst_grad, g_rel)
        worst_ratio = max(worst_ratio, ratio)
        lines.append(f"{name:46s} {l_rel:9.2e} {g_rel:9.2e} {g_nrm:9.2e} {ratio:9.2e}")
    lines.append(f"max relative error: loss {worst_loss:.3e}, grad {worst_grad:.3e} (elementwise, "
                 f"where torch is accurate); max |err|/allowed {worst_ratio:.3e}")
    print("\n" + "\n".join(lines))
    assert worst_loss <= RTOL and worst_grad <= RTOL
    assert worst_ratio <= 1.0


# ----------------------------------------------------------------------------- CLI on the CSV case


def test_cli_csv_loss_matches_torch(invoke):
    expected = np.load(PARITY / "csv_expected.npz", allow_pickle=False)
    result = invoke(["grad", PARITY / "csv_logits.csv", PARITY / "csv_labels.csv", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    torch_loss = float(expected["loss"])
    assert data["ok"] is True
    assert data["shape"] == [10, 5] and data["n_classes"] == 5
    assert abs(data["loss"] - torch_loss) <= RTOL * abs(torch_loss), (data["loss"], torch_loss)


def test_cli_csv_accepts_torch_grad_and_loss(invoke, tmp_path):
    expected = np.load(PARITY / "csv_expected.npz", allow_pickle=False)
    grad_path = tmp_path / "torch_grad.npy"
    np.save(grad_path, expected["grad"])
    result = invoke(["grad", PARITY / "csv_logits.csv", PARITY / "csv_labels.csv",
                     "--grad", grad_path, "--loss", repr(float(expected["loss"])), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert {ch["name"] for ch in data["checks"]} >= {"grad_vs_reference", "loss_vs_reference"}
    for ch in data["checks"]:
        if ch["name"] == "grad_vs_reference":
            assert ch["max_abs_err"] <= RTOL * np.max(np.abs(expected["grad"]))
