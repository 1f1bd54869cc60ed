"""`grad --shards vocab` with the training-code options (Megatron tensor-parallel CE): pass 1
merges the lse of z = T(x), each shard's gradient is local given it and the global V, and the
merged report is the single-process report on the concatenated batch (ce_cli/verify/shards/)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ce_cli.errors import CeCheckError
from ce_cli.models.semantics import row_stats
from ce_cli.verify import shards as sh
from ce_cli.verify.checks import check_grad
from ce_cli.verify.options import CheckOptions
from ce_cli.verify.shards.vocab import merge_row_split
from tests.test_shards import EPS, assert_vocab_merged, make_batch
from tests.test_shards_options import (DYADIC, assert_same_check, loss_check, reference_grad,
                                       vocab_files)

CUTS = ((0, 6), (6, 15), (15, 20))  # vocab_files' shards of the 20 classes

OPTIONS = {"z_loss": {"z_loss": 1e-3}, "softcap": {"softcap": 5.0},
           "logit_scale": {"logit_scale": 0.5}, "denominator": {"denominator": 37.0},
           "all": {"z_loss": 1e-4, "softcap": 8.0, "logit_scale": 1.5, "denominator": 150.0}}

SMOOTHING = {"torch": {"label_smoothing": 0.1},
             "others": {"label_smoothing": 0.1, "smoothing_form": "others"},
             "others+all": {"label_smoothing": 0.2, "smoothing_form": "others", "z_loss": 1e-4,
                            "softcap": 8.0, "logit_scale": 1.5},
             "torch+denominator": {"label_smoothing": 0.05, "denominator": 40.0}}


def save_inputs(tmp_path, weight=None, sample_weight=None, **numbers) -> sh.BatchInputs:
    """The class and sample weights as the shards read them (files), with `numbers` (loss,
    z_loss)."""
    arrays: tuple = ()
    if weight is not None:
        np.save(tmp_path / "w.npy", weight)
    if sample_weight is not None:
        np.save(tmp_path / "sw.npy", sample_weight)
        arrays = (("sample_weight", (str(tmp_path / "sw.npy"),)),)
    return sh.BatchInputs(weight=None if weight is None else str(tmp_path / "w.npy"),
                          arrays=arrays, **numbers)


def planted(tmp_path, z, y, opts, at, dtype, files=vocab_files, **kw):
    """The float64 reference (class weights `weight`, `sample_weight` in `kw`) cast to
    `dtype`, 1% wrong at entry `at`: the sharded report is one process's on the batch, the
    entry found at its global index. Returns the sharded report."""
    g = reference_grad(tmp_path, z, y, opts, **kw).astype(dtype)
    g[at] = g[at] * 1.01 if g[at] else 1e-3
    sharded = sh.run_shards(files(tmp_path, z, y, g), "vocab", opts,
                            inputs=save_inputs(tmp_path, **kw))
    single = check_grad(z, y, grad=g, options=opts, **kw)
    assert not single.ok
    assert_vocab_merged(sharded, single)
    grad = next(c for c in sharded.report.checks if c.name == "grad_vs_reference")
    assert [e.index for e in grad.worst if not e.ok] == [at]
    return sharded


def one_process_losses(z, y, opts, **kw) -> np.ndarray:
    """One process's per-sample reference losses (reduction none), read from its loss check
    against zeros with every row listed."""
    probe = check_grad(z, y, loss=np.zeros(y.shape), options=CheckOptions.build(opts, worst=y.size),
                       **kw)
    per = np.zeros(y.shape)
    for e in loss_check(probe).worst:
        per[e.index] = e.expected
    return per


def your_loss(tmp_path, z, y, opts, at, files=vocab_files, **kw):
    """Your loss (reduced: the reference's 1e-6 off; none: one file of the batch's rows, row
    `at` 1e-4 off) on vocabulary shards: the single process's loss check. Returns it."""
    g = reference_grad(tmp_path, z, y, opts, **kw)
    if opts.reduction.value == "none":
        value: object = one_process_losses(z, y, opts, **kw)
        value[at] *= 1.0001  # type: ignore[index]
        np.save(tmp_path / "loss.npy", value)
        inputs = save_inputs(tmp_path, **kw)
        inputs = replace(inputs, arrays=inputs.arrays + (("loss", (str(tmp_path / "loss.npy"),)),))
    else:
        value = check_grad(z, y, options=opts, **kw).loss * (1 + 1e-6)
        inputs = save_inputs(tmp_path, loss=float(value), **kw)  # type: ignore[arg-type]
    single = check_grad(z, y, grad=g, loss=value, options=opts, **kw)
    sharded = sh.run_shards(files(tmp_path, z, y, g), "vocab", opts, inputs=inputs)
    check = assert_same_check("loss_vs_reference", sharded, single)
    if opts.reduction.value == "none":
        assert [e.index for e in check.worst if not e.ok] == [at]
    assert abs(sharded.report.loss - single.loss) <= 64 * EPS * abs(single.loss)
    return check


