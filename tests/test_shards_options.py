"""`--shards` with what the single-process check takes beside the logits: class weights, your
loss, the batch-shaped inputs (sample weights, lse, z-loss): the merged report is the report on
the concatenated batch (ce_cli/verify/shards/)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ce_cli.errors import CeCheckError
from ce_cli.verify import shards as sh
from ce_cli.verify.checks import check_binary, check_grad
from ce_cli.verify.options import CheckOptions
from tests.test_shards import EPS, assert_same_report, make_batch, write_rows
from tests.test_shards_binary import assert_identical, bce_batch, write

DYADIC = np.array([0.5, 1.0, 1.5, 2.0, 0.25, 3.0])  # sums of these are exact: D equals the batch's


def class_weights(c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(DYADIC, c)


def reference_grad(tmp_path, z, y, opts: CheckOptions, **kw) -> np.ndarray:
    """The single-process float64 reference gradient (its --out-grad file)."""
    check_grad(z, y, options=opts, out_grad=tmp_path / "ref.npy", **kw)
    return np.load(tmp_path / "ref.npy")


def assert_merged(sharded, single, n_shards, exact=True):
    """The single-process report: field by field when `exact`, else verdict, counts and failing
    entries (global index, your value) with references within a few ulps."""
    if exact:
        assert_same_report(sharded.report, single, n_shards)
    else:
        merged = sharded.report
        assert (merged.ok, [c.name for c in merged.checks]) == \
            (single.ok, [c.name for c in single.checks])
        for m, s in zip(merged.checks, single.checks):
            assert (m.ok, m.mismatches, m.total) == (s.ok, s.mismatches, s.total), m.name
            bad = sorted((e.index, e.got, e.expected) for e in m.worst if not e.ok)
            want = sorted((e.index, e.got, e.expected) for e in s.worst if not e.ok)
            assert [b[:2] for b in bad] == [w[:2] for w in want], m.name
            assert np.allclose([b[2] for b in bad], [w[2] for w in want], rtol=1e-6, atol=0)
        assert abs(merged.loss - single.loss) <= 16 * EPS * abs(single.loss)
    if sharded.axis == "rows":  # vocabulary shards echo their kernel and offset
        assert sharded.report.options == single.options


# ---------------------------------------------------------------- class weights


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_shards_take_class_weights(tmp_path, dtype, reduction):
    """--weight on row shards: every shard reads the C weights, pass 1 sums w_y over the batch
    ('mean''s D); a bug in shard 1 is found at its global index."""
    z, y, _ = make_batch(n=120, c=11, seed=3)
    w = class_weights(11)
    np.save(tmp_path / "w.npy", w)
    opts = CheckOptions(reduction=reduction, fd="full")
    g = reference_grad(tmp_path, z, y, opts, weight=w).astype(dtype)
    g[77, 4] *= 1.001
    files = write_rows(tmp_path, z, y, g, [0, 50, 120])
    sharded = sh.run_shards(files, "rows", opts, inputs=sh.BatchInputs(weight=str(tmp_path / "w.npy")))
    single = check_grad(z, y, grad=g, weight=w, options=opts)
    assert not single.ok and single.options["weighted"]
    assert_merged(sharded, single, 2)
    grad = next(c for c in sharded.report.checks if c.name == "grad_vs_reference")
    assert [e.index for e in grad.worst if not e.ok] == [(77, 4)]
    assert [s.ok for s in sharded.shards] == [True, False]


def test_row_shards_weighted_mean_with_any_weights(tmp_path):
    """Weights whose sums round: D is the shards' exactly rounded sums added (fsum), within an
    ulp of the single process's: the same verdict and failing entries."""
    z, y, _ = make_batch(n=200, c=9, seed=5)
    w = np.random.default_rng(1).uniform(0.1, 3.0, 9)
    np.save(tmp_path / "w.npy", w)
    opts = CheckOptions(fd="full")
    g = reference_grad(tmp_path, z, y, opts, weight=w).astype(np.float32)
    g[150, 2] += 1e-3
    files = write_rows(tmp_path, z, y, g, [0, 70, 130, 200], shared_labels=True)
    sharded = sh.run_shards(files, "rows", opts, inputs=sh.BatchInputs(weight=str(tmp_path / "w.npy")))
    assert_merged(sharded, check_grad(z, y, grad=g, weight=w, options=opts), 3, exact=False)


def vocab_files(tmp_path, z, y, g, cuts=((0, 6), (6, 15), (15, 20))):
    np.save(tmp_path / "labels.npy", y)
    files = []
    for i, (a, b) in enumerate(cuts):
        np.save(tmp_path / f"v{i}.npy", z[:, a:b])
        np.save(tmp_path / f"g{i}.npy", g[:, a:b])
        files.append(sh.ShardFiles(str(tmp_path / f"v{i}.npy"), str(tmp_path / "labels.npy"),
                                   str(tmp_path / f"g{i}.npy")))
    return files


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vocab_shards_take_class_weights(tmp_path, reduction):
    """--weight on vocabulary shards: a row's weight w_y scales its loss and gradient (index
    targets, no smoothing), each shard all rows: verdict, counts and failing entries (global
    indices) of the single process; the loss counts each row's w_y lse once."""
    z, y, _ = make_batch(n=50, c=20, dtype=np.float64)
    w = class_weights(20, seed=2)
    np.save(tmp_path / "w.npy", w)
    opts = CheckOptions(reduction=reduction, fd="full")
    g = reference_grad(tmp_path, z, y, opts, weight=w)
    g[7, 12] = g[7, 12] * 1.01 if g[7, 12] else 1e-3
    sharded = sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", opts,
                            inputs=sh.BatchInputs(weight=str(tmp_path / "w.npy")))
    single = check_grad(z, y, grad=g, weight=w, options=opts)
    assert not single.ok
    assert_merged(sharded, single, 3, exact=False)
    grad = next(c for c in sharded.report.checks if c.name == "grad_vs_reference")
    assert [e.index for e in grad.worst if not e.ok] == [(7, 12)]
    assert sharded.report.options["weighted"] and "sample_weighted" not in sharded.report.options


