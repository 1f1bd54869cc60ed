"""check_grad and `grad --shards vocab` on Megatron-Core's real vocabulary-parallel cross-entropy,
run on CPU over gloo (fixtures/frameworks_semantics/megatron/, made by
`scripts/frameworks/megatron_cases.py OUT --small --fixtures` with megatron-core 0.19.2: TP 2 and
4, (S, B, V/p) shards, float32 and bf16 logits, an upstream vector with zeros, targets -100).

- `vocab_parallel_cross_entropy` without smoothing, `fused_vocab_parallel_cross_entropy` (its
  gradient cast to bf16 whatever the logits' dtype) and the smoothing of the fix NVIDIA/Megatron-LM
  #7466 describes (global V, written from megatron's own helpers): no false alarm, merged over the
  shards and on the concatenated arrays, on both kernels.
- The real function run with one thing changed (targets moved by V/p: the label term on the
  wrong rank; the max's or the normaliser's all-reduce left out; the last rank smoothing alone,
  or not smoothing): caught.
- megatron-core 0.19.2's own label smoothing (#7464, #737: K and the mean of log p local to
  the rank) fails with the global semantics (`--smoothing-form others`), every shard named, and
  passes as the local semantics stated rank by rank.
- Each rank alone, in the one-shard form (`--vocab-offset`, `--vocab-size`, the global lse):
  the same verdicts rank by rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "frameworks"))
import megatron_cases as mc  # noqa: E402  (numpy only at import: torch loads in its generator)

CASES = sorted(str(p) for p in (ROOT / "fixtures" / "frameworks_semantics" / "megatron")
               .glob("*.npz"))
META = {p: mc.load(p)[1] for p in CASES}
CORRECT = [p for p in CASES if META[p]["variant"] != "smooth"]
SMOOTH = [p for p in CASES if META[p]["variant"] == "smooth"]
PLANTED = [(p, bug) for p in CORRECT for bug in sorted(mc.planted(mc.load(p)[0]))]
FD = {"fd": "directional"}  # one probe a row (the sweep, `--check`, runs `auto`: full at this size)


def _stem(path: str) -> str:
    return Path(path).stem.removeprefix("megatron_")


def _failed(report) -> dict[str, str]:
    return {c.name: c.note for c in getattr(report, "report", report).checks if not c.ok}


def _failing_shards(sharded) -> list[int]:
    return [s.index for s in sharded.shards if not s.ok]


def test_megatron_fixtures_are_there():
    kinds = {(m["variant"], m["tp"], m["dtype"]) for m in META.values()}
    for v in mc.VARIANTS:
        for tp in mc.TPS:
            assert (v, tp, "f32") in kinds and (v, tp, "bf16") in kinds, (v, tp)
    assert {m["megatron_core"] for m in META.values()} == {"0.19.2"}
    assert {m["C"] for m in META.values()} == {1000}
    assert len(PLANTED) >= 12
    for p in CASES:
        arr, meta = mc.load(p)
        assert arr["logits"].shape == tuple(meta["shape"])
        assert arr["logits_r0"].shape[-1] == meta["C"] // meta["tp"]
        assert np.any(arr["labels"] == -100) and np.any(arr["sample_weight"] == 0)


@pytest.mark.parametrize("path", CORRECT, ids=_stem)
def test_no_false_alarm_on_megatron(both_kernels, path):
    """Merged over the TP shards, on the concatenated arrays, and the per-token losses."""
    arr, meta = mc.load(path)
    assert mc.check_merged(arr, meta, **FD).report.ok, _failed(mc.check_merged(arr, meta, **FD))
    assert mc.check_full(arr, meta, **FD).ok, _failed(mc.check_full(arr, meta, **FD))
    assert mc.check_tokens(arr, meta, **FD).ok


@pytest.mark.parametrize("path,bug", PLANTED, ids=lambda v: _stem(v) if v.endswith(".npz") else v)
def test_megatron_with_one_thing_changed_is_caught(both_kernels, path, bug):
    arr, meta = mc.load(path)
    grad = mc.planted(arr)[bug]
    sharded = mc.check_merged(arr, meta, grad=grad, loss=False, **FD)
    assert not sharded.report.ok
    assert not mc.check_full(arr, meta, grad=grad, loss=False, **FD).ok
    if bug.startswith("last"):  # only the last rank's call changed: only its shard fails
        assert _failing_shards(sharded) == [meta["tp"] - 1]


@pytest.mark.parametrize("path", [p for p in CORRECT if META[p]["dtype"] == "f32"
                                  and META[p]["variant"] != "fused"], ids=_stem)
def test_one_entry_off_by_one_percent_is_found_at_its_global_index(path):
    """The largest entry of the last rank's columns on the last live token, 1% off."""
    arr, meta = mc.load(path)
    grad = arr["grad"].copy()
    live = tuple(np.argwhere(arr["sample_weight"] > 0)[-1])
    first = meta["C"] - meta["C"] // meta["tp"]
    at = (*live, first + int(np.argmax(np.abs(grad[live][first:]))))
    grad[at] *= 1.01
    sharded = mc.check_merged(arr, meta, grad=grad, loss=False)
    assert _failing_shards(sharded) == [meta["tp"] - 1]
    worst = next(c for c in sharded.report.checks if c.name == "grad_vs_reference").worst
    assert [e.index for e in worst if not e.ok] == [tuple(int(i) for i in at)]


