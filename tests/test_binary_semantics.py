"""Training-code semantics of `ce-check binary` (sigmoid BCE): parity with the frameworks
(fixtures/binary_semantics, made by scripts/make_binary_fixtures.py), finite differences proving
each term, a bug zoo, float32 gradients, bad input, the CLI, `--json` and `batch` manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ce_cli.errors import CeCheckError
from ce_cli.verify.checks import check_binary

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "binary_semantics"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.npz"))
INPUTS = ("sample_weight", "weight", "pos_weight")


def load(name: str) -> tuple[dict, dict, str]:
    with np.load(FIXTURES / f"{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays.pop("call"))), str(arrays.pop("source"))


def test_fixtures_exist_and_are_small():
    assert len(NAMES) >= 10
    assert sum(p.stat().st_size for p in FIXTURES.glob("*.npz")) < 200_000


def test_sources_are_labelled():
    sources = {n: load(n)[2] for n in NAMES}
    assert all(s.startswith(("real", "recomputed")) for s in sources.values())
    assert sources["hf_multi_label"].startswith("real: transformers")
    assert sources["keras_smoothing_sample_weight"].startswith("recomputed: Keras")
    assert sources["keras_real_sum_over_batch_size"].startswith("real: keras 3")


def expected_kernel(options: dict) -> str:
    """Every option runs on the compiled kernel where it is built (tests/
    test_binary_options_kernel.py and test_fused_binary_transform.py compare it with numpy)."""
    from ce_cli.kernels import compiled
    return "compiled" if compiled.kernel() is not None else "numpy"


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_framework(name, tmp_path):
    """The float64 reference equals the framework's loss and gradient (w.r.t. the raw logits)
    to 1e-12 relative, and the framework's own values pass every check (finite differences
    included)."""
    a, call, _ = load(name)
    out = tmp_path / "ref.npy"
    report = check_binary(a["logits"], a["labels"], grad=a["grad"], loss=a["loss"], out_grad=out,
                          **{k: a[k] for k in INPUTS if k in a}, **call)
    assert report.ok, [(c.name, c.ok, c.max_rel_err, c.note) for c in report.checks if not c.ok]
    g = a["grad"]
    np.testing.assert_allclose(np.load(out), g, rtol=1e-12, atol=1e-12 * np.abs(g).max())
    assert report.loss == pytest.approx(float(np.sum(a["loss"])), rel=1e-12)
    names = {c.name for c in report.checks}
    assert {"grad_vs_reference", "loss_vs_reference", "two_class_bridge"} <= names
    assert any(n.startswith("fd") for n in names)
    options = {k: v for k, v in call.items() if k != "reduction"}
    assert report.options["kernel"] == expected_kernel(options)
    for key, value in options.items():
        assert report.options[key] == value
    assert report.options.get("sample_weighted", False) == ("sample_weight" in a)


# --- finite differences prove each new term (the reference against FD, no user gradient) ------

TERMS = [dict(softcap=2.5), dict(logit_scale=3.0), dict(logit_scale=0.3, softcap=1.5),
         dict(label_smoothing=0.2), dict(denominator=7.5, reduction="sum"), dict(),
         dict(softcap=4.0, label_smoothing=0.1, denominator=3.0)]


def batch_case(seed: int = 3, shape=(9, 7), spread: float = 4.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * spread
    y = rng.random(shape)
    y[::2] = (y[::2] > 0.5).astype(np.float64)
    s = rng.random(shape[:-1]) + 0.25
    return x, y, s, rng.uniform(0.3, 3.0, shape[-1])


@pytest.mark.parametrize("fd", ["full", "directional", "sample"])
@pytest.mark.parametrize("kw", TERMS, ids=lambda kw: "-".join(kw) or "sample_weight")
def test_finite_differences_prove_terms(kw, fd):
    x, y, s, pw = batch_case()
    report = check_binary(x, y, fd=fd, sample_weight=s, pos_weight=pw, **kw)
    assert report.ok, [(c.name, c.max_rel_err) for c in report.checks]
    assert report.options["kernel"] == expected_kernel(kw)
    assert any(c.name.startswith("fd") and c.total > 0 for c in report.checks)


@settings(max_examples=25, deadline=None)
@given(cap=st.floats(0.2, 50), scale=st.floats(0.05, 20), smoothing=st.floats(0, 1),
       spread=st.floats(0.1, 30), seed=st.integers(0, 2**16))
def test_fd_bound_holds_with_chain_rule(cap, scale, smoothing, spread, seed):
    """The rigorous FD bound survives steep softcaps and large scales (no false alarm)."""
    x, y, s, pw = batch_case(seed, (4, 5), spread)
    report = check_binary(x, y, fd="full", softcap=cap, logit_scale=scale,
                          label_smoothing=smoothing, sample_weight=s, pos_weight=pw)
    assert report.ok, [(c.name, c.max_rel_err) for c in report.checks]


def test_fd_catches_a_wrong_reference_term():
    """The finite differences are not vacuous: with the softcap they disagree with the plain
    loss's gradient (what a reference that forgot T' would say)."""
    from ce_cli.models.sigmoid import build_sigmoid_bce
    from ce_cli.verify.finite_diff import fd_full

    x, y, _s, _pw = batch_case()
    capped, _ = build_sigmoid_bce(x, y, softcap=2.0)
    plain, _ = build_sigmoid_bce(x, y)
    fd, bound, _ = fd_full(capped, 0, capped.n_rows)
    wrong = plain.evaluate(0, plain.n_rows).grad
    right = capped.evaluate(0, capped.n_rows).grad
    assert np.all(np.abs(fd - right) <= 2 * bound)
    assert np.mean(np.abs(fd - wrong) > 2 * bound) > 0.5


# --- an independent float32 / float64 implementation -------------------------------------------

def framework_grad(x, y, *, s=None, pw=None, cap=None, scale=1.0, smoothing=0.0, D=None,
                   dtype=np.float64, bug=None):
    """The BCE gradient w.r.t. the raw logits computed in `dtype` as training code would:
    s * ((1 + (pw - 1) y') sigmoid(z) - pw y') * T'(x) / D."""
    x = x.astype(dtype)
    u = x * dtype(scale)
    twice = bug == "scale_twice"
    if twice:
        u = u * dtype(scale)
    if cap is None:
        z, dz = u, np.full_like(u, dtype(scale * scale if twice else scale))
    else:
        z = dtype(cap) * np.tanh(u / dtype(cap))
        with np.errstate(over="ignore"):  # cosh overflows far out: sech^2 = 0
            dz = dtype(scale) / np.cosh(u / dtype(cap)) ** 2
        if bug == "no_sech2":
            dz = np.full_like(u, dtype(scale))
    y = y.astype(dtype)
    if smoothing:
        y = y * dtype(1 - smoothing) + (dtype(0) if bug == "smooth_to_zero" else dtype(smoothing / 2))
    e = np.exp(-np.abs(z))
    sig = np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(dtype)
    p = np.ones_like(x) if pw is None else np.broadcast_to(pw.astype(dtype), x.shape)
    g = ((1 + (p - 1) * y) * sig - p * y) * dz
    if s is not None:
        g = g * s.astype(dtype).reshape(s.shape + (1,) * (x.ndim - s.ndim))
    return (g / dtype(D if D is not None else 1.0)).astype(dtype)


VARIANTS = [dict(cap=2.5, kw=dict(softcap=2.5)), dict(scale=0.5, kw=dict(logit_scale=0.5)),
            dict(scale=3.0, cap=4.0, kw=dict(logit_scale=3.0, softcap=4.0)),
            dict(smoothing=0.1, kw=dict(label_smoothing=0.1))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v["kw"]))