def test_vocab_weights_must_cover_the_labels(tmp_path):
    """C weights for the shards' C classes; a label past them (past the vocabulary: with or
    without weights) is one line naming it."""
    z, y, g = make_batch(n=50, c=20, dtype=np.float64)
    np.save(tmp_path / "w12.npy", np.ones(12))
    with pytest.raises(CeCheckError, match=r"shape \(12,\) but the logits have 20 classes"):
        sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", CheckOptions(fd="off"),
                      inputs=sh.BatchInputs(weight=str(tmp_path / "w12.npy")))
    y[3] = 25
    np.save(tmp_path / "w.npy", np.ones(20))
    for weight in (str(tmp_path / "w.npy"), None):
        with pytest.raises(CeCheckError, match=r"label 25 at index \(3,\) is out of range "
                                               r"\[0, 20\)"):
            sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", CheckOptions(fd="off"),
                          inputs=sh.BatchInputs(weight=weight))


def test_cli_grad_shards_with_weight(tmp_path, invoke):
    """Through the command line: exit 1, the planted entry at its global index, the shards'
    table; a weight of the wrong length is one line, exit 2."""
    z, y, _ = make_batch(n=90, c=7, seed=4)
    w = class_weights(7, seed=4)
    np.save(tmp_path / "w.npy", w)
    g = reference_grad(tmp_path, z, y, CheckOptions(), weight=w).astype(np.float32)
    g[61, 3] += 1e-2
    write_rows(tmp_path, z, y, g, [0, 30, 90])
    args = ["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--grad",
            tmp_path / "grad_*.npy", "--shards", "rows", "--json"]
    res = invoke(args + ["--weight", tmp_path / "w.npy"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    grad = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")
    assert grad["mismatches"] == 1 and grad["worst"][0]["index"] == [61, 3]
    assert data["options"]["weighted"] is True
    assert [s["ok"] for s in data["shards"]["per_shard"]] == [True, False]
    np.save(tmp_path / "w5.npy", np.ones(5))
    bad = invoke(args + ["--weight", tmp_path / "w5.npy"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
    assert "shape (5,) but the logits have 7 classes" in bad.stderr


BINARY_WEIGHTS = {  # the weight's shape, for (60, 8) logits
    "columns": (8,), "one": (), "rows": (60, 1), "batch": (60, 8), "broadcast row": (1, 8)}


@pytest.mark.parametrize("axis, cuts", [("rows", [0, 25, 60]), ("cols", [0, 3, 8])])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", list(BINARY_WEIGHTS))
def test_binary_shards_take_element_weights(tmp_path, axis, cuts, reduction, kind):
    """binary --weight, broadcast to the logits: each shard takes its rows or columns of it
    where it spans the split axis; every check field equals the single process's."""
    z, y, _ = bce_batch((60, 8), seed=6, reduction=reduction)
    w = np.random.default_rng(7).choice(DYADIC, BINARY_WEIGHTS[kind])
    np.save(tmp_path / "w.npy", w)
    opts = CheckOptions(reduction=reduction, fd="full")
    check_binary(z, y, weight=w, options=opts, out_grad=tmp_path / "ref.npy")
    g = np.load(tmp_path / "ref.npy").astype(np.float32)
    g[40, 5] += 1e-2
    sharded = sh.run_shards(write(tmp_path, z, y, g, cuts, axis), axis, opts, kind="binary",
                            inputs=sh.BatchInputs(weight=str(tmp_path / "w.npy")))
    single = check_binary(z, y, grad=g, weight=w, options=opts)
    assert not single.ok and single.options["weighted"]
    assert_identical(sharded.report, single, 2)
    assert sharded.report.options == single.options


def test_binary_weight_that_does_not_fit_is_one_line(tmp_path, invoke):
    z, y, g = bce_batch((60, 8))
    write(tmp_path, z, y, g, [0, 25, 60], "rows")
    np.save(tmp_path / "w.npy", np.ones((30, 8)))
    res = invoke(["binary", tmp_path / "z_*.npy", tmp_path / "y_*.npy", "--grad",
                  tmp_path / "g_*.npy", "--shards", "rows", "--weight", tmp_path / "w.npy"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert "weight file" in res.stderr and "shape (30, 8)" in res.stderr


# ---------------------------------------------------------------- your loss


def loss_check(report):
    return next(c for c in report.checks if c.name == "loss_vs_reference")


def assert_same_check(name, sharded, single, rel=1e-12):
    """The merged check `name` is one process's, which fails: the checks' order, verdict,
    counts, note, failing entries (passing ones rank by rounding noise), and every entry both
    list: your value, its reference within `rel` and allowance within 1e-9. Returns it."""
    assert [c.name for c in sharded.report.checks] == [c.name for c in single.checks]
    m = next(c for c in sharded.report.checks if c.name == name)
    s = next(c for c in single.checks if c.name == name)
    assert not s.ok
    assert (m.ok, m.mismatches, m.total, m.note) == (s.ok, s.mismatches, s.total, s.note)
    assert [e.index for e in m.worst if not e.ok] == [e.index for e in s.worst if not e.ok]
    theirs = {e.index: e for e in s.worst}
    for a in m.worst:
        if a.index in theirs:
            b = theirs[a.index]
            assert (a.got, a.ok) == (b.got, b.ok)
            assert a.expected == pytest.approx(b.expected, rel=rel, abs=1e-15)
            assert a.allowed == pytest.approx(b.allowed, rel=1e-9)
    return m


def assert_same_loss_check(merged, single):
    """The merged loss check is the single process's: verdict, note, reference and allowance
    within the fsum merge's bound."""
    m, s = loss_check(merged), loss_check(single)
    assert (m.ok, m.mismatches, m.total, m.note, m.rule) == (s.ok, s.mismatches, s.total, s.note, s.rule)
    for a, b in zip(m.worst, s.worst):
        assert (a.index, a.got, a.ok) == (b.index, b.got, b.ok)
        assert a.expected == pytest.approx(b.expected, rel=8 * EPS, abs=1e-300)
        assert a.allowed == pytest.approx(b.allowed, rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shift, ok", [(0.0, True), (1e-3, False)])
def test_row_shards_check_the_reduced_loss(tmp_path, reduction, shift, ok):
    """--loss NUMBER on row shards: compared once with the merged reference loss, allowed the
    single process's floor (the rows' floors summed over the shards); a wrong loss is caught."""
    z, y, g = make_batch(n=120, c=11, seed=3, reduction=reduction)
    w = class_weights(11)
    np.save(tmp_path / "w.npy", w)
    opts = CheckOptions(reduction=reduction, fd="off")
    value = np.float32(check_grad(z, y, weight=w, options=opts).loss * (1 + shift))
    single = check_grad(z, y, grad=g, weight=w, loss=value, options=opts)
    inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy"), loss=float(value), loss_dtype="float32")
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 50, 120]), "rows", opts, inputs=inputs)
    assert loss_check(single).ok is ok
    assert_same_loss_check(sharded.report, single)
    assert sharded.report.ok == single.ok and [c.name for c in sharded.report.checks] == \
        [c.name for c in single.checks]
    assert sharded.report.verdict == single.verdict


def test_reduced_loss_passes_with_the_normaliser_allowance_as_in_one_process(tmp_path):
    """A float32 loss off by more than the plain floor but within the normaliser bound (3000
    classes): the merged check passes with the single process's note."""
    z, y, g = make_batch(n=60, c=3000, seed=3)
    opts = CheckOptions(fd="off")
    value = np.float32(check_grad(z, y, options=opts).loss + 9e-5)
    single = check_grad(z, y, grad=g, loss=value, options=opts)
    assert loss_check(single).ok and "normaliser allowance" in loss_check(single).note
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 25, 60]), "rows", opts,
                            inputs=sh.BatchInputs(loss=float(value), loss_dtype="float32"))
    assert_same_loss_check(sharded.report, single)


@pytest.mark.parametrize("bug", [True, False], ids=["open_lm", "right"])
def test_reduced_loss_is_held_to_the_gradients_row_factors_as_in_one_process(tmp_path, bug):
    """open_lm's z-loss, zeta (mean lse)^2 for zeta mean(lse^2), in the loss and its autodiff
    gradient (row factors 2 zeta (mean lse - lse_n)): the loss is within the normaliser bound
    but does not carry the factors. The merged check fails it as one process does, with the
    same note; the right pair passes both ways."""
    zeta, rng = 1e-4, np.random.default_rng(2)
    n, c = 24, 1000
    z = rng.standard_normal((n, c)) * rng.uniform(0.5, 6.0, (n, 1))
    y = rng.integers(0, c, n)
    m = z.max(axis=1, keepdims=True)
    s = np.exp(z - m).sum(axis=1, keepdims=True)
    a, lse = np.exp(z - m) / s, (m + np.log(s))[:, 0]
    zl = zeta * (lse.mean() ** 2 if bug else np.mean(lse ** 2))
    g = (1.0 + 2.0 * zeta * (np.full((n, 1), lse.mean()) if bug else lse[:, None])) * a
    g[np.arange(n), y] -= 1.0
    g = (g / n).astype(np.float32)
    value = np.float32((lse - z[np.arange(n), y]).mean() + zl)
    opts = CheckOptions(fd="off", z_loss=zeta, normaliser_rtol=5e-3)
    single = check_grad(z, y, grad=g, loss=value, options=opts)
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 10, 24]), "rows", opts,
                            inputs=sh.BatchInputs(loss=float(value), loss_dtype="float32"))
    assert single.ok is sharded.report.ok is not bug
    assert sharded.report.verdict == single.verdict
    assert [c.name for c in sharded.report.checks] == [c.name for c in single.checks]
    if bug:  # the right gradient's rows need no factor
        merged, one = (next(c for c in r.checks if c.name == "normaliser")
                       for r in (sharded.report, single))
        assert (merged.ok, merged.mismatches, merged.total) == (False, one.mismatches, one.total)
        assert "your loss does not carry it" in merged.note
        assert merged.note.split("your loss")[-1] == one.note.split("your loss")[-1]