# ---------------------------------------------------------------- z-loss, softcap, scale, D


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_vocab_shards_carry_the_options(tmp_path, name, reduction, dtype):
    """z-loss, softcap, logit scale, an outside denominator (and all together) on vocabulary
    shards: the single-process report; a bug planted in shard 1 is found at its global index
    and only shard 1 fails."""
    z, y, _ = make_batch(n=60, c=20, seed=4, dtype=np.float64)
    opts = CheckOptions(reduction=reduction, fd="full", **OPTIONS[name])
    sharded = planted(tmp_path, z, y, opts, (17, 9), dtype)
    assert [s.ok for s in sharded.shards] == [True, False, True]
    for key, value in OPTIONS[name].items():
        assert sharded.report.options[key] == value


@pytest.mark.parametrize("name", list(OPTIONS))
def test_vocab_shards_pass_a_correct_gradient(tmp_path, name):
    """A correct float32 gradient of the options passes on vocabulary shards as in one process
    (none of the options is ignored: a gradient of the plain loss fails)."""
    z, y, _ = make_batch(n=60, c=20, seed=6, dtype=np.float64)
    opts = CheckOptions(fd="full", **OPTIONS[name])
    g = reference_grad(tmp_path, z, y, opts).astype(np.float32)
    sharded = sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", opts)
    assert sharded.report.ok and check_grad(z, y, grad=g, options=opts).ok
    plain = reference_grad(tmp_path, z, y, CheckOptions()).astype(np.float32)
    wrong = sh.run_shards(vocab_files(tmp_path, z, y, plain), "vocab", opts)
    assert not wrong.report.ok


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["z_loss", "softcap", "all"])
def test_vocab_shards_check_your_loss_with_the_options(tmp_path, name, reduction):
    """--loss (and --sample-weight) with the options: each row's s_n (lse_n - z_y + zeta
    lse_n^2) of z = T(x) on the client, allowed the single process's floor: the same verdict,
    failing entries and allowances."""
    z, y, _ = make_batch(n=50, c=20, seed=2, dtype=np.float64)
    extra = {k: v for k, v in OPTIONS[name].items() if k != "denominator" or reduction != "none"}
    opts = CheckOptions(reduction=reduction, fd="off", **extra)
    your_loss(tmp_path, z, y, opts, (21,),
              sample_weight=np.random.default_rng(3).choice(DYADIC, 50))


def test_cli_vocab_shards_with_the_options(tmp_path, invoke):
    """Through the command line: `--z-loss --softcap --logit-scale --denominator` on
    `--shards vocab`: exit 1, the planted entry at its global index, shard 1 failing."""
    z, y, _ = make_batch(n=40, c=20, seed=9, dtype=np.float64)
    opts = CheckOptions(fd="off", **OPTIONS["all"])
    g = reference_grad(tmp_path, z, y, opts).astype(np.float32)
    g[3, 11] = g[3, 11] * 1.01 if g[3, 11] else 1e-3
    vocab_files(tmp_path, z, y, g)
    flags = ["--z-loss", "1e-4", "--softcap", "8", "--logit-scale", "1.5", "--denominator", "150"]
    res = invoke(["grad", tmp_path / "v*.npy", tmp_path / "labels.npy", "--grad",
                  tmp_path / "g*.npy", "--shards", "vocab", "--fd", "off", "--json", *flags])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    grad = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")
    assert grad["mismatches"] == 1 and grad["worst"][0]["index"] == [3, 11]
    assert [s["ok"] for s in data["shards"]["per_shard"]] == [True, False, True]
    assert data["loss"] == pytest.approx(check_grad(z, y, options=opts).loss, rel=64 * EPS)
    # a shard's own loss misses -z_y of the rows whose label another shard holds; the merged
    # loss does not, and says nothing of it
    assert data["warnings"] == [] and "another shard" not in res.stderr