def test_correct_gradients_pass(variant, dtype):
    """Gradients computed correctly in float32 or float64 (mean, sample weights, pos_weight)
    pass: no false alarm, no false diagnosis."""
    x, y, s, pw = batch_case(5)
    kw = variant["kw"]
    D = 7 * s.sum()
    g = framework_grad(x, y, s=s, pw=pw, D=D, dtype=dtype,
                       **{k: v for k, v in variant.items() if k != "kw"})
    report = check_binary(x.astype(dtype), y, grad=g, sample_weight=s, pos_weight=pw, **kw)
    assert report.ok, [(c.name, c.max_rel_err, c.note) for c in report.checks if not c.ok]
    assert report.diagnosis == ()


# --- bug zoo: each caught, the offending entries localised --------------------------------------

# causes that none of these bugs is: the diagnosis must not name them
FALSE_CAUSES = {"nonfinite", "sign", "scale", "ignored_rows", "wrong_axis", "smoothing_form"}


def grad_check(report):
    return next(c for c in report.checks if c.name == "grad_vs_reference")


def bad_entries(report):
    check = grad_check(report)
    assert not check.ok
    return {tuple(e.index) for e in check.worst if not e.ok}


def wrong_at(bad, good, rel=1e-6):
    return {tuple(int(i) for i in w) for w in np.argwhere(np.abs(bad - good) > rel * np.abs(good).max())}


