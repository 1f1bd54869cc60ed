"""Training-code semantics: parity with the frameworks (fixtures/semantics, made by
scripts/make_semantics_fixtures.py), finite-difference proofs of each term, a bug zoo, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ce_cli.errors import CeCheckError
from ce_cli.verify.checks import check_binary, check_grad

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "semantics"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.npz"))
OPTIONAL = ("lse", "sample_weight", "z_loss_value", "pos_weight")


def load(name: str) -> tuple[dict, dict, str]:
    with np.load(FIXTURES / f"{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays.pop("call"))), str(arrays.pop("source"))


def run_fixture(name: str, tmp_path: Path, **over):
    a, call, _source = load(name)
    extra = {k: a[k] for k in OPTIONAL if k in a}
    out = tmp_path / f"{name}_ref.npy"
    if call.pop("binary", False):
        report = check_binary(a["logits"], a["labels"], grad=a["grad"], loss=a["loss"],
                              out_grad=out, **extra, **call, **over)
    else:
        loss = None if "vocab_offset" in call else a["loss"]
        report = check_grad(a["logits"], a["labels"], grad=a["grad"], loss=loss, out_grad=out,
                            **extra, **call, **over)
    return report, np.load(out), a


def test_fixtures_exist_and_are_small():
    assert len(NAMES) >= 15
    assert sum(p.stat().st_size for p in FIXTURES.glob("*.npz")) < 3_000_000


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_framework(name, tmp_path):
    """The float64 reference equals the framework's loss and gradient to ~1e-12 relative,
    every check passes (finite differences included) on the framework's own gradient."""
    report, ref_grad, a = run_fixture(name, tmp_path)
    assert report.ok, [(c.name, c.ok, c.note) for c in report.checks]
    g = a["grad"]
    scale = np.abs(g).max()
    np.testing.assert_allclose(ref_grad, g, rtol=1e-12, atol=1e-12 * scale)
    want = float(np.sum(a["loss"]))
    assert report.loss == pytest.approx(want, rel=1e-12, abs=1e-300)
    names = {c.name for c in report.checks}
    assert any(n.startswith("fd") for n in names)
    if "lse" in a and "vocab_offset" not in load(name)[1]:
        assert "lse_vs_reference" in names
    if "z_loss_value" in a:
        assert "z_loss_vs_reference" in names


def test_sources_are_labelled():
    sources = {n: load(n)[2] for n in NAMES}
    assert all(s.startswith(("real", "recomputed")) for s in sources.values())
    assert sources["hf_causal_lm"].startswith("real: transformers")
    assert sources["liger_softcap_zloss"].startswith("recomputed")


# --- finite differences prove each new term (reference vs FD, no user gradient) --------------

TERMS = [dict(z_loss=0.05), dict(softcap=2.5), dict(logit_scale=3.0),
         dict(softcap=1.5, logit_scale=0.3, z_loss=0.2),
         dict(label_smoothing=0.2, smoothing_form="others"), dict(denominator=7.5),
         dict(z_loss=0.01, label_smoothing=0.1, softcap=3.0)]


@pytest.mark.parametrize("fd", ["full", "directional", "sample"])
@pytest.mark.parametrize("kw", TERMS, ids=lambda kw: "-".join(kw))
def test_finite_differences_prove_terms(kw, fd):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(9, 11)) * 4
    y = rng.integers(0, 11, size=9)
    y[2] = -100
    report = check_grad(z, y, fd=fd, sample_weight=rng.random(9) + 0.5, **kw)
    assert report.ok
    from ce_cli.kernels import compiled

    # the compiled kernel serves every term
    assert report.options["kernel"] == ("compiled" if compiled.kernel() is not None else "numpy")


@settings(max_examples=25, deadline=None)
@given(cap=st.floats(0.2, 50), scale=st.floats(0.05, 20), zeta=st.floats(0, 1),
       spread=st.floats(0.1, 30), seed=st.integers(0, 2**16))