@pytest.mark.parametrize("per_shard", [False, True])
def test_row_shards_check_per_sample_losses(tmp_path, per_shard):
    """reduction none: one file of the batch's losses, each shard its rows, or a glob of one
    file per shard; a wrong loss is found at its global index."""
    z, y, g = make_batch(n=120, c=11, seed=3, reduction="none")
    opts = CheckOptions(reduction="none", fd="off")
    per = ce_losses(z, y).astype(np.float32)
    per[83] *= 1.01
    files = write_rows(tmp_path, z, y, g, [0, 50, 120])
    if per_shard:
        np.save(tmp_path / "loss_0.npy", per[:50])
        np.save(tmp_path / "loss_1.npy", per[50:])
        paths = (str(tmp_path / "loss_0.npy"), str(tmp_path / "loss_1.npy"))
    else:
        np.save(tmp_path / "loss.npy", per)
        paths = (str(tmp_path / "loss.npy"),)
    sharded = sh.run_shards(files, "rows", opts, inputs=sh.BatchInputs(arrays=(("loss", paths),)))
    single = check_grad(z, y, grad=g, loss=per, options=opts)
    assert not single.ok
    assert_same_report(sharded.report, single, 2)
    assert [e.index for e in loss_check(sharded.report).worst if not e.ok] == [(83,)]


