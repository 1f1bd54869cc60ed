"""`ce-check linear` with the training-code options of `grad` (z-loss, softcap, logit scale, the
others' smoothing form, a denominator, sample weights, shifted labels) and finite differences on
the bias. Parity with PyTorch float64 (fixtures/linear/semantics.npz, written out in PyTorch by
scripts/make_linear_fixtures.py); a gradient without the option's term is caught, by the
reference comparison and by the finite differences alone."""

import json

import numpy as np
import pytest

import ce_cli
from tests.conftest import FIXTURES, save

SEM = np.load(FIXTURES / "linear" / "semantics.npz")
CASES = sorted({k.split("/")[0] for k in SEM.files})
GRADS = ("grad_hidden", "grad_weight", "grad_bias")


def case_arrays(case):
    arrays = {k.split("/", 1)[1]: SEM[k] for k in SEM.files if k.startswith(case + "/")}
    inputs = {k: arrays.get(k) for k in ("bias", "class_weight", "sample_weight")}
    return arrays, inputs, json.loads(str(arrays["call"]))  # the settings the script used


def test_every_option_has_a_case():
    assert set(CASES) == {"z_loss", "softcap", "logit_scale", "smoothing_others", "denominator",
                          "sample_weight", "shift_labels", "all"}


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_parity_with_pytorch_float64(case, exact):
    """Loss and all three gradients to ~1e-12 relative; the finite differences prove the
    reference (hidden, weight and bias, every row along a direction)."""
    arrays, inputs, spec = case_arrays(case)
    report = ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"], **inputs,
                                 **{g: arrays[g] for g in GRADS}, loss=arrays["loss"],
                                 exact=exact, **spec)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert abs(report.loss - float(arrays["loss"])) <= 1e-12 * abs(float(arrays["loss"]))
    by = {c.name: c for c in report.checks}
    for side in ("hidden", "weight", "bias"):
        assert by[f"fd_{side}_vs_reference"].total > 0
    if exact:
        for g in GRADS:
            check = by[f"{g}_vs_reference"]
            assert check.total == arrays[g].size
            assert check.max_abs_err <= 1e-12 * np.abs(arrays[g]).max(), (g, check.max_abs_err)


@pytest.mark.parametrize("case", CASES)
def test_gradient_without_the_term_is_caught_by_finite_differences(case):
    """Your gradients computed without the option: the reference comparison fails, and so do the
    finite differences against your gradients on their own (each term is proven, not assumed)."""
    arrays, inputs, spec = case_arrays(case)
    without = {g: arrays[f"{g}_without"] for g in GRADS}
    report = ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"], **inputs,
                                 **without, **spec)
    assert not report.ok
    failed = {c.name for c in report.checks if not c.ok}
    assert failed & {"fd_hidden_vs_grad", "fd_weight_vs_grad", "fd_bias_vs_grad"}, failed
    assert "grad_hidden_vs_reference" in failed or "grad_weight_vs_reference" in failed


def test_options_echoed_and_sample_weight_shape_checked():
    arrays, inputs, spec = case_arrays("all")
    report = ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"], **inputs,
                                 **spec)
    assert report.options["z_loss"] == 1e-3 and report.options["softcap"] == 4.0
    assert report.options["sample_weighted"] is True
    with pytest.raises(ce_cli.CeCheckError, match=r"sample_weight: shape \(5,\) but the hidden states hold 24 tokens \(2, 12\)"):
        ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"],
                            sample_weight=np.ones(5))
    flat = ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"], **inputs,
                               **spec, fd="off")
    inputs["sample_weight"] = inputs["sample_weight"].reshape(-1)
    assert ce_cli.check_linear(arrays["hidden"], arrays["weight"], arrays["labels"], **inputs,
                               **spec, fd="off").loss == flat.loss