def z_losses(z, y, opts: CheckOptions, sw) -> np.ndarray:
    """Per-row s_n zeta lse_n^2 of z = T(x) (0 where ignored), written out."""
    x = np.asarray(z, dtype=np.float64) * opts.logit_scale
    if opts.softcap is not None:
        x = opts.softcap * np.tanh(x / opts.softcap)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[..., None]).sum(axis=-1))
    return np.where(y != -100, sw * opts.z_loss * lse * lse, 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["none", "class+sample"])
@pytest.mark.parametrize("with_lse", [False, True])
def test_vocab_shards_check_your_z_loss(tmp_path, reduction, weights, with_lse):
    """--z-loss-value on vocabulary shards: your z-loss (reduced: a number; none: one file of
    the batch's rows) against s_n zeta lse_n^2 of pass 1's global lse, as one process's
    z-loss check (the same verdict, failing rows, references and allowances; the checks in
    the same order with --lse too); class weights do not weigh it."""
    z, y, _ = make_batch(n=50, c=20, seed=15, dtype=np.float64)
    opts = CheckOptions(reduction=reduction, fd="off", z_loss=1e-3, softcap=9.0)
    kw: dict = {}
    if weights != "none":
        kw = {"weight": np.random.default_rng(1).choice(DYADIC, 20),
              "sample_weight": np.random.default_rng(2).choice(DYADIC, 50)}
    inputs = save_inputs(tmp_path, **kw)
    g = reference_grad(tmp_path, z, y, opts, **kw)
    per = z_losses(z, y, opts, kw.get("sample_weight", 1.0))
    if with_lse:
        kw["lse"] = np.log(np.exp(9.0 * np.tanh(z / 9.0)).sum(-1))
        np.save(tmp_path / "lse.npy", kw["lse"])
        inputs = replace(inputs, arrays=inputs.arrays + (("lse", (str(tmp_path / "lse.npy"),)),))
    if reduction == "none":
        per[17] *= 1.001
        np.save(tmp_path / "zl.npy", per)
        value: object = per
        inputs = replace(inputs, arrays=inputs.arrays + (("z_loss_value",
                                                          (str(tmp_path / "zl.npy"),)),))
    else:
        wy = kw["weight"][np.where(y != -100, y, 0)] if "weight" in kw else 1.0
        D = float(np.sum(np.where(y != -100, kw.get("sample_weight", 1.0) * wy, 0.0)))
        value = float(np.sum(per)) / (D if reduction == "mean" else 1.0) * (1 + 1e-4)
        inputs = replace(inputs, z_loss=value)
    single = check_grad(z, y, grad=g, z_loss_value=value, options=opts, **kw)
    sharded = sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", opts, inputs=inputs)
    check = assert_same_check("z_loss_vs_reference", sharded, single)
    if reduction == "none":
        assert [e.index for e in check.worst if not e.ok] == [(17,)]
    assert sharded.report.ok == single.ok


# ---------------------------------------------------------------- label smoothing


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(SMOOTHING))
def test_vocab_shards_carry_label_smoothing(tmp_path, name, reduction, dtype):
    """Label smoothing on vocabulary shards spreads eps/V (torch) or eps/(V - 1) (others) over
    the GLOBAL vocabulary: the single-process report, a bug planted in shard 2 found at its
    global index."""
    z, y, _ = make_batch(n=60, c=20, seed=5, dtype=np.float64)
    opts = CheckOptions(reduction=reduction, fd="full", **SMOOTHING[name])
    sharded = planted(tmp_path, z, y, opts, (44, 16), dtype)
    assert [s.ok for s in sharded.shards] == [True, True, False]
    assert sharded.report.options["label_smoothing"] == opts.label_smoothing


