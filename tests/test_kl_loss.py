"""`kl_loss` (`--kl-loss`): your loss is the KL divergence to the smoothed one-hot targets, the
cross-entropy minus their entropy H(q) per row (T5X's compute_weighted_cross_entropy, Flax).

Real T5X losses (fixtures/frameworks_semantics/jax/*_t5x_*: `loss_kl` is what T5X returns, `loss`
the cross-entropy) pass with it and fail without it, each failure naming the other form; a loss
off by a small relative amount fails either way; the settings it cannot serve are one line."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ce_cli
from ce_cli.errors import CeCheckError

FIXTURES = Path(__file__).parent.parent / "fixtures"
T5X = sorted(p for p in glob.glob(str(FIXTURES / "frameworks_semantics" / "jax" / "*_t5x_*.npz"))
             if "plain" not in Path(p).stem)


def _case(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta").reshape(-1)[0]))
    opts = dict(meta["ce_check"])
    opts.pop("sample_weight", None)
    return arrays, opts


def _loss_check(report):
    return next(c for c in report.checks if c.name == "loss_vs_reference")


def _check(arrays: dict, opts: dict, loss, **extra):
    return ce_cli.check_grad(arrays["logits"], arrays["labels"], grad=arrays["grad"], loss=loss,
                             sample_weight=arrays.get("sample_weight"), **opts, **extra)


def test_t5x_fixtures_are_there():
    assert len(T5X) >= 8


@pytest.mark.parametrize("path", T5X, ids=lambda p: Path(p).stem)
def test_t5x_kl_loss_passes_with_kl_loss(path):
    arrays, opts = _case(path)
    report = _check(arrays, opts, arrays["loss_kl"], kl_loss=True)
    assert report.ok, [(c.name, c.note) for c in report.checks if not c.ok]
    assert report.options["kl_loss"] is True


@pytest.mark.parametrize("path", [p for p in T5X if "_f32_" in Path(p).stem],
                         ids=lambda p: Path(p).stem)
def test_t5x_each_form_names_the_other(path):
    """float32: T5X's KL without `kl_loss`, or the cross-entropy with it, fails and says why."""
    arrays, opts = _case(path)
    plain = _loss_check(_check(arrays, opts, arrays["loss_kl"]))
    assert not plain.ok and "kl_loss" in plain.note and "T5X" in plain.note
    swapped = _loss_check(_check(arrays, opts, arrays["loss"], kl_loss=True))
    assert not swapped.ok and "drop `kl_loss`" in swapped.note