def test_cli_options(invoke, tmp_path):
    arrays, inputs, _ = case_arrays("all")
    paths = {k: save(tmp_path, f"{k}.npy", v) for k, v in arrays.items()}
    args = ["linear", paths["hidden"], paths["weight"], paths["labels"], "--bias", paths["bias"],
            "--class-weight", paths["class_weight"], "--sample-weight", paths["sample_weight"],
            "--grad-hidden", paths["grad_hidden"], "--grad-weight", paths["grad_weight"],
            "--grad-bias", paths["grad_bias"], "--loss", paths["loss"], "--z-loss", "1e-3",
            "--softcap", "4", "--logit-scale", "1.3", "--label-smoothing", "0.1", "-q"]
    assert invoke(args).exit_code == 0
    bad = list(args)
    bad[bad.index("--grad-weight") + 1] = save(tmp_path, "gw.npy", arrays["grad_weight_without"])
    assert invoke(bad).exit_code == 1
    shifted, _, _ = case_arrays("shift_labels")
    p = {k: save(tmp_path, f"s_{k}.npy", v) for k, v in shifted.items()}
    common = ["linear", p["hidden"], p["weight"], p["labels"], "--bias", p["bias"],
              "--grad-hidden", p["grad_hidden"], "--loss", p["loss"], "-q"]
    assert invoke(common + ["--shift-labels"]).exit_code == 0
    assert invoke(common).exit_code == 1


# --- finite differences on the bias -------------------------------------------------------------