@pytest.mark.parametrize("path", SMOOTH, ids=_stem)
def test_megatron_7464_local_smoothing_fails_on_every_shard(both_kernels, path):
    """megatron-core 0.19.2, label_smoothing 0.1: each rank's gradient is p - (1 - s) 1{label}
    - s/K with K = V/p and s = eps K/(K - 1). With Megatron's global form it fails, every shard
    named; as the local semantics, rank by rank, it passes."""
    arr, meta = mc.load(path)
    sharded = mc.check_merged(arr, meta, loss=False, **FD)
    assert not sharded.report.ok
    assert _failing_shards(sharded) == list(range(meta["tp"]))
    grad = next(c for c in sharded.report.checks if c.name == "grad_vs_reference")
    assert grad.mismatches > grad.total // 2
    assert "grad_vs_reference" in _failed(mc.check_full(arr, meta, loss=False, **FD))
    for r in range(meta["tp"]):
        assert all(rep.ok for rep in mc.check_local(arr, meta, r, **FD)), r


@pytest.mark.parametrize("path", [p for p in CASES if META[p]["dtype"] == "f32"], ids=_stem)
def test_megatron_ranks_one_by_one(path):
    """Each rank alone, `--vocab-offset r V/p --vocab-size V --lse GLOBAL`: a correct rank
    passes, a rank whose call was changed fails, and under #7464 every rank fails."""
    arr, meta = mc.load(path)
    K = meta["C"] // meta["tp"]
    for r in range(meta["tp"]):
        ok = mc.check_one_shard(arr, meta, r, **FD).ok
        assert ok == (meta["variant"] != "smooth"), r
        for bug, grad in mc.planted(arr).items():
            if not np.array_equal(grad[..., r * K:(r + 1) * K], arr[f"grad_r{r}"]):
                assert not mc.check_one_shard(arr, meta, r, grad=grad, **FD).ok, (bug, r)