def megatron_grad(z, y, eps, local_v: bool) -> np.ndarray:
    """Megatron's vocab-parallel backward with label smoothing, written out (mean reduction):
    the softmax of the whole row, minus (1 - s) at the label and s / V_r on each of a rank's
    columns, s = eps V_r / (V_r - 1). Correct: V_r = V, the GLOBAL vocabulary (q = 1 - eps at
    the label, eps / (V - 1) elsewhere: smoothing form 'others'); Megatron#7464's bug: V_r the
    rank's LOCAL vocabulary size."""
    x = np.asarray(z, dtype=np.float64)
    g = np.exp(x - x.max(axis=1, keepdims=True))
    g /= g.sum(axis=1, keepdims=True)
    live = y != -100
    for a, b in CUTS:
        V_r = (b - a) if local_v else x.shape[1]
        s = eps * V_r / (V_r - 1)
        g[:, a:b] -= s / V_r
        mine = live & (y >= a) & (y < b)
        g[np.flatnonzero(mine), y[mine]] -= 1.0 - s
    g[~live] = 0.0
    return g / live.sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_megatron_7464_local_vocabulary_smoothing_fails(tmp_path, dtype):
    """NVIDIA/Megatron-LM#7464: vocab-parallel label smoothing with each rank's LOCAL
    vocabulary size. The correct gradient (global V) passes on vocabulary shards with
    `--smoothing-form others`; the local-V one FAILS, every shard named (each has V_r < V),
    as the single process fails it on the concatenated batch."""
    z, y, _ = make_batch(n=64, c=20, seed=11, dtype=np.float64)
    opts = CheckOptions(fd="full", label_smoothing=0.1, smoothing_form="others")
    right = megatron_grad(z, y, 0.1, local_v=False).astype(dtype)
    ok = sh.run_shards(vocab_files(tmp_path, z, y, right), "vocab", opts)
    assert ok.report.ok and check_grad(z, y, grad=right, options=opts).ok
    wrong = megatron_grad(z, y, 0.1, local_v=True).astype(dtype)
    bad = sh.run_shards(vocab_files(tmp_path, z, y, wrong), "vocab", opts)
    single = check_grad(z, y, grad=wrong, options=opts)
    assert not bad.report.ok and not single.ok
    # every entry is off: the checks' counts are the single process's (the worst entries rank
    # by each shard's own allowance; the normaliser check fits rows shard by shard)
    assert [c.name for c in bad.report.checks] == [c.name for c in single.checks]
    for m, s in zip(bad.report.checks, single.checks):
        assert m.ok == s.ok, m.name
        if m.name != "normaliser":
            assert (m.mismatches, m.total) == (s.mismatches, s.total), m.name
    assert [(s.index, s.ok) for s in bad.shards] == [(0, False), (1, False), (2, False)]
    assert all(s.mismatches > 0 for s in bad.shards)
    assert bad.report.verdict == single.verdict  # FAIL — grad_vs_reference: n/1,280 entries


