"""Sigmoid binary cross-entropy (`ce-check binary`): PyTorch parity, bug zoo, two-class bridge,
bad input, stability.

The torch side comes from fixtures/binary (scripts/make_binary_fixtures.py, torch 2.13, float64
`binary_cross_entropy_with_logits` on the exactly upcast logits); nothing here imports torch.

Parity rule (ours = ce_cli's float64 reference, t = torch's float64 value):

- reduced loss ('mean'/'sum', and for 'none' the total):  |ours - t| <= 1e-12 * |t|.
- per-element loss ('none'):  |ours - t| <= 1e-12 * |t| + B, with B = 8 eps |w| (|(1 - y) x| +
  c softplus(-x)), c = 1 + (pw - 1) y.  torch evaluates (1 - y) x - c log_sigmoid(x); for x << 0
  and y < 1 the two terms (~|x| each) cancel down to softplus(x) ~ e^x, so torch's own element
  is only accurate to a few eps * |x| *absolute* (e.g. x = -9, y = 0: 1.2e-4 +- 2e-15, a
  relative 1.6e-11).  B is that rounding, nothing more; where nothing cancels B << 1e-12 |t|.
- gradient, elementwise:  |ours - t| <= 1e-12 * |t| + 1e-14 * max|t|.  torch computes
  s(x) - y (times c, w, 1/numel); for y = 1 and x >> 0 the difference cancels and torch's entry
  carries an absolute error ~eps * c * |w| / numel (its *relative* error reaches 1e-3 at x = 30).
  max|t| >= that scale in every case here, so 1e-14 * max|t| (= 45 eps * max|t|) covers it.

Documented divergence: a -inf logit with label 0.  torch's loss there is NaN ((1 - y) * x -
log_sigmoid(x) = -inf + inf), its gradient 0; ce_cli returns the limit softplus(-inf) = 0, so
the loss is finite.  Those cases compare the gradient and the finite elements only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ce_cli
from ce_cli.verify.checks import two_class_bridge
from ce_cli.models.sigmoid import build_sigmoid_bce

BINARY = Path(__file__).resolve().parent.parent / "fixtures" / "binary"
CASES: dict[str, dict] = json.loads((BINARY / "cases.json").read_text())
EPS = np.finfo(np.float64).eps
LOSS_RTOL = 1e-12
GRAD_RTOL = 1e-12
GRAD_ATOL_REL = 1e-14   # times max |torch grad| of the case
LOSS_BUDGET_K = 8.0     # torch per-element rounding budget, in eps (see the module docstring)


def load(name: str) -> dict:
    opts = CASES[name]
    with np.load(BINARY / opts["file"], allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return {**opts, **arrays, "weight": arrays.get("weight"), "pos_weight": arrays.get("pos_weight")}


BCE_CASES = sorted(n for n, c in CASES.items() if not c["two_class"])
# torch NaN losses at -inf logits (label 0): compared without the loss, see the docstring
DIVERGENCES = sorted(n for n in BCE_CASES if np.isneginf(load(n)["logits"]).any())
PARITY_CASES = [n for n in BCE_CASES if n not in DIVERGENCES]


def kwargs(c: dict) -> dict:
    return dict(weight=c["weight"], pos_weight=c["pos_weight"], reduction=c["reduction"])


def failed_checks(report) -> list:
    return [(ch.name, ch.mismatches, ch.max_abs_err, ch.note, ch.worst[:2])
            for ch in report.checks if not ch.ok]


def failed_names(report) -> set[str]:
    return {ch.name for ch in report.checks if not ch.ok}


def ours(c: dict, tmp_path: Path, **extra):
    """Run check_binary against torch's values; return (report, our grad, our per-element loss)."""
    out = tmp_path / "g.npy"
    report = ce_cli.check_binary(c["logits"], c["labels"], **kwargs(c), out_grad=out, **extra)
    problem, _ = build_sigmoid_bce(c["logits"], c["labels"], **kwargs(c))
    items = problem.layout.from_rows(problem.evaluate(0, problem.n_rows).items)
    return report, np.load(out), items


# ----------------------------------------------------------------------------- numpy models


def broadcast_coefs(c: dict):
    """x, y, w, pw (float64, the logits' shape) for a case."""
    x = np.asarray(c["logits"], dtype=np.float64)
    y = np.asarray(c["labels"], dtype=np.float64)
    w = np.ones_like(x) if c["weight"] is None else np.broadcast_to(c["weight"], x.shape)
    pw = np.ones_like(x) if c["pos_weight"] is None else np.broadcast_to(
        np.asarray(c["pos_weight"], dtype=np.float64).reshape(-1), x.shape)
    return x, y, np.asarray(w, dtype=np.float64), np.asarray(pw, dtype=np.float64)