@pytest.mark.parametrize("axis, cuts", [("rows", [0, 25, 60]), ("cols", [0, 3, 8])])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_shards_check_your_loss(tmp_path, axis, cuts, reduction):
    """binary --loss: reduced (compared once, merged) or per element (one file, each shard its
    rows or columns); a wrong value caught as in one process."""
    z, y, g = bce_batch((60, 8), seed=6, reduction=reduction)
    w = np.random.default_rng(7).choice(DYADIC, 8)
    np.save(tmp_path / "w.npy", w)
    opts = CheckOptions(reduction=reduction, fd="off")
    per = bce_losses(z, y, w)
    if reduction == "none":
        per[41, 6] *= 1.01
        np.save(tmp_path / "loss.npy", per)
        inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy"),
                                arrays=(("loss", (str(tmp_path / "loss.npy"),)),))
        value = per
    else:
        value = float(per.sum() / (per.size if reduction == "mean" else 1)) * (1 + 1e-4)
        inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy"), loss=value)
    single = check_binary(z, y, grad=g, weight=w, loss=value, options=opts)
    sharded = sh.run_shards(write(tmp_path, z, y, g, cuts, axis), axis, opts, kind="binary",
                            inputs=inputs)
    assert not loss_check(single).ok
    if reduction == "none":
        assert_identical(sharded.report, single, 2)
        assert [e.index for e in loss_check(sharded.report).worst if not e.ok] == [(41, 6)]
    else:
        assert_same_loss_check(sharded.report, single)
        assert sharded.report.verdict == single.verdict


def ce_losses(z, y):
    """Per-row softmax CE, lse - z_y in float64 (0 where ignored)."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    live = y != -100
    return np.where(live, lse - z[np.arange(len(y)), np.where(live, y, 0)], 0.0)


def bce_losses(z, y, w):
    """PyTorch's per-element BCEWithLogits loss, in float64."""
    z = np.asarray(z, dtype=np.float64)
    return w * (np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))