def test_cli_megatron_7464(tmp_path, invoke):
    """The command line a Megatron user runs on the ranks' files: the local-V smoothing fails
    (exit 1, every shard's line FAIL), the global-V one passes (exit 0)."""
    z, y, _ = make_batch(n=64, c=20, seed=11, dtype=np.float64)
    args = ["grad", tmp_path / "v*.npy", tmp_path / "labels.npy", "--grad", tmp_path / "g*.npy",
            "--shards", "vocab", "--label-smoothing", "0.1", "--smoothing-form", "others"]
    vocab_files(tmp_path, z, y, megatron_grad(z, y, 0.1, local_v=False).astype(np.float32))
    res = invoke(args)
    assert res.exit_code == 0, res.output
    vocab_files(tmp_path, z, y, megatron_grad(z, y, 0.1, local_v=True).astype(np.float32))
    res = invoke(args + ["--json"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    assert [s["ok"] for s in data["shards"]["per_shard"]] == [False, False, False]
    assert data["options"]["label_smoothing"] == 0.1
    assert data["options"]["smoothing_form"] == "others"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["torch", "others"])
def test_vocab_loss_with_label_smoothing(tmp_path, form, reduction):
    """--loss with label smoothing on vocabulary shards: each row's alpha (lse - z_y) + beta
    sum_c (lse - z_c), the sum's terms from every shard: the single process's loss check."""
    z, y, _ = make_batch(n=50, c=20, seed=7, dtype=np.float64)
    opts = CheckOptions(reduction=reduction, fd="off", label_smoothing=0.1, smoothing_form=form)
    your_loss(tmp_path, z, y, opts, (33,))


# ---------------------------------------------------------------- class weights


WEIGHTED = {"z_loss": {"z_loss": 1e-3}, "torch": SMOOTHING["torch"],
            "others": SMOOTHING["others"], "others+all": SMOOTHING["others+all"]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(WEIGHTED))
def test_vocab_shards_class_weights_with_the_options(tmp_path, name, reduction, dtype):
    """--weight with label smoothing or the z-loss on vocabulary shards: each shard holds the
    weights of its columns (beta w_c), each row's label weight w_y (its column maybe in
    another shard) and the other shards' summed weights (Q = alpha w_y + beta sum_c w_c); the
    z-loss is not weighted by w_y, as in one process: the single-process report, a planted
    bug in shard 1 found at its global index, a correct gradient passing."""
    z, y, _ = make_batch(n=60, c=20, seed=13, dtype=np.float64)
    w = np.random.default_rng(5).choice(DYADIC, 20)
    opts = CheckOptions(reduction=reduction, fd="full", **WEIGHTED[name])
    # not a row's arg-max: a shard fits a row's normaliser factor from the entries the softmax
    # term dominates among ITS columns, and a wrong arg-max alone there reads as a row factor
    # (the merged report then adds a failing normaliser check one process does not)
    sharded = planted(tmp_path, z, y, opts, (21, 10), dtype, weight=w)
    assert [s.ok for s in sharded.shards] == [True, False, True]
    assert sharded.report.options["weighted"]
    right = reference_grad(tmp_path, z, y, opts, weight=w).astype(dtype)
    assert sh.run_shards(vocab_files(tmp_path, z, y, right), "vocab", opts,
                         inputs=save_inputs(tmp_path, weight=w)).report.ok


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["z_loss", "others+all"])
def test_vocab_loss_with_class_weights_and_the_options(tmp_path, name, reduction):
    """--loss with --weight and --sample-weight and the options on vocabulary shards: the row
    loss s_n (alpha w_y (lse - z_y) + beta sum_c w_c (lse - z_c) + zeta lse^2) on the client,
    the single process's loss check."""
    z, y, _ = make_batch(n=50, c=20, seed=14, dtype=np.float64)
    opts = CheckOptions(reduction=reduction, fd="off", **WEIGHTED[name])
    your_loss(tmp_path, z, y, opts, (12,), weight=np.random.default_rng(6).choice(DYADIC, 20),
              sample_weight=np.random.default_rng(7).choice(DYADIC, 50))


# ---------------------------------------------------------------- the library: one shard


@pytest.mark.parametrize("form", ["torch", "others"])
def test_check_grad_shard_with_vocab_size(tmp_path, form):
    """The library: one shard, `vocab_offset` K, the global `lse` and `vocab_size` V (and the
    V class weights): its reference gradient is the whole batch's columns [K, K + C) with
    smoothing over V."""
    z, y, _ = make_batch(n=30, c=20, seed=3, dtype=np.float64)
    w = np.random.default_rng(8).choice(DYADIC, 20)
    opts = CheckOptions(label_smoothing=0.1, smoothing_form=form, z_loss=1e-3, fd="full")
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    part = reference_grad(tmp_path, z, y, opts, weight=w)[:, 6:15]
    shard = {"options": opts, "vocab_offset": 6, "vocab_size": 20, "lse": lse, "weight": w}
    assert check_grad(z[:, 6:15], y, grad=part, **shard).ok
    part[4, 2] += 1e-6
    grad = next(c for c in check_grad(z[:, 6:15], y, grad=part, **shard).checks
                if c.name == "grad_vs_reference")
    assert [e.index for e in grad.worst if not e.ok] == [(4, 2)]