def test_megatron_7464_losses_differ_by_rank():
    """Without smoothing (and with the global fix) every rank returns the same per-token loss;
    0.19.2's smoothing averages log p over the rank's own columns: the ranks disagree, and at
    std 30, where some probability of every token underflows to 0 in float32, every token's
    loss is -log 0 = inf on every rank (the loss check says so)."""
    for p in CASES:
        arr, meta = mc.load(p)
        losses = [arr[f"loss_r{r}"] for r in range(meta["tp"])]
        same = all(np.array_equal(losses[0], x) for x in losses)
        if meta["variant"] != "smooth":
            assert same and np.isfinite(losses[0]).all(), p
        elif meta["scale"] == 30.0:
            assert np.isposinf(np.array(losses)).all(), p
            assert "NaN/inf" in _failed(mc.check_full(arr, meta, **FD))["loss_vs_reference"]
        else:
            assert not same and np.isfinite(np.array(losses)).all(), p


def test_megatron_target_minus_100():
    """A target -100 is masked on every rank, not ignored: its loss is lse - max and its
    gradient g·softmax (0 here: Megatron's loss mask makes g = 0 there)."""
    for p in CASES:
        arr, meta = mc.load(p)
        if meta["variant"] != "plain":
            continue
        z = arr["logits"].astype(np.float64)
        m = z.max(-1)
        lse = m + np.log(np.exp(z - m[..., None]).sum(-1))
        off = arr["labels"] == -100
        np.testing.assert_allclose(arr["loss_r0"][off], (lse - m)[off], rtol=1e-5)
        assert not np.any(arr["grad"][off])


def test_megatron_fused_gradient_is_bf16():
    """fused_vocab_parallel_cross_entropy casts its gradient to bf16: on float32 logits autograd
    widens it back, so a float32 gradient of bf16 values. ce-check reads the stored format from
    the values and says so: compared as computed in float32 and stored in bf16, it passes."""
    from ce_cli.verify.checks import check_grad
    fused = [p for p in CASES if META[p]["variant"] == "fused" and META[p]["dtype"] == "f32"]
    assert fused
    for p in fused:
        arr, meta = mc.load(p)
        assert arr["grad"].dtype == np.float32 and not np.any(arr["grad"].view(np.uint32) & 0xFFFF)
        report = check_grad(arr["logits"], arr["labels"], grad=arr["grad"],
                            sample_weight=arr["sample_weight"], options=mc.options(meta, **FD))
        assert report.ok, _failed(report)
        grad = next(c for c in report.checks if c.name == "grad_vs_reference")
        assert grad.rule.startswith("f32 stored as bf16")
        assert any("every entry is a bfloat16 value" in w for w in report.warnings)


def _shard_files(tmp_path, arr: dict, meta: dict) -> None:
    np.save(tmp_path / "labels.npy", arr["labels"])
    np.save(tmp_path / "g.npy", arr["sample_weight"])
    for r in range(meta["tp"]):
        np.save(tmp_path / f"logits_{r}.npy", arr[f"logits_r{r}"])
        mc.save_grad(str(tmp_path / f"grad_{r}.npy"), meta, arr[f"grad_r{r}"])


@pytest.mark.parametrize("variant,code", [("smooth", 1), ("smoothfix", 0)])
def test_megatron_smoothing_through_the_cli(invoke, tmp_path, variant, code):
    """`grad --shards vocab --label-smoothing 0.1 --smoothing-form others` on the TP shards:
    0.19.2's gradient fails, every shard's line FAIL; the global fix's passes."""
    path = next(p for p in CASES if META[p]["variant"] == variant and META[p]["dtype"] == "f32")
    arr, meta = mc.load(path)
    _shard_files(tmp_path, arr, meta)
    r = invoke(["grad", str(tmp_path / "logits_*.npy"), tmp_path / "labels.npy", "--grad",
                str(tmp_path / "grad_*.npy"), "--shards", "vocab", "--label-smoothing", "0.1",
                "--smoothing-form", "others", "--reduction", "sum", "--sample-weight",
                tmp_path / "g.npy", "--precision", "f32", "--fd", "off", "--json"])
    assert r.exit_code == code, r.output
    import json
    out = json.loads(r.stdout)
    verdicts = [s["ok"] for s in out["shards"]["per_shard"]]
    assert verdicts == [code == 0] * meta["tp"]