def _smoothed_kl(z: np.ndarray, y: np.ndarray, eps: float, form: str) -> np.ndarray:
    """Per-row KL(q || softmax z) in float64 with q the smoothed one-hot targets."""
    N, C = z.shape
    if form == "others":
        q = np.full((N, C), eps / (C - 1))
        q[np.arange(N), y] = 1.0 - eps
    else:
        q = np.full((N, C), eps / C)
        q[np.arange(N), y] += 1.0 - eps
    m = z.max(axis=1, keepdims=True)
    log_a = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q > 0, q * (np.log(q) - log_a), 0.0).sum(axis=1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), c=st.integers(2, 64),
       eps=st.floats(0.0, 0.5), scale=st.sampled_from([0.1, 1.0, 10.0, 50.0]),
       form=st.sampled_from(["torch", "others"]), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_kl_loss_property(seed, n, c, eps, scale, form, reduction):
    """The KL computed independently passes (float64); off by 1e-6 relative (or 1e-9 absolute,
    whichever is larger) it fails."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * scale
    y = rng.integers(0, c, n)
    kl = _smoothed_kl(z, y, eps, form)
    loss = {"mean": kl.mean(), "sum": kl.sum(), "none": kl}[reduction]
    opts = dict(label_smoothing=eps, smoothing_form=form, reduction=reduction, kl_loss=True,
                fd="off")
    good = ce_cli.check_grad(z, y, loss=loss, **opts)
    assert _loss_check(good).ok, _loss_check(good)
    off = np.asarray(loss) + np.maximum(1e-6 * np.abs(loss), 1e-9)
    assert not _loss_check(ce_cli.check_grad(z, y, loss=off, **opts)).ok


def test_without_smoothing_kl_is_the_cross_entropy():
    rng = np.random.default_rng(3)
    z, y = rng.standard_normal((6, 9)), rng.integers(0, 9, 6)
    ce = float(_smoothed_kl(z, y, 0.0, "torch").mean())
    assert _loss_check(ce_cli.check_grad(z, y, loss=ce, kl_loss=True)).ok


@pytest.mark.parametrize("kwargs, word", [
    (dict(weight=np.ones(4)), "class weights"),
    (dict(labels=np.full((3, 4), 0.25)), "class-index labels"),
])
def test_kl_loss_refusals(kwargs, word):
    z = np.zeros((3, 4))
    labels = kwargs.pop("labels", np.array([0, 1, 2]))
    with pytest.raises(CeCheckError, match="kl_loss") as err:
        ce_cli.check_grad(z, labels, loss=1.0, kl_loss=True, label_smoothing=0.1, **kwargs)
    assert word in str(err.value)


def test_kl_loss_is_softmax_only():
    with pytest.raises(CeCheckError, match="`kl_loss`: applies to softmax"):
        ce_cli.check_binary(np.zeros((2, 3)), np.zeros((2, 3)), kl_loss=True)


def _write(tmp_path: Path, eps: float) -> tuple[Path, Path, float]:
    rng = np.random.default_rng(11)
    z, y = rng.standard_normal((8, 50)), rng.integers(0, 50, 8)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    return tmp_path / "z.npy", tmp_path / "y.npy", float(_smoothed_kl(z, y, eps, "torch").mean())


def test_cli_kl_loss(invoke, tmp_path):
    z, y, kl = _write(tmp_path, 0.1)
    common = ["grad", z, y, "--label-smoothing", "0.1", "--loss", repr(kl), "--json"]
    ok = invoke([*common, "--kl-loss"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["options"]["kl_loss"] is True
    bad = invoke(common)
    assert bad.exit_code == 1
    loss = next(c for c in json.loads(bad.stdout)["checks"] if c["name"] == "loss_vs_reference")
    assert "kl_loss" in loss["note"]


def test_cli_kl_loss_refusals(invoke, tmp_path):
    z, y, kl = _write(tmp_path, 0.1)
    np.save(tmp_path / "w.npy", np.ones(50))
    r = invoke(["grad", z, y, "--loss", repr(kl), "--kl-loss", "--weight", tmp_path / "w.npy"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--kl-loss" in lines[0] and "class weights" in lines[0]
    r = invoke(["grad", "--shards", "rows", z, y, "--kl-loss"])
    assert r.exit_code == 2 and "--kl-loss" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_entropy_is_t5x_normalizing_constant():
    """H(q) of the "others" form (1 - eps on the label, eps/(V - 1) elsewhere) is T5X's
    normalizing constant -(conf log conf + (V - 1) low log(low + 1e-20))."""
    from ce_cli.models.semantics import Semantics
    from ce_cli.models.softmax import build_softmax_ce

    V, eps = 1000, 0.1
    problem, _ = build_softmax_ce(np.zeros((2, V)), np.array([1, 2]), label_smoothing=eps,
                                  reduction="sum", semantics=Semantics(smoothing_form="others"))
    conf, low = 1.0 - eps, eps / (V - 1)
    t5x = -(conf * math.log(conf) + (V - 1) * low * math.log(low + 1e-20))
    np.testing.assert_allclose(problem.targets_entropy(), [t5x, t5x], rtol=1e-13)


def test_batch_manifest_kl_loss(invoke, tmp_path):
    z, y, kl = _write(tmp_path, 0.1)
    line = {"kind": "multiclass", "logits": str(z), "labels": str(y), "label_smoothing": 0.1,
            "loss": kl}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({**line, "name": "kl", "kl_loss": True}) + "\n"
                        + json.dumps({**line, "name": "ce"}) + "\n")
    result = invoke(["batch", manifest])  # one JSON object per case on stdout
    assert result.exit_code == 1, result.output
    cases = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [c["ok"] for c in cases] == [True, False], cases