def softplus(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def torch_loss_budget(c: dict) -> np.ndarray:
    """Per-element rounding of torch's (1 - y) x - c log_sigmoid(x), times w."""
    x, y, w, pw = broadcast_coefs(c)
    coef = 1.0 + (pw - 1.0) * y
    with np.errstate(invalid="ignore"):
        terms = np.abs(np.where(y == 1, 0.0, (1.0 - y) * x)) + np.abs(coef) * softplus(-x)
    return LOSS_BUDGET_K * EPS * np.abs(w) * terms


def stable_sigmoid(x: np.ndarray) -> np.ndarray:
    """s(x) in x's dtype without overflow: 1/(1+e^-|x|) or e^-|x|/(1+e^-|x|)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


def np_grad(c: dict, dtype=np.float64, *, bug: str | None = None) -> np.ndarray:
    """The BCE-with-logits gradient computed in `dtype` with the stable formula
    w * ((1 - y) s(x) - pw y s(-x)) / D, or with one of the classic bugs."""
    x64, y64, w64, pw64 = broadcast_coefs(c)
    x, y, w, pw = (a.astype(dtype) for a in (x64, y64, w64, pw64))
    one = dtype(1)
    s, sn = stable_sigmoid(x), stable_sigmoid(-x)
    mean = c["reduction"] == "mean"
    numel = x.size
    if bug == "sigmoid_only":          # forgot "- y": grad = s(x) / numel
        g = w * s
    elif bug == "pos_weight_wrong_term":   # pos_weight on the (1 - y) term
        g = w * (pw * (one - y) * s - y * sn)
    elif bug == "missing_pos_weight":
        g = w * ((one - y) * s - y * sn)
    elif bug == "missing_weight":
        g = (one - y) * s - pw * y * sn
    elif bug in (None, "wrong_sign", "mean_over_rows", "mean_over_weight_sum"):
        g = w * ((one - y) * s - pw * y * sn)
    else:
        raise ValueError(bug)
    if mean:
        if bug == "mean_over_rows":    # divide by the N rows, not the N*K elements
            denom = numel // x.shape[-1] if x.ndim > 1 else 1
        elif bug == "mean_over_weight_sum":
            denom = float(w64.sum())
        else:
            denom = numel
        g = g / dtype(denom)
    if bug == "wrong_sign":
        g = -g
    return np.asarray(g, dtype=dtype)


# ----------------------------------------------------------------------------- manifest


def test_manifest_matches_files():
    assert len(BCE_CASES) >= 20
    reductions = {CASES[n]["reduction"] for n in BCE_CASES}
    assert reductions == {"mean", "sum", "none"}
    dtypes = {CASES[n]["dtype"] for n in BCE_CASES}
    assert dtypes == {"float16", "float32", "float64"}
    assert {len(CASES[n]["shape"]) for n in BCE_CASES} == {1, 2, 3}
    for name, opts in CASES.items():
        for key in ("file", "reduction", "has_weight", "has_pos_weight", "note", "dtype", "shape",
                    "two_class", "torch"):
            assert key in opts, (name, key)
        with np.load(BINARY / opts["file"], allow_pickle=False) as data:
            assert {"logits", "labels", "loss", "grad"} <= set(data.files), name
            assert ("weight" in data.files) == opts["has_weight"], name
            assert ("pos_weight" in data.files) == opts["has_pos_weight"], name
            assert data["grad"].dtype == np.float64 and data["loss"].dtype == np.float64
            assert data["grad"].shape == data["logits"].shape
            assert str(data["logits"].dtype) == opts["dtype"]
            assert list(data["logits"].shape) == opts["shape"]
            if not opts["two_class"]:
                assert data["labels"].shape == data["logits"].shape
                expected = data["logits"].shape if opts["reduction"] == "none" else ()
                assert data["loss"].shape == expected, name
    total = sum(p.stat().st_size for p in BINARY.iterdir())
    assert total < 500_000, f"fixtures/binary is {total / 1e3:.1f} KB"


def test_divergences_are_the_neginf_cases():
    """The only cases where torch's loss is not finite are those with -inf logits (label 0)."""
    assert DIVERGENCES == ["neginf_label0_mean", "neginf_label0_pos_weight_none"]
    for name in PARITY_CASES:
        c = load(name)
        assert np.all(np.isfinite(c["loss"])) and np.all(np.isfinite(c["grad"])), name


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", PARITY_CASES)
def test_check_binary_accepts_torch(name, tmp_path):
    """torch's loss and gradient pass every check: vs the reference, finite differences (which
    prove the reference) and the two-class bridge."""
    c = load(name)
    report, _, _ = ours(c, tmp_path, grad=c["grad"], loss=c["loss"])
    assert report.ok, failed_checks(report)
    names = {ch.name for ch in report.checks}
    assert names >= {"grad_vs_reference", "loss_vs_reference", "two_class_bridge"}
    assert names & {"fd_vs_reference", "fd_rows_vs_reference"}
    assert names & {"fd_vs_grad", "fd_rows_vs_grad"}
    assert report.kind == "binary" and report.target_kind == "binary"
    assert report.shape == tuple(c["shape"])


def grad_violations(og: np.ndarray, tg: np.ndarray) -> np.ndarray:
    allowed = GRAD_RTOL * np.abs(tg) + GRAD_ATOL_REL * np.max(np.abs(tg))
    return np.abs(og - tg) > allowed


@pytest.mark.parametrize("name", PARITY_CASES)
def test_reference_matches_torch(name, tmp_path):
    c = load(name)
    report, og, items = ours(c, tmp_path)
    tg, tl = c["grad"], c["loss"]
    assert og.shape == tg.shape and og.dtype == np.float64
    bad = grad_violations(og, tg)
    assert not bad.any(), (name, np.argwhere(bad)[:5].tolist(), og[bad][:5], tg[bad][:5])
    if c["reduction"] == "none":
        total = math.fsum(tl.ravel().tolist())
        assert abs(report.loss - total) <= LOSS_RTOL * abs(total), (report.loss, total)
        assert items.shape == tl.shape
        allowed = LOSS_RTOL * np.abs(tl) + torch_loss_budget(c)
        bad = np.abs(items - tl) > allowed
        assert not bad.any(), (name, np.argwhere(bad)[:5].tolist(), items[bad][:5], tl[bad][:5])
    else:
        assert abs(report.loss - float(tl)) <= LOSS_RTOL * abs(float(tl)), (report.loss, float(tl))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_neginf_divergence(name, tmp_path):
    """-inf logit, label 0: torch's loss is NaN exactly there, its gradient 0 (equal to ours);
    ce_cli's loss is the finite limit (softplus(-inf) = 0 at those elements)."""
    c = load(name)
    x, y, w, pw = broadcast_coefs(c)
    neginf = np.isneginf(x)
    assert neginf.any() and np.all(y[neginf] == 0)
    report, og, items = ours(c, tmp_path, grad=c["grad"])   # the gradient alone passes
    assert report.ok, failed_checks(report)
    assert not grad_violations(og, c["grad"]).any()
    assert np.all(og[neginf] == 0) and np.all(c["grad"][neginf] == 0)
    assert np.all(items[neginf] == 0)
    # the limit, from finite elements only
    finite_items = w * np.where(neginf, 0.0, pw * y * softplus(-np.where(neginf, 0, x))
                                + (1 - y) * softplus(np.where(neginf, 0, x)))
    if c["reduction"] == "none":
        assert np.all(np.isnan(c["loss"][neginf])) and np.all(np.isfinite(c["loss"][~neginf]))
        allowed = LOSS_RTOL * np.abs(c["loss"]) + torch_loss_budget(c)
        assert np.all(np.abs(items - c["loss"])[~neginf] <= allowed[~neginf])
        expected = math.fsum(finite_items.ravel().tolist())
    else:
        assert np.isnan(c["loss"])
        expected = math.fsum(finite_items.ravel().tolist()) / x.size
    assert np.isfinite(report.loss)
    assert report.loss == pytest.approx(expected, rel=1e-12)
    # torch's NaN loss is reported, not accepted
    bad = ce_cli.check_binary(c["logits"], c["labels"], grad=c["grad"], loss=c["loss"], **kwargs(c))
    assert not bad.ok and failed_names(bad) == {"loss_vs_reference"}


@pytest.mark.parametrize("name", ["multilabel_hard_mean", "pos_weight_vec_mean",
                                  "weight_pos_weight_sum", "three_d_mean"])
def test_perturbed_torch_grad_fails(name):
    """The tolerance is not vacuous: a 1e-6 relative change of one torch entry fails."""
    c = load(name)
    bad = c["grad"].copy()
    flat = bad.reshape(-1)
    flat[int(np.argmax(np.abs(flat)))] *= 1.0 + 1e-6
    report = ce_cli.check_binary(c["logits"], c["labels"], grad=bad, **kwargs(c), fd="off")
    assert not report.ok and "grad_vs_reference" in failed_names(report)


def test_max_relative_error_over_all_cases(tmp_path):
    """Measure (print with -s) ce_cli vs torch: loss rel (reduced, or the per-element max over
    elements where torch's budget is below 1e-12 |t|), grad rel (elementwise, where torch's
    s - y does not cancel: |t| > 1e-4 max|t|), grad nrm = max|d| / max|t|, and ratio = worst
    |d| / allowed under this module's rules (must be <= 1)."""
    lines = [f"{'case':34s} {'loss rel':>9s} {'grad rel':>9s} {'grad nrm':>9s} {'ratio':>9s}"]
    worst = dict(loss=0.0, grad=0.0, nrm=0.0, ratio=0.0)
    for name in PARITY_CASES:
        c = load(name)
        sub = tmp_path / name
        sub.mkdir()
        report, og, items = ours(c, sub)
        tg, tl = c["grad"], c["loss"]
        if c["reduction"] == "none":
            budget = torch_loss_budget(c)
            sel = (tl != 0) & (budget < LOSS_RTOL * np.abs(tl))
            l_rel = float(np.max(np.abs(items - tl)[sel] / np.abs(tl[sel]), initial=0.0))
            l_ratio = float(np.max(np.abs(items - tl) / (LOSS_RTOL * np.abs(tl) + budget + 1e-300)))
        else:
            l_rel = abs(report.loss - float(tl)) / abs(float(tl))
            l_ratio = l_rel / LOSS_RTOL
        gmax = float(np.max(np.abs(tg)))
        gsel = np.abs(tg) > 1e-4 * gmax
        d = np.abs(og - tg)
        g_rel = float(np.max(d[gsel] / np.abs(tg[gsel]), initial=0.0))
        g_nrm = float(d.max()) / gmax if gmax else float(d.max())
        g_ratio = float(np.max(d / (GRAD_RTOL * np.abs(tg) + GRAD_ATOL_REL * gmax + 1e-300)))
        ratio = max(l_ratio, g_ratio)
        for key, v in (("loss", l_rel), ("grad", g_rel), ("nrm", g_nrm), ("ratio", ratio)):
            worst[key] = max(worst[key], v)
        lines.append(f"{name:34s} {l_rel:9.2e} {g_rel:9.2e} {g_nrm:9.2e} {ratio:9.2e}")
    lines.append(f"max: loss rel {worst['loss']:.2e}, grad rel {worst['grad']:.2e}, grad nrm "
                 f"{worst['nrm']:.2e}, |err|/allowed {worst['ratio']:.2e}")
    print("\n" + "\n".join(lines))
    assert worst["loss"] <= LOSS_RTOL and worst["grad"] <= GRAD_RTOL
    assert worst["ratio"] <= 1.0


# ----------------------------------------------------------------------------- bug zoo

# bug -> cases where it changes the gradient
HAS_POS = [n for n in BCE_CASES if CASES[n]["has_pos_weight"]]
HAS_W = [n for n in BCE_CASES if CASES[n]["has_weight"]]
MULTI_ROW_MEAN = [n for n in BCE_CASES if CASES[n]["reduction"] == "mean"
                  and len(CASES[n]["shape"]) > 1]
BUGS = (
    [("sigmoid_only", n) for n in BCE_CASES]
    + [("wrong_sign", n) for n in BCE_CASES]
    + [("pos_weight_wrong_term", n) for n in HAS_POS]
    + [("missing_pos_weight", n) for n in HAS_POS]
    + [("missing_weight", n) for n in HAS_W]
    + [("mean_over_rows", n) for n in MULTI_ROW_MEAN]
    + [("mean_over_weight_sum", n) for n in HAS_W if CASES[n]["reduction"] == "mean"]
)


@pytest.mark.parametrize(("bug", "name"), BUGS, ids=[f"{b}-{n}" for b, n in BUGS])
def test_bug_fails(bug, name):
    c = load(name)
    g = np_grad(c, bug=bug)
    assert not np.array_equal(g, np_grad(c)), "the bug must change the gradient here"
    report = ce_cli.check_binary(c["logits"], c["labels"], grad=g, **kwargs(c))
    assert not report.ok
    assert "grad_vs_reference" in failed_names(report), failed_checks(report)


def test_mean_over_rows_is_rows_not_elements():
    """The mean-over-rows bug is exactly K times the right gradient (16x5: 5x)."""
    c = load("multilabel_hard_mean")
    np.testing.assert_allclose(np_grad(c, bug="mean_over_rows"), 5 * np_grad(c), rtol=1e-15)


@pytest.mark.parametrize("name", BCE_CASES)
@pytest.mark.parametrize("store", [np.float64, np.float32, np.float16])
def test_correct_low_precision_grad_passes(name, store):
    """A correct gradient computed in float32 (float64 for the f64 store) with the stable formula
    passes, stored as float64/float32/float16 (the tolerance follows the stored dtype)."""
    c = load(name)
    compute = np.float64 if store is np.float64 else np.float32
    g = np_grad(c, compute).astype(store)
    report = ce_cli.check_binary(c["logits"], c["labels"], grad=g, **kwargs(c))
    assert report.ok, failed_checks(report)


@pytest.mark.parametrize("name", ["multilabel_hard_mean", "weight_pos_weight_sum", "three_d_mean"])
def test_float32_bug_still_fails(name):
    """The float32 tolerance does not hide a bug: wrong sign / missing pos_weight in float32."""
    c = load(name)
    for bug in ("wrong_sign", "sigmoid_only"):
        g = np_grad(c, np.float32, bug=bug)
        report = ce_cli.check_binary(c["logits"], c["labels"], grad=g, **kwargs(c))
        assert "grad_vs_reference" in failed_names(report), bug


# ----------------------------------------------------------------------------- two-class bridge


def bridge_ok(x, y, **kw):
    problem, _ = build_sigmoid_bce(np.asarray(x), np.asarray(y), **kw)
    res = two_class_bridge(problem)
    return problem, res


@pytest.mark.parametrize("seed", range(6))
def test_two_class_bridge_random(seed):
    r = np.random.default_rng(1000 + seed)
    shape = [(64,), (32, 7), (4, 5, 6)][seed % 3]
    x = r.standard_normal(shape) * [1.0, 5.0, 30.0][seed % 3]
    y = r.random(shape) if seed % 2 else (r.random(shape) < 0.5).astype(np.float64)
    _, res = bridge_ok(x, y, reduction=["mean", "sum", "none"][seed % 3])
    assert res.name == "two_class_bridge"
    assert res.ok, (res.mismatches, res.worst[:3])
    assert res.total == 3 * x.size
    scale = max(1.0, float(np.max(np.abs(x))))
    assert res.max_abs_err <= 1e-12 * scale, res.max_abs_err


def test_two_class_bridge_extremes():
    """Saturated logits (+-800, +-1e4, +-40) and -inf with label 0 bridge exactly or to 1e-12."""
    x = np.array([[800.0, -800.0, 1e4, -1e4, 40.0, -40.0, -np.inf, 0.0]] * 2)
    y = np.array([[1, 0, 0, 1, 1, 0, 0, 1], [0, 1, 1, 0, 0.3, 0.7, 0, 0.5]], dtype=np.float64)
    _, res = bridge_ok(x, y)
    assert res.ok, (res.mismatches, res.worst[:3])
    assert res.max_abs_err <= 1e-12 * 1e4


def sigmoid64(x: np.ndarray) -> np.ndarray:
    return stable_sigmoid(np.asarray(x, dtype=np.float64))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.floats(-60, 60, allow_nan=False),
                          st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1))),
                min_size=1, max_size=40))