def zoo_case(seed: int, dtype, bug: str, pos_weight: bool = False, **settings):
    """A batch, the framework's correct gradient and the one with `bug` under `settings` (the
    framework_grad names: cap, scale, smoothing); the correct one must pass. Returns (x, good,
    bad, the report on bad)."""
    x, y, _s, pw = batch_case(seed)
    x = x.astype(dtype)
    pw = pw if pos_weight else None
    good = framework_grad(x, y, pw=pw, D=x.size, dtype=dtype, **settings)
    bad = framework_grad(x, y, pw=pw, D=x.size, bug=bug, dtype=dtype, **settings)
    names = {"cap": "softcap", "scale": "logit_scale", "smoothing": "label_smoothing"}
    opts = {names[k]: v for k, v in settings.items()}
    assert check_binary(x, y, grad=good, pos_weight=pw, **opts).ok
    return x, good, bad, check_binary(x, y, grad=bad, pos_weight=pw, **opts)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zoo_softcap_missing_sech2(dtype):
    _x, good, bad, report = zoo_case(7, dtype, "no_sech2", pos_weight=True, cap=2.0)
    found = bad_entries(report)
    assert found and found <= wrong_at(bad, good)
    assert not next(c for c in report.checks if c.name == "fd_vs_grad").ok
    assert not FALSE_CAUSES & {d.code for d in report.diagnosis}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zoo_logit_scale_applied_twice(dtype):
    _x, good, bad, report = zoo_case(8, dtype, "scale_twice", scale=0.5)
    found = bad_entries(report)
    assert found and found <= wrong_at(bad, good)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zoo_denominator_counts_masked_entries(dtype):
    """Masked samples (sample weight 0): 'mean' and an outside denominator count only the
    unmasked elements; dividing by every element is caught, never in a masked row."""
    x, y, _s, _pw = batch_case(9)
    x = x.astype(dtype)
    mask = np.ones(x.shape[0])
    mask[[1, 4, 6]] = 0.0
    K = x.shape[1]
    right = framework_grad(x, y, s=mask, D=K * mask.sum(), dtype=dtype)
    wrong = framework_grad(x, y, s=mask, D=x.size, dtype=dtype)
    assert check_binary(x, y, grad=right, sample_weight=mask).ok
    assert check_binary(x, y, grad=right, sample_weight=mask, reduction="sum",
                        denominator=K * mask.sum()).ok
    for kw in ({}, dict(reduction="sum", denominator=K * mask.sum())):
        found = bad_entries(check_binary(x, y, grad=wrong, sample_weight=mask, **kw))
        assert found and not {r for r, _c in found} & {1, 4, 6}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zoo_smoothing_toward_zero(dtype):
    x, _good, _bad, report = zoo_case(10, dtype, "smooth_to_zero", smoothing=0.1)
    assert bad_entries(report)
    assert grad_check(report).mismatches == x.size  # y' off by A/2 on every element
    assert not FALSE_CAUSES & {d.code for d in report.diagnosis}