def test_cli_loss_with_shards(tmp_path, invoke):
    """--loss NUMBER and --loss FILE through the command line: a right loss passes, a wrong one
    fails the merged check (exit 1), on row and on vocabulary shards."""
    z, y, g = make_batch(n=90, c=7, seed=4)
    write_rows(tmp_path, z, y, g, [0, 30, 90])
    args = ["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--grad",
            tmp_path / "grad_*.npy", "--shards", "rows", "--json"]
    loss = check_grad(z, y).loss
    good = invoke(args + ["--loss", repr(loss)])
    assert good.exit_code == 0, good.output
    assert loss_check_json(good)["ok"] and json.loads(good.stdout)["loss"] == pytest.approx(loss)
    np.save(tmp_path / "loss.npy", np.float32(loss * 1.001))
    bad = invoke(args + ["--loss", tmp_path / "loss.npy"])
    assert bad.exit_code == 1, bad.output
    check = loss_check_json(bad)
    assert not check["ok"] and check["worst"][0]["got"] == pytest.approx(loss * 1.001, rel=1e-6)
    assert "loss_vs_reference" in json.loads(bad.stdout)["verdict"]
    np.save(tmp_path / "labels.npy", y[:30])
    for i, (a, b) in enumerate([(0, 3), (3, 7)]):
        np.save(tmp_path / f"v{i}.npy", z[:30, a:b])
    vocab = invoke(["grad", tmp_path / "v*.npy", tmp_path / "labels.npy", "--shards", "vocab",
                    "--loss", "2.0", "--json"])
    assert vocab.exit_code == 1, vocab.output
    check = loss_check_json(vocab)
    assert not check["ok"] and check["worst"][0]["expected"] == pytest.approx(
        check_grad(z[:30], y[:30]).loss, rel=1e-13)


def loss_check_json(res):
    return next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "loss_vs_reference")


def test_cli_per_sample_loss_glob(tmp_path, invoke):
    """--reduction none --loss 'loss_*.npy': one file per shard, like --grad; the wrong row at
    its global index."""
    z, y, g = make_batch(n=90, c=7, seed=4, reduction="none")
    write_rows(tmp_path, z, y, g, [0, 30, 90])
    per = ce_losses(z, y)
    per[44] += 1e-3
    np.save(tmp_path / "loss_0.npy", per[:30])
    np.save(tmp_path / "loss_1.npy", per[30:])
    res = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--grad",
                  tmp_path / "grad_*.npy", "--shards", "rows", "--reduction", "none", "--loss",
                  tmp_path / "loss_*.npy", "--json"])
    assert res.exit_code == 1, res.output
    check = loss_check_json(res)
    assert check["mismatches"] == 1 and check["worst"][0]["index"] == [44]
    np.save(tmp_path / "loss_2.npy", per[:3])
    three = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--shards",
                    "rows", "--reduction", "none", "--loss", tmp_path / "loss_*.npy"])
    assert three.exit_code == 2 and "--loss: 3 files for 2 logits shards" in three.stderr


# ---------------------------------------------------------------- the batch-shaped inputs


def save_rows(tmp_path, name, arr, cuts, per_shard):
    """One file of the batch, or one per shard (cut at `cuts`): the paths."""
    if not per_shard:
        np.save(tmp_path / f"{name}.npy", arr)
        return (str(tmp_path / f"{name}.npy"),)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        np.save(tmp_path / f"{name}_{i}.npy", arr[a:b])
    return tuple(str(tmp_path / f"{name}_{i}.npy") for i in range(len(cuts) - 1))


@pytest.mark.parametrize("per_shard", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_row_shards_take_sample_weights(tmp_path, reduction, per_shard):
    """--sample-weight on row shards, with class weights: 'mean''s D is sum w_y s_n over the
    batch (pass 1); every field of the single process's report."""
    z, y, _ = make_batch(n=120, c=11, seed=3)
    w, s = class_weights(11), np.random.default_rng(9).choice(DYADIC, 120)
    np.save(tmp_path / "w.npy", w)
    opts = CheckOptions(reduction=reduction, fd="full", z_loss=1e-3)
    g = reference_grad(tmp_path, z, y, opts, weight=w, sample_weight=s).astype(np.float32)
    g[13, 2] *= 1.001
    cuts = [0, 50, 120]
    inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy"), arrays=(
        ("sample_weight", save_rows(tmp_path, "sw", s, cuts, per_shard)),))
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, cuts), "rows", opts, inputs=inputs)
    single = check_grad(z, y, grad=g, weight=w, sample_weight=s, options=opts)
    assert not single.ok and single.options["sample_weighted"]
    assert_merged(sharded, single, 2)
    assert [s.ok for s in sharded.shards] == [False, True]


@pytest.mark.parametrize("per_shard", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_shards_compare_lse_and_z_loss(tmp_path, reduction, per_shard):
    """--lse (per row) and --z-loss-value (a number, or per row with reduction none) on row
    shards: wrong values found at their global rows, the reduced z-loss compared once."""
    z, y, g = make_batch(n=120, c=11, seed=3, reduction=reduction)
    opts = CheckOptions(reduction=reduction, fd="off", z_loss=1e-2)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    lse[97] += 1e-3
    live = y != -100
    zl = np.where(live, 1e-2 * lse * lse, 0.0)
    cuts = [0, 50, 120]
    arrays = [("lse", save_rows(tmp_path, "lse", lse, cuts, per_shard))]
    if reduction == "none":
        zl[20] *= 1.01
        arrays.append(("z_loss_value", save_rows(tmp_path, "zl", zl, cuts, per_shard)))
        value, inputs = zl, sh.BatchInputs(arrays=tuple(arrays))
    else:
        value = float(zl.sum() / (live.sum() if reduction == "mean" else 1)) * 1.01
        inputs = sh.BatchInputs(arrays=tuple(arrays), z_loss=value)
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, cuts), "rows", opts, inputs=inputs)
    single = check_grad(z, y, grad=g, lse=lse, z_loss_value=value, options=opts)
    names = [c.name for c in single.checks]
    assert "lse_vs_reference" in names and "z_loss_vs_reference" in names
    assert [c.name for c in sharded.report.checks] == names
    merged = {c.name: c for c in sharded.report.checks}
    for c in single.checks:
        assert (merged[c.name].ok, merged[c.name].mismatches, merged[c.name].total) == \
            (c.ok, c.mismatches, c.total), c.name
        assert [e.index for e in merged[c.name].worst] == [e.index for e in c.worst], c.name
    assert [e.index for e in merged["lse_vs_reference"].worst if not e.ok] == [(97,)]
    assert not merged["z_loss_vs_reference"].ok
    assert merged["z_loss_vs_reference"].worst[0].allowed == pytest.approx(
        next(c for c in single.checks if c.name == "z_loss_vs_reference").worst[0].allowed, rel=1e-12)