@pytest.mark.parametrize("extra", [{}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}])
def test_split_lse_keeps_the_reference_to_a_few_ulps(tmp_path, extra):
    """Pass 1's lse kept apart (`SplitLse`, m + log1p(s1)): each shard's reference gradient is
    the whole batch's within 8 eps of the row's largest entry, also for confident rows whose
    lse (~55 here) is large next to lse - m (~1e-2); one float64 lse given instead errs by
    about eps |lse| / (lse - m) there (the test tells the two apart)."""
    rng = np.random.default_rng(17)
    z = rng.normal(size=(200, 20)) * 3 + 50
    y = rng.integers(0, 20, 200)
    z[np.arange(200), y] += 8.0  # confident rows
    opts = CheckOptions(fd="off", **extra)
    whole = reference_grad(tmp_path, z, y, opts)
    split = merge_row_split([row_stats(z[:, a:b]) for a, b in CUTS])
    errs = {}
    for name, lse in (("split", split), ("float", split.lse)):
        worst = 0.0
        for a, b in CUTS:
            check_grad(z[:, a:b], y, options=opts, vocab_offset=a, vocab_size=20, lse=lse,
                       out_grad=tmp_path / "part.npy")
            dev = np.abs(np.load(tmp_path / "part.npy") - whole[:, a:b])
            worst = max(worst, float((dev.max(axis=1) / np.abs(whole).max(axis=1)).max()))
        errs[name] = worst / EPS
    assert errs["split"] <= 8 and errs["float"] > 8, errs


def test_vocab_size_is_refused_where_it_means_nothing():
    """`vocab_size` without `vocab_offset`, smaller than the shard's columns, and smoothing or
    class weights on one shard without it: one line each."""
    z, y, _ = make_batch(n=10, c=8, seed=1, dtype=np.float64)
    lse = np.log(np.exp(z).sum(1))
    with pytest.raises(CeCheckError, match="`vocab_size`: the size of a shard's whole"):
        check_grad(z, y, vocab_size=8)
    with pytest.raises(CeCheckError, match=r"`vocab_size`: 9 is smaller than the shard's "
                                           r"columns \[2, 10\)"):
        check_grad(z, np.where(y < 0, y, y + 2), vocab_offset=2, vocab_size=9, lse=lse + 1)
    with pytest.raises(CeCheckError, match="label smoothing spreads over the whole vocabulary: "
                                           "give its `vocab_size`"):
        check_grad(z, y, vocab_offset=0, lse=lse + 1, label_smoothing=0.1)
    with pytest.raises(CeCheckError, match="class weights are the whole vocabulary's: give its "
                                           "`vocab_size`"):
        check_grad(z, y, vocab_offset=0, lse=lse + 1, weight=np.ones(8))


# ---------------------------------------------------------------- shift_labels


def seq_files(tmp_path, z, y, g, cuts=CUTS):
    """(B, T, V) vocabulary shards ([..., a:b]) and the one (B, T) labels file."""
    np.save(tmp_path / "labels.npy", y)
    files = []
    for i, (a, b) in enumerate(cuts):
        np.save(tmp_path / f"s{i}.npy", z[..., a:b])
        np.save(tmp_path / f"sg{i}.npy", g[..., a:b])
        files.append(sh.ShardFiles(str(tmp_path / f"s{i}.npy"), str(tmp_path / "labels.npy"),
                                   str(tmp_path / f"sg{i}.npy")))
    return files


def seq_batch(seed=8):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(5, 7, 20)) * 2
    y = rng.integers(0, 20, (5, 7))
    y[2, 3] = -100
    return z, y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("extra", [{}, {"z_loss": 1e-3, "label_smoothing": 0.1,
                                        "smoothing_form": "others"}])
def test_vocab_shards_shift_labels(tmp_path, extra, reduction, dtype):
    """`shift_labels` on (B, T, V) vocabulary shards: every shard holds every position, so
    shifting the one labels file is the batch's shift ('mean' divides by the shifted count):
    the single-process report, a bug in shard 1 at its global (b, t, v); the unshifted
    gradient fails."""
    z, y = seq_batch()
    opts = CheckOptions(reduction=reduction, shift_labels=True, fd="full", **extra)
    sharded = planted(tmp_path, z, y, opts, (1, 2, 10), dtype, files=seq_files)
    assert [s.ok for s in sharded.shards] == [True, False, True]
    assert sharded.report.options["shift_labels"]
    unshifted = reference_grad(tmp_path, z, y, CheckOptions.build(opts, shift_labels=False))
    assert not sh.run_shards(seq_files(tmp_path, z, y, unshifted.astype(dtype)), "vocab",
                             opts).report.ok


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_shift_labels_with_weights_and_your_loss(tmp_path, reduction):
    """The shifted labels reach everything that reads them: class weights w_y, the loss counted
    once per row, your loss (z_y from the shard holding the SHIFTED label): the single
    process's loss check."""
    z, y = seq_batch(seed=12)
    opts = CheckOptions(reduction=reduction, shift_labels=True, fd="off")
    your_loss(tmp_path, z, y, opts, (3, 1), files=seq_files,
              weight=np.random.default_rng(2).choice(DYADIC, 20))