def test_zoo_sample_weight_where_pytorch_weight_meant():
    """--sample-weight changes 'mean' (divided by the weights' sum), PyTorch's weight does not."""
    x, y, s, _pw = batch_case(11)
    torch_weight = framework_grad(x, y, s=s, D=x.size)  # BCEWithLogitsLoss(weight=s[:, None])
    assert check_binary(x, y, grad=torch_weight, weight=s[:, None]).ok
    assert not check_binary(x, y, grad=torch_weight, sample_weight=s).ok


# --- options reach the model, the report and the kernel -----------------------------------------

def test_default_path_keeps_compiled_kernel():
    from ce_cli.kernels import compiled

    x, y, s, _pw = batch_case()
    built = compiled.kernel() is not None
    assert check_binary(x, y).options["kernel"] == ("compiled" if built else "numpy")
    for kw in TERMS[:-2] + [dict(sample_weight=s)]:
        assert check_binary(x, y, **kw).options["kernel"] == expected_kernel(kw)


def test_sample_weights_of_1d_logits_and_3d_batches():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=12), (rng.random(12) < 0.5).astype(float)
    s = rng.random(12)
    g = framework_grad(x, y, s=s, D=s.sum())
    assert check_binary(x, y, grad=g, sample_weight=s).ok
    x3, y3 = rng.normal(size=(2, 3, 4)), rng.random((2, 3, 4))
    s3 = rng.random((2, 3))
    g3 = framework_grad(x3, y3, s=s3, D=4 * s3.sum())
    assert check_binary(x3, y3, grad=g3, sample_weight=s3).ok
    assert check_binary(x3, y3, grad=g3, sample_weight=s3.reshape(-1)).ok  # flattened batch


def test_none_reduction_gives_weighted_elements():
    x, y, s, _pw = batch_case(12)
    loss = check_binary(x, y, sample_weight=s, reduction="none", softcap=3.0)
    assert loss.ok and loss.loss_per_sample_shape == x.shape