def test_two_class_bridge_property(pairs):
    """Hard labels anywhere; soft labels only where the gradient s(x) - y is not itself at the
    rounding level (|s(x) - y| >= 1e-3, so the bridge's pure 1e-12 relative rule is meaningful:
    see test_bridge_false_alarm_near_zero_gradient for the known ce_cli false alarm)."""
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    hard = (y == 0) | (y == 1)
    keep = hard | (np.abs(sigmoid64(x) - y) >= 1e-3)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return
    _, res = bridge_ok(x, y)
    assert res.ok, (res.mismatches, res.worst[:3])
    assert res.max_abs_err <= 1e-12 * max(1.0, float(np.max(np.abs(x))))


@pytest.mark.parametrize("example", ["y_next_to_s", "tiny_y", "random_soft_16k"])
def test_bridge_false_alarm_near_zero_gradient(example):
    if example == "y_next_to_s":
        x = np.array([0.3, 2.0, -5.0])
        y = np.nextafter(sigmoid64(x), 1.0)
    elif example == "tiny_y":
        x, y = np.array([-23.0]), np.array([1.3257255488255185e-22])
    else:
        r = np.random.default_rng(0)   # ordinary soft labels: some y lands within ~1e-5 of s(x)
        x, y = r.standard_normal((256, 64)), r.random((256, 64))
    report = ce_cli.check_binary(x, y, fd="off")
    assert report.ok, failed_checks(report)