def test_cli_vocab_shift_labels(tmp_path, invoke):
    """`grad --shards vocab --shift-labels` with (B, T, V) shards: the planted entry at its
    global index, exit 1."""
    z, y = seq_batch(seed=4)
    opts = CheckOptions(shift_labels=True, label_smoothing=0.1, fd="off")
    g = reference_grad(tmp_path, z, y, opts).astype(np.float32)
    g[4, 0, 17] += 1e-3
    seq_files(tmp_path, z, y, g)
    res = invoke(["grad", tmp_path / "s?.npy", tmp_path / "labels.npy", "--grad",
                  tmp_path / "sg*.npy", "--shards", "vocab", "--fd", "off", "--json",
                  "--shift-labels", "--label-smoothing", "0.1"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    grad = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")
    assert grad["mismatches"] == 1 and grad["worst"][0]["index"] == [4, 0, 17]
    assert [s["ok"] for s in data["shards"]["per_shard"]] == [True, True, False]


def test_vocab_options_on_dask(tmp_path):
    """On a 2-worker LocalCluster (pass 1 with the softcap's partial, pass 2, your loss and
    z-loss on shard 0's task): the in-process report, field by field, with every option at
    once. (Without dask installed this skips; tests/test_dask.py fails under CI instead.)"""
    distributed = pytest.importorskip("distributed")
    from ce_cli.distributed.dask_run import run_on_dask

    z, y = seq_batch(seed=21)
    kw = {"weight": np.random.default_rng(3).choice(DYADIC, 20),
          "sample_weight": np.random.default_rng(4).choice(DYADIC, (5, 7))}
    opts = CheckOptions(fd="directional", shift_labels=True, label_smoothing=0.1,
                        smoothing_form="others", z_loss=1e-3, softcap=8.0, logit_scale=1.5)
    g = reference_grad(tmp_path, z, y, opts, **kw).astype(np.float32)
    g[2, 5, 11] += 1e-3
    files = seq_files(tmp_path, z, y, g)
    inputs = save_inputs(tmp_path, loss=1.0, z_loss=0.01, **kw)
    local = sh.run_shards(files, "vocab", opts, inputs=inputs)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        on_dask = run_on_dask(files, "vocab", opts, client=client, inputs=inputs)
    assert on_dask == local
    grad = next(c for c in local.report.checks if c.name == "grad_vs_reference")
    assert [e.index for e in grad.worst if not e.ok] == [(2, 5, 11)]
    names = [c.name for c in local.report.checks]
    assert "loss_vs_reference" in names and "z_loss_vs_reference" in names


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("extra", [{}, {"z_loss": 1e-3}], ids=["plain", "z_loss"])
def test_vocab_shards_hold_a_16bit_loss_to_the_single_process_rule(tmp_path, reduction, extra):
    """A bf16 loss on vocabulary shards is held to one process's rule for a loss computed in
    16 bits (tolerance.per_sample_16: |loss_n| + Q_n log C besides the floor, at k/4 eps), not
    to k eps of the float32 analysis: the same verdict, failing entries and allowances."""
    z, y, _ = make_batch(n=50, c=20, seed=2, dtype=np.float64)
    opts = CheckOptions(reduction=reduction, fd="off", precision="bf16", **extra)
    g = reference_grad(tmp_path, z, y, opts)
    inputs = save_inputs(tmp_path)
    if reduction == "none":
        value: object = one_process_losses(z, y, opts)
        value[21] *= 1.2  # type: ignore[index]
        np.save(tmp_path / "loss.npy", value)
        inputs = replace(inputs, arrays=inputs.arrays + (("loss", (str(tmp_path / "loss.npy"),)),))
    else:
        value = check_grad(z, y, options=opts).loss * 1.2
        inputs = save_inputs(tmp_path, loss=float(value))  # type: ignore[arg-type]
    single = check_grad(z, y, grad=g, loss=value, options=opts)
    assert "floor 1eps" in loss_check(single).rule  # k/4 of bf16's eps
    sharded = sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", opts, inputs=inputs)
    assert_same_check("loss_vs_reference", sharded, single)