def test_two_class_passes_sample_weight_and_scale_to_the_softmax_check():
    """(N, 2) softmax logits: CE with sample weights and a logit scale is BCE on S (z1 - z0)."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(10, 2)) * 2
    y = rng.integers(0, 2, 10)
    s = rng.random(10)
    g1 = framework_grad(z[:, 1] - z[:, 0], y.astype(float), s=s, scale=2.0, D=s.sum())
    grad = np.stack([-g1, g1], axis=1)
    report = check_binary(z, y, grad=grad, two_class=True, sample_weight=s, logit_scale=2.0)
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]


@pytest.mark.parametrize("name", ["z_loss", "smoothing_form", "shift_labels", "vocab_offset"])
def test_softmax_only_settings_are_refused(name):
    value = {"z_loss": 0.1, "smoothing_form": "others", "shift_labels": True, "vocab_offset": 2}[name]
    x, y, _s, _pw = batch_case()
    with pytest.raises(CeCheckError, match=f"`{name}`: applies to softmax"):
        check_binary(x, y, **{name: value})


# --- bad input: exit 2, one line -----------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--softcap", "0"], "--softcap"),
    (["--softcap", "-1"], "--softcap"),
    (["--softcap", "nan"], "--softcap"),
    (["--logit-scale", "0"], "--logit-scale"),
    (["--denominator", "0"], "--denominator"),
    (["--denominator", "4", "--reduction", "none"], "--denominator"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--label-smoothing", "-0.1"], "--label-smoothing"),
    (["--sample-weight", "SW_SHAPE"], "sample weights should have shape (4,)"),
    (["--sample-weight", "SW_NAN"], "non-finite weight nan at index (2,)"),
    (["--sample-weight", "SW_ZERO"], "sum to 0"),
    (["--z-loss", "0.1"], "--z-loss"),
    (["--shift-labels"], "--shift-labels"),
])
def test_bad_input_exit_2(invoke, tmp_path, args, needle):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "z.npy", rng.normal(size=(4, 5)))
    np.save(tmp_path / "y.npy", (rng.random((4, 5)) < 0.5).astype(float))
    files = {"SW_SHAPE": np.ones(5), "SW_NAN": np.array([1.0, 1.0, np.nan, 1.0]),
             "SW_ZERO": np.zeros(4)}
    for key, arr in files.items():
        np.save(tmp_path / f"{key}.npy", arr)
    args = [str(tmp_path / f"{a}.npy") if a in files else a for a in args]
    result = invoke(["binary", str(tmp_path / "z.npy"), str(tmp_path / "y.npy"), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-check: error:") and needle in lines[0]


def test_help_names_the_options_and_the_softmax_only_ones(invoke):
    out = invoke(["binary", "--help"]).stdout
    for flag in ("--sample-weight", "--denominator", "--label-smoothing", "--softcap",
                 "--logit-scale"):
        assert flag in out
    assert "--z-loss" in out and "do not apply" in " ".join(out.split())


# --- the command line, --json and batch manifests -----------------------------------------------

def test_cli_json_echo_and_manifest(invoke, tmp_path):
    a, call, _ = load("keras_smoothing_sample_weight")
    for k in ("logits", "labels", "grad", "sample_weight"):
        np.save(tmp_path / f"{k}.npy", a[k])
    files = [str(tmp_path / f"{k}.npy") for k in ("logits", "labels")]
    result = invoke(["binary", *files, "--grad", str(tmp_path / "grad.npy"),
                     "--sample-weight", str(tmp_path / "sample_weight.npy"),
                     "--label-smoothing", "0.1", "--reduction", "sum", "--denominator",
                     str(call["denominator"]), "--loss", repr(float(a["loss"])), "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] and out["kind"] == "binary"
    assert out["options"]["label_smoothing"] == 0.1 and out["options"]["sample_weighted"]
    assert out["options"]["denominator"] == call["denominator"]
    assert out["options"]["kernel"] == expected_kernel({})
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((FIXTURES.parent.parent / "docs" / "schema" / "report.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(out)
    case = {"name": "keras", "kind": "binary", "logits": "logits.npy", "labels": "labels.npy",
            "grad": "grad.npy", "sample_weight": "sample_weight.npy", **call,
            "softcap": None, "logit_scale": 1.0, "fd": "full"}
    (tmp_path / "m.jsonl").write_text(json.dumps(case) + "\n")
    result = invoke(["batch", str(tmp_path / "m.jsonl")])
    assert result.exit_code == 0, result.stdout + result.stderr
    record = json.loads(result.stdout.splitlines()[0])
    assert record["options"]["label_smoothing"] == 0.1 and record["options"]["sample_weighted"]
    for key, value, needle in (("softcap", 0, "softcap"), ("z_loss", 0.1, "z_loss"),
                               ("denominator", -1, "denominator")):
        (tmp_path / "m.jsonl").write_text(json.dumps(dict(case, name="bad", **{key: value})) + "\n")
        result = invoke(["batch", str(tmp_path / "m.jsonl")])
        assert result.exit_code == 2 and needle in result.stdout + result.stderr


@settings(max_examples=40, deadline=None)
@given(cap=st.one_of(st.none(), st.floats(0.2, 50)), scale=st.floats(0.05, 20),
       smoothing=st.floats(0, 1), spread=st.floats(0.1, 40), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_correct_gradients_in_any_precision_pass(cap, scale, smoothing, spread, seed, dtype):
    """No false alarm: a correct gradient computed in float32 or float64 with any softcap,
    scale, smoothing, sample weights and pos_weight passes."""
    x, y, s, pw = batch_case(seed, (5, 6), spread)
    x = x.astype(dtype)
    g = framework_grad(x, y, s=s, pw=pw, cap=cap, scale=scale, smoothing=smoothing,
                       D=6 * s.sum(), dtype=dtype)
    report = check_binary(x, y, grad=g, sample_weight=s, pos_weight=pw, softcap=cap,
                          logit_scale=scale, label_smoothing=smoothing)
    assert report.ok, [(c.name, c.max_rel_err, c.note) for c in report.checks if not c.ok]