def test_vocab_shards_take_sample_weights_and_refuse_lse(tmp_path):
    """Every vocabulary shard holds every row: it takes the whole --sample-weight file; --lse as
    one file per shard (one file of the batch's, not a part each) and --z-loss-value (no
    --z-loss there) are one line each."""
    z, y, _ = make_batch(n=50, c=20, dtype=np.float64)
    w, s = class_weights(20, seed=2), np.random.default_rng(3).choice(DYADIC, 50)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "sw.npy", s)
    opts = CheckOptions(fd="full")
    g = reference_grad(tmp_path, z, y, opts, weight=w, sample_weight=s)
    g[33, 17] += 1e-3
    files = vocab_files(tmp_path, z, y, g)
    inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy"),
                            arrays=(("sample_weight", (str(tmp_path / "sw.npy"),)),))
    sharded = sh.run_shards(files, "vocab", opts, inputs=inputs)
    assert_merged(sharded, check_grad(z, y, grad=g, weight=w, sample_weight=s, options=opts), 3,
                  exact=False)
    assert sharded.report.options["weighted"] and sharded.report.options["sample_weighted"]
    np.save(tmp_path / "lse.npy", np.zeros(50))
    with pytest.raises(CeCheckError, match="`lse`: one file of the batch's per-row log-sum-exps"):
        sh.run_shards(files, "vocab", opts,
                      inputs=sh.BatchInputs(arrays=(("lse", (str(tmp_path / "lse.npy"),) * 3),)))
    with pytest.raises(CeCheckError, match="`z_loss_value`: needs `z_loss`"):
        sh.run_shards(files, "vocab", opts, inputs=sh.BatchInputs(z_loss=0.1))


@pytest.mark.parametrize("shape, axis, cuts", [((60, 8), "rows", [0, 25, 60]),
                                               ((60, 8), "cols", [0, 3, 8]),
                                               ((12, 5, 4), "rows", [0, 7, 12]),
                                               ((900,), "cols", [0, 400, 900])])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_shards_take_sample_weights(tmp_path, shape, axis, cuts, reduction):
    """binary --sample-weight (the batch's shape; 1-D logits: one per element): row shards take
    their rows, column shards all rows (1-D: their elements); 'mean' divides by the weights'
    sum over the batch's elements (pass 1). Every check field equals the single process's."""
    z, y, _ = bce_batch(shape, seed=6)
    s = np.random.default_rng(8).choice(DYADIC, shape if len(shape) == 1 else shape[:-1])
    s[:3] = 0.0  # a shard's own weights may sum to 0: the batch's do not
    np.save(tmp_path / "sw.npy", s)
    opts = CheckOptions(reduction=reduction, fd="full")
    check_binary(z, y, sample_weight=s, options=opts, out_grad=tmp_path / "ref.npy")
    g = np.load(tmp_path / "ref.npy").astype(np.float32)
    g.reshape(-1)[g.size // 2 + 1] += 1e-2
    sharded = sh.run_shards(write(tmp_path, z, y, g, cuts, axis), axis, opts, kind="binary",
                            inputs=sh.BatchInputs(arrays=(("sample_weight", (str(tmp_path / "sw.npy"),)),)))
    single = check_binary(z, y, grad=g, sample_weight=s, options=opts)
    assert not single.ok
    assert_identical(sharded.report, single, 2)
    assert sharded.report.options == single.options


def test_cli_batch_inputs_on_row_shards(tmp_path, invoke):
    """--sample-weight and --lse as quoted globs, --z-loss-value a number, through the command
    line: the wrong lse row found at its global index (exit 1)."""
    z, y, g = make_batch(n=90, c=7, seed=4)
    cuts = [0, 30, 90]
    write_rows(tmp_path, z, y, g, cuts)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    lse[70] -= 1e-2
    save_rows(tmp_path, "sw", np.ones(90), cuts, True)
    save_rows(tmp_path, "lse", lse, cuts, True)
    res = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--grad",
                  tmp_path / "grad_*.npy", "--shards", "rows", "--sample-weight",
                  tmp_path / "sw_*.npy", "--lse", tmp_path / "lse_*.npy", "--z-loss", "1e-4",
                  "--z-loss-value", "0.5", "--json"])
    assert res.exit_code == 1, res.output
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["lse_vs_reference"]["worst"][0]["index"] == [70]
    assert not checks["z_loss_vs_reference"]["ok"]