def test_two_class_flag_with_torch_softmax_fixture():
    """(N, 2) softmax logits with class-index labels: torch's F.cross_entropy grad and loss pass
    check_binary(two_class=True), which carries the bridge on z1 - z0; torch's own BCE on z1 - z0
    agrees with its CE (d/dz1 = -d/dz0 = s(z1 - z0) - y)."""
    c = load("two_class_softmax_mean")
    report = ce_cli.check_binary(c["logits"], c["labels"], grad=c["grad"], loss=c["loss"],
                                 two_class=True)
    assert report.ok, failed_checks(report)
    names = [ch.name for ch in report.checks]
    assert "two_class_bridge" in names and "grad_vs_reference" in names
    scale = np.max(np.abs(c["grad"]))
    np.testing.assert_allclose(c["bce_grad"], c["grad"][:, 1], rtol=1e-12, atol=1e-14 * scale)
    np.testing.assert_allclose(c["bce_grad"], -c["grad"][:, 0], rtol=1e-12, atol=1e-14 * scale)
    assert float(c["bce_loss"]) == pytest.approx(float(c["loss"]), rel=1e-12)
    # ours on z1 - z0 against torch's BCE
    x = c["logits"][:, 1] - c["logits"][:, 0]
    rep = ce_cli.check_binary(x, c["labels"].astype(np.float64), grad=c["bce_grad"],
                              loss=c["bce_loss"])
    assert rep.ok, failed_checks(rep)
    assert rep.loss == pytest.approx(float(c["bce_loss"]), rel=1e-12)