def _bias_problem(seed=0, N=40, H=8, V=120):
    rng = np.random.default_rng(seed)
    h, w = rng.standard_normal((N, H)), rng.standard_normal((V, H)) * 0.5
    b, y = rng.standard_normal(V), rng.integers(0, V, N)
    z = h @ w.T + b
    a = np.exp(z - z.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    a[np.arange(N), y] -= 1.0
    return h, w, b, y, a.sum(0) / N


@pytest.mark.parametrize("fd", ["directional", "sample"])
def test_bias_finite_differences_prove_the_reference_and_catch_a_wrong_bias_gradient(fd):
    h, w, b, y, db = _bias_problem()
    report = ce_cli.check_linear(h, w, y, bias=b, grad_bias=db, fd=fd)
    by = {c.name: c for c in report.checks}
    assert report.ok and by["fd_bias_vs_reference"].ok and by["fd_bias_vs_grad"].ok
    assert "whole vocabulary" in by["fd_bias_vs_reference"].note
    assert by["fd_bias_vs_reference"].total == 1 + 256 // 8
    # the mean's 1/N missing: the finite differences alone see it
    bad = ce_cli.check_linear(h, w, y, bias=b, grad_bias=db * len(y), fd=fd)
    assert not {c.name: c for c in bad.checks}["fd_bias_vs_grad"].ok


def test_bias_direction_sees_an_error_the_sampled_entries_miss():
    h, w, b, y, db = _bias_problem(1)
    wrong = db.copy()
    wrong[7] += 0.5    # one entry: the direction over the whole vocabulary moves with it
    report = ce_cli.check_linear(h, w, y, bias=b, grad_bias=wrong, fd="sample", samples=8)
    fd = {c.name: c for c in report.checks}["fd_bias_vs_grad"]
    assert not fd.ok and () in [e.index for e in fd.worst]


def test_no_bias_no_bias_finite_differences():
    h, w, b, y, _ = _bias_problem()
    names = {c.name for c in ce_cli.check_linear(h, w, y).checks}
    assert not any(n.startswith("fd_bias") for n in names)


# --- the streaming pass's cost ---------------------------------------------------------------

def test_weight_converted_once_per_row_block(monkeypatch):
    """The only N*V*H product is the logits': W is converted to float64 once per row block (the
    weight side's sweep rides on the first), whatever else is checked; results unchanged."""
    import ce_cli.models.linear as model

    h = np.random.default_rng(5).standard_normal((64, 12))
    rng = np.random.default_rng(6)
    w, b, y = rng.standard_normal((300, 12)) * 0.4, rng.standard_normal(300), rng.integers(0, 300, 64)
    z = h @ w.T + b
    a = np.exp(z - z.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    a[np.arange(64), y] -= 1.0
    grads = dict(grad_hidden=a @ w / 64, grad_weight=a.T @ h / 64, grad_bias=a.sum(0) / 64)
    whole = ce_cli.check_linear(h, w, y, bias=b, **grads)
    calls = []
    original = model.LinearCE.weight_block
    monkeypatch.setattr(model.LinearCE, "weight_block",
                        lambda self, v0, v1: calls.append((v0, v1)) or original(self, v0, v1))
    monkeypatch.setattr(model, "BLOCK_BYTES", 16 * 300 * 8)   # 16 rows a block: 4 row blocks
    monkeypatch.setattr(model, "BLOCK_SHARE", 0.0)
    monkeypatch.setattr(model, "VOCAB_BYTES", 8 * 12 * 100)   # 256 vocabulary rows a block
    report = ce_cli.check_linear(h, w, y, bias=b, **grads)
    assert report.ok and whole.ok
    assert sorted(set(calls)) == [(0, 256), (256, 300)]
    assert len(calls) == 4 * 2
    assert report.loss == pytest.approx(whole.loss, rel=1e-14)


def test_batch_kind_linear_with_semantics(tmp_path):
    """A manifest line of kind linear takes the options and `sample_weight` as grad's do."""
    from ce_cli.batch.manifest import parse_manifest
    from ce_cli.batch.runner import run_case

    arrays, _, _ = case_arrays("all")
    paths = {k: save(tmp_path, f"{k}.npy", v) for k, v in arrays.items()}
    line = {"name": "all", "kind": "linear", **{k: paths[k] for k in (
        "hidden", "weight", "labels", "bias", "class_weight", "sample_weight", "grad_hidden",
        "grad_weight", "grad_bias", "loss")}, "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 1.3,
        "label_smoothing": 0.1}
    without = dict(line, name="without", grad_weight=save(tmp_path, "gw.npy", arrays["grad_weight_without"]))
    cases = parse_manifest("\n".join(json.dumps(x) for x in (line, without)))
    assert [run_case(c).status for c in cases] == ["pass", "fail"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_floor_widened_by_the_accumulation_length(dtype):
    """Each dL/dW and dL/db entry sums N products, each dL/dH entry V: a correct GEMM rounds
    ~log2(n) units of the accumulating precision of sum |G||x| (float32 GEMMs of 2048 rows
    missed the plain 4 eps floor at 8 of 131M entries), so the default floor grows by
    4 log2(n) eps; an explicit --floor-factor is kept as given."""
    rng = np.random.default_rng(2)
    N, H, V = 2048, 3, 40
    h, w, y = rng.standard_normal((N, H)), rng.standard_normal((V, H)), rng.integers(0, V, N)
    grads = dict(grad_hidden=np.zeros((N, H), dtype), grad_weight=np.zeros((V, H), dtype))
    report = ce_cli.check_linear(h, w, y, fd="off", exact=True, **grads)
    rules = {c.name: c.rule for c in report.checks}
    assert "floor 48eps" in rules["grad_weight_vs_reference"]           # 4 + 4 * log2(2048)
    assert "floor 26eps" in rules["grad_hidden_vs_reference"]           # 4 + ceil(4 * log2(40))
    given = ce_cli.check_linear(h, w, y, fd="off", exact=True, floor_factor=4.0, **grads)
    assert all("floor 4eps" in c.rule for c in given.checks if c.name.startswith("grad_"))


@pytest.mark.parametrize("rows, sub", [(24, 2), (3, 1)])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("without", [False, True])
def test_extended_rows_in_sub_blocks_match_whole(monkeypatch, exact, without, rows, sub):
    """With the options the softmax model's rows are evaluated in sub-blocks of `semantic_step`
    rows (its ~12 temporaries each) inside row blocks of `row_step` (the 4 arrays kept), and
    `--exact` sums dL/dW over vocabulary ranges (3-row blocks: 4 ranges of 16; 24-row blocks:
    12 sub-blocks of 2): the report is
    the whole-block one."""
    import ce_cli.models.linear as model

    arrays, inputs, spec = case_arrays("all")
    grads = {g: arrays[f"{g}_without" if without else g] for g in GRADS}
    args = (arrays["hidden"], arrays["weight"], arrays["labels"])
    whole = ce_cli.check_linear(*args, **inputs, **grads, exact=exact, **spec)
    monkeypatch.setattr(model, "BLOCK_BYTES", rows * 64 * 8 * model.EXTENDED_HELD)
    monkeypatch.setattr(model, "BLOCK_SHARE", 0.0)
    calls = []
    original = model.LinearCE.evaluate_part
    monkeypatch.setattr(model.LinearCE, "evaluate_part",
                        lambda self, x, *a: calls.append(x.shape[0]) or original(self, x, *a))
    blocked = ce_cli.check_linear(*args, **inputs, **grads, exact=exact, **spec)
    assert max(calls) == sub
    assert blocked.ok is whole.ok is (not without)
    assert blocked.loss == pytest.approx(whole.loss, rel=1e-14)
    for a, c in zip(whole.checks, blocked.checks):
        assert (a.name, a.ok, a.mismatches, a.total) == (c.name, c.ok, c.mismatches, c.total)
        assert c.max_abs_err == pytest.approx(a.max_abs_err, rel=1e-6, abs=1e-14)