def test_fd_bound_holds_with_chain_rule(cap, scale, zeta, spread, seed):
    """The rigorous FD bound survives steep softcaps and large scales (no false alarm)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(4, 6)) * spread
    y = rng.integers(0, 6, size=4)
    report = check_grad(z, y, fd="full", softcap=cap, logit_scale=scale, z_loss=zeta)
    assert report.ok, [(c.name, c.max_rel_err) for c in report.checks]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_user_gradient_in_dtype_passes(dtype):
    a, call, _ = load("liger_softcap_zloss")
    report = check_grad(a["logits"].astype(dtype), a["labels"],
                        grad=a["grad"].astype(dtype), lse=a["lse"].astype(dtype),
                        z_loss_value=a["z_loss_value"].astype(dtype), **call)
    assert report.ok


# --- bug zoo ---------------------------------------------------------------------------------

def worst_rows(report, name="grad_vs_reference"):
    check = next(c for c in report.checks if c.name == name)
    assert not check.ok
    return check, {e.index[0] for e in check.worst if not e.ok}


def reference_grad(tmp_path, z, y, **kw):
    out = tmp_path / "g.npy"
    check_grad(z, y, out_grad=out, fd="off", **kw)
    return np.load(out)


@pytest.fixture
def batch():
    rng = np.random.default_rng(11)
    z = rng.normal(size=(10, 12)) * 3
    y = rng.integers(0, 12, size=10)
    y[[1, 6]] = -100
    return z, y


def test_zoo_z_loss_over_all_rows(batch, tmp_path):
    z, y = batch
    coef = 0.05
    good = reference_grad(tmp_path, z, y, z_loss=coef)
    lse = np.log(np.exp(z).sum(1))
    a = np.exp(z - lse[:, None])
    bad = good.copy()
    bad[[1, 6]] += 2 * coef * lse[[1, 6], None] * a[[1, 6]] / 8  # ignored rows given the term
    assert check_grad(z, y, grad=good, z_loss=coef).ok
    _check, rows = worst_rows(check_grad(z, y, grad=bad, z_loss=coef, fd="off"))
    assert rows <= {1, 6} and rows


def test_zoo_softcap_missing_sech2(batch, tmp_path):
    z, y = batch
    cap = 2.0
    good = reference_grad(tmp_path, z, y, softcap=cap)
    bad = good / (1.0 / np.cosh(z / cap) ** 2)
    report = check_grad(z, y, grad=bad, softcap=cap)
    check, _rows = worst_rows(report)
    wrong = np.argwhere(np.abs(bad - good) > 1e-9 * np.abs(good).max())
    assert all(tuple(e.index) in {tuple(w) for w in wrong} for e in check.worst if not e.ok)
    assert not next(c for c in report.checks if c.name == "fd_vs_grad").ok


def test_zoo_logit_scale_twice(batch, tmp_path):
    z, y = batch
    good = reference_grad(tmp_path, z, y, logit_scale=0.5)
    assert check_grad(z, y, grad=good, logit_scale=0.5).ok
    bad = reference_grad(tmp_path, z * 0.5, y, logit_scale=0.5) * 0.5  # S*(S z), chained twice
    worst_rows(check_grad(z, y, grad=bad, logit_scale=0.5))


def test_zoo_smoothing_torch_form_where_others_meant(batch, tmp_path):
    z, y = batch
    torch_form = reference_grad(tmp_path, z, y, label_smoothing=0.1)
    assert check_grad(z, y, grad=torch_form, label_smoothing=0.1).ok
    report = check_grad(z, y, grad=torch_form, label_smoothing=0.1, smoothing_form="others")
    check, rows = worst_rows(report)
    assert rows and not rows & {1, 6}  # ignored rows are right either way
    assert check.mismatches >= 8 * 12 - 8  # every entry of the live rows shifts


def test_zoo_denominator_counts_ignored(batch, tmp_path):
    z, y = batch
    right = reference_grad(tmp_path, z, y, reduction="sum") / 8
    wrong = reference_grad(tmp_path, z, y, reduction="sum") / 10
    assert check_grad(z, y, grad=right).ok
    assert check_grad(z, y, grad=right, reduction="sum", denominator=8.0).ok
    check, rows = worst_rows(check_grad(z, y, grad=wrong, reduction="sum", denominator=8.0))
    assert rows and not rows & {1, 6}


def test_zoo_labels_not_shifted(tmp_path):
    rng = np.random.default_rng(5)
    z = rng.normal(size=(2, 5, 7))
    y = rng.integers(0, 7, size=(2, 5))
    unshifted = reference_grad(tmp_path, z, y)
    assert check_grad(z, y, grad=reference_grad(tmp_path, z, y, shift_labels=True),
                      shift_labels=True).ok
    check = next(c for c in check_grad(z, y, grad=unshifted, shift_labels=True).checks
                 if c.name == "grad_vs_reference")
    assert not check.ok
    assert all(len(e.index) == 3 for e in check.worst)


def test_zoo_shard_local_lse(tmp_path):
    a, call, _ = load("megatron_vocab_shard")
    zs, y = a["logits"], a["labels"]
    K = call["vocab_offset"]
    assert check_grad(zs, y, grad=a["grad"], lse=a["lse"], **call).ok
    local = np.log(np.exp(zs).sum(1))
    bad = np.exp(zs - local[:, None])
    inside = (y >= K) & (y < K + zs.shape[1])
    bad[np.flatnonzero(inside), (y - K)[inside]] -= 1
    bad[y == -100] = 0
    check, rows = worst_rows(check_grad(zs, y, grad=bad, lse=a["lse"], **call))
    assert rows


@pytest.mark.parametrize("form", ["torch", "others"])
def test_one_vocabulary_shard_with_smoothing_cli(invoke, tmp_path, form):
    """`--vocab-offset K --lse GLOBAL --vocab-size V --label-smoothing eps`: one rank's columns of
    the whole batch's smoothed gradient pass; smoothing over the shard's own V (Megatron#7464)
    fails; without --vocab-size the smoothing is refused in one line."""
    rng = np.random.default_rng(4)
    V, K, C, eps = 40, 10, 12, 0.1
    z, y = rng.normal(size=(16, V)) * 3, rng.integers(0, V, 16)
    lse = np.log(np.exp(z).sum(1))
    a = np.exp(z - lse[:, None])
    q = np.full((16, V), eps / V if form == "torch" else eps / (V - 1))
    q[np.arange(16), y] = (1 - eps + eps / V) if form == "torch" else 1 - eps
    g = (a - q) / 16
    local = np.full((16, C), eps / C if form == "torch" else eps / (C - 1))
    inside = (y >= K) & (y < K + C)
    local[np.flatnonzero(inside), (y - K)[inside]] += (1 - eps) if form == "torch" else (
        1 - eps - eps / (C - 1))
    files = {"z": z[:, K:K + C], "y": y, "lse": lse, "g": g[:, K:K + C],
             "bad": (a[:, K:K + C] - local) / 16}
    for name, arr in files.items():
        np.save(tmp_path / f"{name}.npy", arr)
    args = ["grad", tmp_path / "z.npy", tmp_path / "y.npy", "--vocab-offset", str(K),
            "--lse", tmp_path / "lse.npy", "--label-smoothing", str(eps),
            "--smoothing-form", form, "--fd", "off"]
    good = invoke([*args, "--vocab-size", str(V), "--grad", tmp_path / "g.npy"])
    assert good.exit_code == 0, good.output
    bad = invoke([*args, "--vocab-size", str(V), "--grad", tmp_path / "bad.npy"])
    assert bad.exit_code == 1, bad.output
    refused = invoke([*args, "--grad", tmp_path / "g.npy"])
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--vocab-size" in refused.stderr


def test_correct_variants_raise_no_alarm(batch, tmp_path):
    z, y = batch
    for kw in TERMS:
        g = reference_grad(tmp_path, z, y, **kw)
        for dtype in (np.float32, np.float64):
            report = check_grad(z.astype(dtype), y, grad=g.astype(dtype), **kw)
            assert report.ok, (kw, dtype, [(c.name, c.max_rel_err) for c in report.checks])


# --- lse and z-loss value ----------------------------------------------------------------------

def test_lse_and_z_loss_value_compared(batch):
    z, y = batch
    lse = np.log(np.exp(z).sum(1))
    zl = 0.01 * np.sum(lse[y != -100] ** 2) / 8
    report = check_grad(z, y, lse=lse, z_loss=0.01, z_loss_value=zl)
    assert report.ok
    bad = lse.copy()
    bad[4] += 1e-3
    check = next(c for c in check_grad(z, y, lse=bad).checks if c.name == "lse_vs_reference")
    assert not check.ok and check.worst[0].index == (4,)
    all_rows = 0.01 * np.sum(lse**2) / 8  # z-loss over ignored rows too
    assert not check_grad(z, y, z_loss=0.01, z_loss_value=all_rows).ok


# --- bad input: exit 2, one line ----------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--softcap", "0"], "--softcap"),
    (["--softcap", "-1"], "--softcap"),
    (["--logit-scale", "0"], "--logit-scale"),
    (["--z-loss", "-1"], "--z-loss"),
    (["--denominator", "0"], "--denominator"),
    (["--smoothing-form", "megatron"], "--smoothing-form"),
    (["--vocab-offset", "2"], "--lse"),
    (["--lse", "LSE_BAD"], "lse"),
    (["--z-loss-value", "1.0"], "--z-loss"),
    (["--denominator", "4", "--reduction", "none"], "--denominator"),
])
def test_bad_input_exit_2(invoke, tmp_path, args, needle):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "z.npy", rng.normal(size=(4, 5)))
    np.save(tmp_path / "y.npy", rng.integers(0, 5, size=4))
    np.save(tmp_path / "lse.npy", np.zeros(3))
    args = [str(tmp_path / "lse.npy") if a == "LSE_BAD" else a for a in args]
    result = invoke(["grad", str(tmp_path / "z.npy"), str(tmp_path / "y.npy"), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-check: error:") and needle in lines[0]


def test_shard_lse_below_local_is_refused():
    a, call, _ = load("megatron_vocab_shard")
    with pytest.raises(CeCheckError, match="below the shard"):
        check_grad(a["logits"], a["labels"], lse=a["lse"] - 5, **call)


def test_shard_loss_with_outside_labels_is_refused():
    a, call, _ = load("megatron_vocab_shard")
    with pytest.raises(CeCheckError, match="outside the shard"):
        check_grad(a["logits"], a["labels"], lse=a["lse"], loss=1.0, **call)


def test_cli_and_manifest(invoke, tmp_path):
    a, call, _ = load("hf_causal_lm_num_items")
    for k in ("logits", "labels", "grad"):
        np.save(tmp_path / f"{k}.npy", a[k])
    files = [str(tmp_path / f"{k}.npy") for k in ("logits", "labels")]
    result = invoke(["grad", *files, "--grad", str(tmp_path / "grad.npy"), "--shift-labels",
                     "--denominator", "40", "--reduction", "sum", "--loss",
                     repr(float(a["loss"])), "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["options"]["denominator"] == 40.0 and out["options"]["shift_labels"]
    case = {"name": "hf", "kind": "multiclass", "logits": "logits.npy", "labels": "labels.npy",
            "grad": "grad.npy", "shift_labels": True, "denominator": 40, "reduction": "sum",
            "z_loss": 0.0, "softcap": None, "smoothing_form": "torch", "fd": "full"}
    (tmp_path / "m.jsonl").write_text(json.dumps(case) + "\n")
    result = invoke(["batch", str(tmp_path / "m.jsonl")])
    assert result.exit_code == 0, result.stdout + result.stderr
    bad = dict(case, name="bad", softcap=0)
    (tmp_path / "m.jsonl").write_text(json.dumps(bad) + "\n")
    result = invoke(["batch", str(tmp_path / "m.jsonl")])
    assert result.exit_code != 0 and "softcap" in result.stdout + result.stderr


def test_default_path_keeps_compiled_kernel(batch):
    z, y = batch
    from ce_cli.kernels import compiled

    report = check_grad(z, y)
    assert report.options["kernel"] == ("compiled" if compiled.kernel() is not None else "numpy")
    assert check_grad(z, y, softcap=3.0).options["kernel"] == report.options["kernel"]


@pytest.mark.parametrize("name", ["hf_causal_lm", "hf_causal_lm_num_items"])
def test_hf_float32_upcast_passes(name):
    """ForCausalLMLoss as shipped (logits.float()): its float32 gradient passes at f32."""
    a, call, _ = load(name)
    report = check_grad(a["logits"], a["labels"], grad=a["grad_f32"], loss=a["loss_f32"], **call)
    assert report.ok and report.options["precision"] == "f32"
    lazy = check_grad(a["logits"], a["labels"], grad=a["grad_f32"], **{**call, "shift_labels": False})
    assert not lazy.ok  # the same gradient is wrong for unshifted labels
