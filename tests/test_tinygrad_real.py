"""tinygrad's real losses (fixtures/frameworks_semantics/tinygrad/, made by
`scripts/frameworks/tinygrad_cases.py`; no tinygrad at test time).

The fixtures' no-false-alarm test and the `allrows` plant are tests/test_semantic_frameworks.py's;
here: the plants that test does not name, and what the sweep found (docs/frameworks.md,
"tinygrad, for real")."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

import ce_cli

DIR = Path(__file__).parent.parent / "fixtures" / "frameworks_semantics" / "tinygrad"
CASES = sorted(glob.glob(str(DIR / "*.npz")))
F32 = [p for p in CASES if "_f32_" in Path(p).stem]
EPS32 = 2.0**-23


def _load(path: str | Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("meta").reshape(-1)[0]))


def _check(arrays: dict, meta: dict, grad: np.ndarray | None = None, loss: bool = True,
           **settings):
    opts = {**meta["ce_check"], **settings}
    fn = ce_cli.check_binary if meta["target"] == "binary" else ce_cli.check_grad
    return fn(arrays["logits"], arrays["labels"],
              grad=arrays["grad"] if grad is None else grad,
              loss=arrays["loss"] if loss else None, **opts)


def _failed(report) -> list[str]:
    return [c.name for c in report.checks if not c.ok]


def test_fixtures_cover_every_call_and_dtype():
    names = [Path(p).stem for p in CASES]
    for variant in ("sparse", "sparse_ignore", "sparse_smooth", "sparse_smooth_sum", "sparse_none",
                    "sparse_neg1", "sparse_inf", "ce_axis1", "ce_prob", "ce_prob_none", "bce",
                    "bce_pw"):
        assert any(n.endswith("_" + variant) for n in names), variant
    assert {n.split("_")[2] for n in names} == {"f32", "f16", "bf16"}


@pytest.mark.parametrize("bug", ["nosmooth", "nopw", "pw1", "row1.001"])
def test_planted_bugs_are_caught(bug):
    """tinygrad's own code with the smoothing term or the pos_weight dropped, one column's
    pos_weight x1.05, or the largest row x1.001: each fails."""
    tried, missed = 0, []
    for path in F32:
        arrays, meta = _load(path)
        if bug == "row1.001":
            g = arrays["grad"].reshape(-1, arrays["grad"].shape[-1]).copy()
            g[int(np.argmax(np.abs(g).max(axis=1)))] *= np.float32(1.001)
            planted = g.reshape(arrays["grad"].shape)
        elif "grad_bug_" + bug in arrays:
            planted = arrays["grad_bug_" + bug]
        else:
            continue
        tried += 1
        assert not np.array_equal(planted, arrays["grad"])
        if _check(arrays, meta, grad=planted, loss=False, fd="sample").ok:
            missed.append(Path(path).stem)
    assert tried >= 3
    assert not missed, missed


NEG1 = [p for p in CASES if p.endswith("_sparse_neg1.npz")]


@pytest.mark.parametrize("path", NEG1, ids=lambda p: Path(p).stem)
def test_default_ignore_index_counts_the_minus_one_rows(path):
    """Since 0.10.0 the default ignore_index=-1 masks nothing: a -1 label is a zero row that the
    mean still counts. Checked as "-1 ignored" (`--ignore-index -1`, 0.9.2's meaning) it fails,
    and in float32 below std 30 the diagnosis names the count; `--reduction sum --denominator N`
    passes."""
    arrays, meta = _load(path)
    assert _check(arrays, meta).ok
    report = _check(arrays, meta, reduction="mean", denominator=None)
    assert "grad_vs_reference" in _failed(report)
    if "_f32_" in path and "_s30_" not in path:
        n, kept = arrays["labels"].size, int((arrays["labels"] != -1).sum())
        assert any(f"mean over all {n} rows instead of the {kept} not ignored" in d.message
                   for d in report.diagnosis)


OLD = sorted(glob.glob(str(DIR / "findings" / "tinygrad_v092_*.npz")))


@pytest.mark.parametrize("path", OLD, ids=lambda p: Path(p).stem)
def test_release_092_ignored_minus_one_and_its_max_was_not_detached(path):
    """tinygrad 0.9.2: Y != -1 masks the -1 rows (the mean over the labelled ones), so 0.14.0's
    mapping fails. Its log_softmax let the gradient through the row max (detached in 0.10.0,
    #7009): the normaliser's rounding residual (1 - sum a) Q lands on each row's argmax entry,
    7 of 16 rows over the entry-wise rule at C = 1,000, std 1 (5e-5 relative). A correct
    gradient: they pass with the row max's path allowed there, and the note says so."""
    arrays, meta = _load(path)
    as_014 = _check(arrays, meta, reduction="sum", denominator=float(arrays["labels"].size))
    assert "grad_vs_reference" in _failed(as_014)
    report = _check(arrays, meta)
    assert report.ok, _failed(report)
    if "C1000_s1_" in path:
        grad_check = next(c for c in report.checks if c.name == "grad_vs_reference")
        assert grad_check.note.startswith("7 rows pass with their arg-max entry allowed")


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_16bit_minus_inf_logits_give_a_nan_loss(dtype):
    """16-bit logits with -inf entries: (log_probs * one_hot).sum(-1) is -inf * 0 = NaN in the
    row (float32 gets the finite loss). The gradient passes; the loss fails."""
    arrays, meta = _load(DIR / "findings" / f"tinygrad_sce_{dtype}_nc_C10_s1_mean_sparse_inf.npz")
    assert np.isnan(arrays["loss"]).all() and np.isinf(arrays["logits"]).any()
    report = _check(arrays, meta)
    assert _failed(report) == ["loss_vs_reference"]
    assert "NaN/inf on one side only" in report.checks[[c.name for c in report.checks]
                                                        .index("loss_vs_reference")].note
    assert _check(arrays, meta, loss=False).ok


BCE = DIR / "findings" / "tinygrad_bce_f32_nc_C10_s30_mean_bce.npz"


def test_bce_exp2_rounding_is_the_argument_rounding():
    """tinygrad's sigmoid is 1 / (1 + exp2(-x / ln 2)): the product rounds by half an ulp of
    |x| / ln 2, so sigma(x) at x << 0 errs by up to |x| eps / 2 relative, and float32's 1 / ln 2
    (0.11 eps low) adds 0.11 |x| eps: at y = 0, x < -20 many entries are off by more than the
    floor's relative part (6 eps), each within (0.75 |x| + 4) eps. In absolute terms that is
    |x| eps s(x) s(-x) <= 0.33 eps: every entry is within 0.75 eps / D, under the floor's
    |1 - y| term (the complement form's), and the check passes."""
    arrays, meta = _load(BCE)
    z, y = arrays["logits"].astype(np.float64), arrays["labels"].astype(np.float64)
    D = z.size
    ref = (1.0 / (1.0 + np.exp(-z)) - y) / D
    err = np.abs(arrays["grad"].astype(np.float64) - ref)
    assert (err <= 0.75 * EPS32 / D).all()
    far = (y == 0) & (z < -20) & (np.abs(ref) > np.finfo(np.float32).tiny)  # not flushed
    rel = err[far] / np.abs(ref[far])
    assert (rel > 6 * EPS32).sum() >= 100
    assert (rel <= (0.75 * np.abs(z[far]) + 4) * EPS32).all()
    assert _check(arrays, meta).ok


def test_float16_mean_over_65536_rows_is_zero():
    """0.14.0 divides the float16 sum by the mask's count as float16: 65,536 rows -> inf, the
    loss -0 and the gradient all zeros. Every reference entry lies in float16's subnormal range
    (1/65,536 < 6.1e-5), which float16 kernels keep: the zeros fail, the loss too (until stop 27
    they passed as flushed to zero)."""
    arrays, meta = _load(DIR / "findings" / "tinygrad_bign_f16_nc_C2_s1_mean_sparse.npz")
    assert float(arrays["loss"]) == 0.0 and not arrays["grad"].any()
    report = _check(arrays, meta, fd="sample")  # 131,072 entries: sampled finite differences
    assert {"loss_vs_reference", "grad_vs_reference", "fd_vs_grad"} <= set(_failed(report))
    grad_check = report.checks[[c.name for c in report.checks].index("grad_vs_reference")]
    assert "flushed to zero" not in grad_check.note


@pytest.mark.parametrize("path", [p for p in CASES if p.endswith("_s1_mean_sparse_neg1.npz")],
                         ids=lambda p: Path(p).stem)
def test_minus_one_rows_counted_are_diagnosed_at_every_dtype(path):
    """Checked as "-1 ignored", 0.14.0's mean over every row is one scale N_valid / N of the
    whole gradient: named so in float32 and in 16 bits, whose roundings keep the ratio within
    their own relative rule rather than 1e-3."""
    arrays, meta = _load(path)
    opts = {k: v for k, v in meta["ce_check"].items() if k not in ("reduction", "denominator")}
    report = ce_cli.check_grad(arrays["logits"], arrays["labels"], grad=arrays["grad"],
                               fd="off", **opts)
    assert not report.ok
    assert report.diagnosis[0].code == "scale"
    assert "mean over all" in report.diagnosis[0].message
    assert [d.code for d in report.diagnosis].count("row_factor") == 0