def test_vocab_shards_warn_of_negative_class_weights_as_one_process(tmp_path):
    z, y, g = make_batch(n=50, c=20, dtype=np.float64)
    w = class_weights(20, seed=2)
    w[3] = -0.5
    np.save(tmp_path / "w.npy", w)
    sharded = sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", CheckOptions(fd="off"),
                            inputs=sh.BatchInputs(weight=str(tmp_path / "w.npy")))
    assert f"weight file '{tmp_path / 'w.npy'}': negative class weights" in sharded.report.warnings
    assert not any("sample weights" in w for w in sharded.report.warnings)


def test_a_number_is_no_per_sample_loss(tmp_path, invoke):
    z, y, g = make_batch(n=60, c=5, reduction="none")
    write_rows(tmp_path, z, y, g, [0, 20, 60])
    res = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--shards", "rows",
                  "--reduction", "none", "--loss", "2.5"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    with pytest.raises(CeCheckError, match="reduction none compares per-sample values"):
        sh.run_shards(write_rows(tmp_path, z, y, g, [0, 20, 60]), "rows",
                      CheckOptions(reduction="none"), inputs=sh.BatchInputs(loss=2.5))


# ---------------------------------------------------------------- your loss on vocabulary shards


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["none", "class", "class+sample"])
@pytest.mark.parametrize("fd", ["full", "sample"])
def test_vocab_shards_check_your_loss(tmp_path, reduction, weights, fd):
    """--loss on vocabulary shards: each row's loss s_n (lse_n - z_y) from the merged lse and the
    z_y of the shard that holds the label, allowed the single process's floor (per row, or
    summed for a reduced loss): the single process's check, a wrong value caught."""
    z, y, g = make_batch(n=50, c=20, dtype=np.float64, reduction=reduction)
    kw, arrays = {}, []
    if weights != "none":
        kw["weight"] = class_weights(20, seed=2)
        np.save(tmp_path / "w.npy", kw["weight"])
    if weights == "class+sample":
        kw["sample_weight"] = np.random.default_rng(3).choice(DYADIC, 50)
        np.save(tmp_path / "sw.npy", kw["sample_weight"])
        arrays.append(("sample_weight", (str(tmp_path / "sw.npy"),)))
    opts = CheckOptions(reduction=reduction, fd=fd)
    if reduction == "none":
        per = ce_losses(z, y) * (kw["weight"][np.where(y == -100, 0, y)] if "weight" in kw else 1.0)
        per = per * kw.get("sample_weight", 1.0)
        per[21] *= 1.0001
        np.save(tmp_path / "loss.npy", per)
        value, arrays = per, arrays + [("loss", (str(tmp_path / "loss.npy"),))]
        inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy") if "weight" in kw else None,
                                arrays=tuple(arrays))
    else:
        value = check_grad(z, y, options=opts, **kw).loss * (1 + 1e-6)
        inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy") if "weight" in kw else None,
                                arrays=tuple(arrays), loss=value)
    single = check_grad(z, y, grad=g, loss=value, options=opts, **kw)
    sharded = sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", opts, inputs=inputs)
    m = assert_same_check("loss_vs_reference", sharded, single, rel=1e-13)
    if reduction == "none":
        assert [e.index for e in m.worst if not e.ok] == [(21,)]


def test_vocab_loss_passes_as_in_one_process(tmp_path):
    z, y, g = make_batch(n=50, c=20, dtype=np.float64)
    value = check_grad(z, y).loss
    sharded = sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", CheckOptions(fd="off"),
                            inputs=sh.BatchInputs(loss=value))
    assert loss_check(sharded.report).ok and sharded.report.ok
    two = sh.BatchInputs(arrays=(("loss", ("a.npy", "b.npy", "c.npy")),))
    with pytest.raises(CeCheckError, match="one file of the batch's per-sample losses"):
        sh.run_shards(vocab_files(tmp_path, z, y, g), "vocab", CheckOptions(reduction="none"),
                      inputs=two)


# ---------------------------------------------------------------- your lse on vocabulary shards


def global_lse(z, dtype):
    """Each row's logsumexp over the whole vocabulary (a vocabulary-sharded kernel's, after its
    all-reduce), cast to `dtype`."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1)
    return (m + np.log(np.exp(z - m[..., None]).sum(axis=-1))).astype(dtype)


def vocab_batch_files(tmp_path, z, y, g, cuts=((0, 6), (6, 15), (15, 20))):
    """Vocabulary shards of (..., C) logits and gradient; one labels file of the batch's."""
    np.save(tmp_path / "labels.npy", y)
    for i, (a, b) in enumerate(cuts):
        np.save(tmp_path / f"v{i}.npy", z[..., a:b])
        np.save(tmp_path / f"g{i}.npy", g[..., a:b])
    return [sh.ShardFiles(str(tmp_path / f"v{i}.npy"), str(tmp_path / "labels.npy"),
                          str(tmp_path / f"g{i}.npy")) for i in range(len(cuts))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [(50,), (5, 10)])