def test_two_class_neginf_masked_logit_accepted():
    z = np.array([[-np.inf, 1.0], [0.5, -0.5]])
    y = np.array([1, 0])
    assert ce_cli.check_grad(z, y).ok
    assert ce_cli.check_binary(z, y, two_class=True).ok


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_two_class_flag_numpy(dtype):
    r = np.random.default_rng(77)
    z = (r.standard_normal((20, 2)) * 4).astype(dtype)
    y = r.integers(0, 2, 20)
    z64 = z.astype(np.float64)
    p = np.exp(z64 - z64.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = (p - np.eye(2)[y]) / 20
    report = ce_cli.check_binary(z, y, grad=g.astype(dtype), two_class=True)
    assert report.ok, failed_checks(report)
    bridge = [ch for ch in report.checks if ch.name == "two_class_bridge"]
    assert len(bridge) == 1 and bridge[0].ok and bridge[0].max_abs_err <= 1e-12 * 20
    # the bug zoo reaches the two-class path too: the sign flipped fails
    bad = ce_cli.check_binary(z, y, grad=(-g).astype(dtype), two_class=True)
    assert "grad_vs_reference" in failed_names(bad)


# ----------------------------------------------------------------------------- bad input


X = np.zeros((16, 5))
Y = np.zeros((16, 5))


def with_(arr, index, value):
    out = np.array(arr, dtype=np.float64)
    out[index] = value
    return out


BAD = {
    "label_above_1": (dict(logits=X, labels=with_(Y, (3, 2), 1.5)),
                      ["labels", "1.5", "(3, 2)", "outside [0, 1]"]),
    "label_negative": (dict(logits=X, labels=with_(Y, (0, 4), -0.25)),
                       ["-0.25", "(0, 4)", "outside [0, 1]"]),
    "label_nan": (dict(logits=X, labels=with_(Y, (7, 1), np.nan)), ["nan", "(7, 1)"]),
    "label_3d_index": (dict(logits=np.zeros((4, 3, 5)), labels=with_(np.zeros((4, 3, 5)), (2, 1, 3), 2.0)),
                       ["(2, 1, 3)"]),
    "labels_shape": (dict(logits=X, labels=np.zeros((16, 4))), ["(16, 4)", "(16, 5)"]),
    "pos_weight_length": (dict(logits=X, labels=Y, pos_weight=np.ones(4)),
                          ["pos_weight", "(4,)", "(5,)"]),
    "pos_weight_2d": (dict(logits=X, labels=Y, pos_weight=np.ones((3, 5))),
                      ["pos_weight", "(3, 5)", "does not broadcast"]),
    "pos_weight_nan": (dict(logits=X, labels=Y, pos_weight=np.array([1, 1, np.nan, 1, 1])),
                       ["pos_weight", "non-finite"]),
    "weight_not_broadcast": (dict(logits=X, labels=Y, weight=np.ones(4)),
                             ["weight", "(4,)", "broadcast", "(16, 5)"]),
    "weight_nan": (dict(logits=X, labels=Y, weight=with_(np.ones(5), 2, np.nan)),
                   ["weight", "non-finite", "(2,)"]),
    "logit_nan": (dict(logits=with_(X, (5, 3), np.nan), labels=Y), ["NaN", "(5, 3)"]),
    "logit_posinf": (dict(logits=with_(X, (9, 0), np.inf), labels=Y), ["+inf", "(9, 0)"]),
    "logit_posinf_3d": (dict(logits=with_(np.zeros((4, 3, 5)), (3, 2, 4), np.inf),
                             labels=np.zeros((4, 3, 5))), ["+inf", "(3, 2, 4)"]),
    "empty": (dict(logits=np.zeros((0, 5)), labels=np.zeros((0, 5))), ["empty"]),
    "scalar": (dict(logits=np.float64(1.0), labels=np.float64(1.0)), ["scalar"]),
    "two_class_not_pairs": (dict(logits=X, labels=np.zeros(16, dtype=np.int64), two_class=True),
                            ["(16, 5)", "(..., 2)"]),
    "two_class_pos_weight": (dict(logits=np.zeros((16, 2)), labels=np.zeros(16, dtype=np.int64),
                                  two_class=True, pos_weight=np.ones(2)),
                             ["`pos_weight`", "`two_class`"]),
    "reduction": (dict(logits=X, labels=Y, reduction="avg"), ["avg"]),
    "logits_dtype": (dict(logits=np.array([["a", "b"]]), labels=np.zeros((1, 2))), ["dtype"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises(case):
    kw, needles = BAD[case]
    kw = dict(kw)
    logits, labels = kw.pop("logits"), kw.pop("labels")
    with pytest.raises(ce_cli.CeCheckError) as info:
        ce_cli.check_binary(logits, labels, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_neginf_logit_is_allowed():
    """-inf is a legal logit (masked element); only NaN and +inf are rejected."""
    x = with_(X, (2, 2), -np.inf)
    report = ce_cli.check_binary(x, Y)
    assert report.ok and np.isfinite(report.loss)


def test_transposed_labels_rejected():
    r = np.random.default_rng(5)
    x = r.standard_normal((16, 5))
    y = (r.random((16, 5)) < 0.5).astype(np.float64)
    with pytest.raises(ce_cli.CeCheckError):
        ce_cli.check_binary(x, y.T)


# ----------------------------------------------------------------------------- stability


def test_pm1e4_exact(tmp_path):
    """float64 logits at +-1e4: softplus(1e4) = 1e4, softplus(-1e4) = 0 exactly; gradient of the
    sum exactly 0 or +-1 for hard labels, 1 - y / -y for soft ones; no inf, no NaN."""
    x = np.array([[1e4, -1e4, 1e4, -1e4], [-1e4, 1e4, 1e4, -1e4]])
    y = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    out = tmp_path / "g.npy"
    report = ce_cli.check_binary(x, y, reduction="none", out_grad=out)
    assert report.ok
    g = np.load(out)
    expected_g = np.array([[0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert np.array_equal(g, expected_g)
    assert report.loss == 2e4
    problem, _ = build_sigmoid_bce(x, y, reduction="none")
    items = problem.evaluate(0, 2).items
    assert np.array_equal(items, [[0.0, 0.0, 1e4, 1e4], [0.0, 0.0, 0.0, 0.0]])
    # mean over 8 elements: exact powers of two
    out8 = tmp_path / "g8.npy"
    report = ce_cli.check_binary(x, y, reduction="mean", out_grad=out8)
    assert report.loss == 2e4 / 8 and np.array_equal(np.load(out8), expected_g / 8)
    # torch's own gradient and loss at the extremes pass
    assert ce_cli.check_binary(x, y, grad=expected_g, loss=items, reduction="none").ok


def test_pm1e4_soft_and_pos_weight_exact(tmp_path):
    x = np.array([1e4, -1e4, 1e4, -1e4])
    y = np.array([0.25, 0.25, 0.75, 0.5])
    pw = 3.0
    out = tmp_path / "g.npy"
    report = ce_cli.check_binary(x, y, pos_weight=pw, reduction="sum", out_grad=out)
    assert report.ok
    g = np.load(out)
    # x >> 0: (1 - y) s(x) - pw y s(-x) = 1 - y; x << 0: -pw y
    assert np.array_equal(g, [0.75, -0.75, 0.25, -1.5])
    assert report.loss == math.fsum([0.75e4, 3 * 0.25e4, 0.25e4, 3 * 0.5e4])


def test_pm1e4_fixture_exact(tmp_path):
    c = load("f64_pm1e4_hard_none")
    report, og, items = ours(c, tmp_path)
    x, y = c["logits"], c["labels"]
    expected_loss = np.where((x > 0) == (y == 1), 0.0, 1e4)
    assert np.array_equal(items, expected_loss) and np.array_equal(c["loss"], expected_loss)
    expected_g = np.where((x > 0) == (y == 1), 0.0, np.where(x > 0, 1.0, -1.0))
    assert np.array_equal(og, expected_g) and np.array_equal(c["grad"], expected_g)
    assert report.loss == float(expected_loss.sum())


def test_pm800_float32_fixture(tmp_path):
    c = load("f32_pm800_hard_none")
    report, og, items = ours(c, tmp_path, grad=c["grad"], loss=c["loss"])
    assert report.ok, failed_checks(report)
    x = c["logits"].astype(np.float64)
    sat = np.abs(x) == 800
    y = c["labels"]
    assert np.array_equal(items[sat], np.where((x[sat] > 0) == (y[sat] == 1), 0.0, 800.0))
    assert np.array_equal(og[sat], np.where((x[sat] > 0) == (y[sat] == 1), 0.0,
                                            np.where(x[sat] > 0, 1.0, -1.0)))


def test_large_logits_stay_finite():
    """Up to the float64 range: no overflow in exp, finite loss and gradient."""
    x = np.array([1e300, -1e300, 1.7e308, -1.7e308])
    y = np.array([0.0, 1.0, 1.0, 0.0])
    problem, _ = build_sigmoid_bce(x, y, reduction="sum")
    ev = problem.evaluate(0, 1)
    assert np.array_equal(ev.items[0], [1e300, 1e300, 0.0, 0.0])
    assert np.array_equal(ev.grad[0], [1.0, -1.0, 0.0, 0.0])


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_pos_weight_broadcasts_like_the_labels(kernel, monkeypatch):
    """PyTorch broadcasts pos_weight with the target: (C, 1) on (N, C, d) logits weighs class
    c's positives along axis 1. The check equals the same batch with C moved last and pos_weight
    along it (loss to the last bit, gradient entries, the planted bug's index), keeps one value a
    row (not N*C*d), and refuses what does not broadcast."""
    from ce_cli.models.sigmoid import build_sigmoid_bce

    monkeypatch.setenv("CE_CHECK_FUSED", kernel)
    rng = np.random.default_rng(5)
    N, C, d = 6, 4, 7
    x = rng.standard_normal((N, C, d)) * 3
    y = rng.random((N, C, d))
    pw = rng.uniform(0.2, 5.0, (C, 1))
    g = ((1.0 + (pw - 1.0) * y) / (1.0 + np.exp(-x)) - pw * y) / x.size
    g[2, 3, 1] *= 1.01
    report = ce_cli.check_binary(x, y, grad=g, pos_weight=pw)
    moved = ce_cli.check_binary(np.moveaxis(x, 1, -1), np.moveaxis(y, 1, -1),
                                grad=np.moveaxis(g, 1, -1), pos_weight=pw[:, 0])
    assert report.loss == moved.loss
    failing = {c.name: c.worst[0].index for c in report.checks if not c.ok}
    assert failing == {"grad_vs_reference": (2, 3, 1), "fd_vs_grad": (2, 3, 1)}
    problem, _ = build_sigmoid_bce(x, y, pos_weight=pw)
    assert problem.pos_weight.shape == (N * C, 1)
    full = build_sigmoid_bce(x, y, pos_weight=rng.uniform(0.2, 5.0, (N, C, d)))[0]
    assert full.pos_weight.shape == (N * C, d)
    with pytest.raises(ce_cli.CeCheckError, match=r"\(3, 1\) does not broadcast"):
        ce_cli.check_binary(x, y, pos_weight=np.ones((3, 1)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_stage_keeps_per_element_arrays_only_for_none(reduction):
    """A reduced binary loss needs its rows' floors only: no (N, K) float64 arrays of losses and
    floors (2 GB at 4096 x 32000, which took peak memory past its budget); 'none' keeps them.
    Without a gradient, with `fd` off or sampled, the loss is checked (the compiled kernel's
    per-element losses are made on demand: they used to be missing, an internal error)."""
    from ce_cli.models.sigmoid import build_sigmoid_bce
    from ce_cli.verify.stages import LossStage, LossTotal
    from ce_cli.verify.tolerance import resolve_tolerance

    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((6, 50)), (rng.random((6, 50)) < 0.5).astype(np.float64)
    problem, _ = build_sigmoid_bce(z, y, reduction=reduction)
    loss = np.zeros((6, 50)) if reduction == "none" else 0.0
    stage = LossStage(problem, loss, resolve_tolerance(np.float64), 0.0, 5, LossTotal(6))
    assert stage.floor.shape == ((6, 50) if reduction == "none" else (6,))
    assert (stage.per_sample is None) == (reduction != "none")
    ref = (np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z))) if reduction == "none"
           else ce_cli.check_binary(z, y, reduction=reduction, fd="off").loss)
    for fd in ("off", "sample"):
        assert ce_cli.check_binary(z, y, loss=ref, reduction=reduction, fd=fd).ok
        assert not ce_cli.check_binary(z, y, loss=ref * (1 + 1e-9), reduction=reduction,
                                       fd=fd).ok