@pytest.mark.parametrize("with_loss", [False, True])
def test_vocab_shards_check_your_lse(tmp_path, dtype, batch, with_loss):
    """--lse on vocabulary shards: your per-row lse (one file of the batch's) against pass 1's
    global lse, allowed the single process's k eps (1 + |lse|) plus its normaliser bound: the
    single process's check in its place (after your loss), a wrong row found at its batch
    index, an ignored row's value skipped, a right lse passing."""
    z, y, _ = make_batch(n=50, c=20, dtype=np.float64)
    z, y = z.reshape(batch + (20,)), y.reshape(batch)
    opts = CheckOptions(fd="off")
    g = reference_grad(tmp_path, z, y, opts)
    files = vocab_batch_files(tmp_path, z, y, g)
    loss = check_grad(z, y, options=opts).loss if with_loss else None
    right = global_lse(z, dtype)
    wrong = right.copy().reshape(-1)
    wrong[21] += 1e-3
    wrong[9] = 1e6  # row 9's target is ignored: not compared
    wrong = wrong.reshape(batch)
    for lse in (wrong, right):
        np.save(tmp_path / "lse.npy", lse)
        inputs = sh.BatchInputs(arrays=(("lse", (str(tmp_path / "lse.npy"),)),), loss=loss)
        sharded = sh.run_shards(files, "vocab", opts, inputs=inputs)
        single = check_grad(z, y, grad=g, lse=lse, loss=loss, options=opts)
        assert [c.name for c in sharded.report.checks] == [c.name for c in single.checks]
        m, s = (next(c for c in r.checks if c.name == "lse_vs_reference")
                for r in (sharded.report, single))
        assert (m.ok, m.mismatches, m.total, m.note) == (s.ok, s.mismatches, s.total, s.note)
        assert sharded.report.ok == single.ok == (lse is right)
        assert [e.index for e in m.worst if not e.ok] == [e.index for e in s.worst if not e.ok]
        theirs = {e.index: e for e in s.worst}
        assert any(e.index in theirs for e in m.worst)
        for a in m.worst:
            if a.index in theirs:
                b = theirs[a.index]
                assert (a.got, a.ok) == (b.got, b.ok)
                assert a.expected == pytest.approx(b.expected, rel=4 * EPS, abs=0)
                assert a.allowed == pytest.approx(b.allowed, rel=1e-12)
        assert all(s.ok for s in sharded.shards)  # your lse is the client's check, not a shard's
        want = [] if lse is right else [(21,) if len(batch) == 1 else (2, 1)]
        assert [e.index for e in m.worst if not e.ok] == want


def test_cli_vocab_lse(tmp_path, invoke):
    """`grad --shards vocab --lse FILE`: exit 1 and the wrong row in the JSON; a glob of one
    file per shard is one line (exit 2)."""
    z, y, _ = make_batch(n=40, c=20, dtype=np.float64)
    g = reference_grad(tmp_path, z, y, CheckOptions(fd="off"))
    vocab_batch_files(tmp_path, z, y, g)
    lse = global_lse(z, np.float32)
    lse[30] -= 1e-2
    np.save(tmp_path / "lse.npy", lse)
    args = ["grad", tmp_path / "v*.npy", tmp_path / "labels.npy", "--grad", tmp_path / "g*.npy",
            "--shards", "vocab", "--fd", "off"]
    res = invoke([*args, "--lse", tmp_path / "lse.npy", "--json"])
    assert res.exit_code == 1, res.output
    check = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "lse_vs_reference")
    assert [e["index"] for e in check["worst"] if not e["ok"]] == [[30]]
    for i in range(3):  # each rank's copy of the batch's lse
        np.save(tmp_path / f"lse_{i}.npy", lse)
    res = invoke([*args, "--lse", tmp_path / "lse_*.npy"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert "--lse: one file of the batch's per-row log-sum-exps with vocabulary shards" in res.stderr


@pytest.mark.parametrize("shift, ok", [(0.0, True), (0.1, False)])
def test_row_shards_hold_a_16bit_loss_to_the_single_process_rule(tmp_path, shift, ok):
    """A bf16 loss on row shards: the merged check takes one process's rule for a loss
    computed in 16 bits (tolerance.loss_rule), as every shard's rows' floors do."""
    z, y, g = make_batch(n=120, c=11, seed=3)
    opts = CheckOptions(fd="off", precision="bf16")
    value = check_grad(z, y, options=opts).loss * (1 + shift)
    single = check_grad(z, y, grad=g, loss=value, options=opts)
    inputs = sh.BatchInputs(loss=float(value), loss_dtype="float64")
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 50, 120]), "rows", opts, inputs=inputs)
    assert loss_check(single).ok is ok and "floor 1eps" in loss_check(single).rule
    assert loss_check(sharded.report).rule == loss_check(single).rule
    assert_same_loss_check(sharded.report, single)
