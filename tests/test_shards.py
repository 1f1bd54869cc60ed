"""`--shards`: a row- or vocabulary-split batch checked shard by shard, never concatenated, and
merged into the single-process report (ce_cli/verify/shards/), in this process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ce_cli.errors import CeCheckError
from ce_cli.verify import shards as sh
from ce_cli.verify.checks import check_grad, reference
from ce_cli.verify.options import CheckOptions

EPS = float(np.finfo(np.float64).eps)


def reference_grad(z, y, reduction="mean", ignore_index=-100):
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    live = y != ignore_index
    p[np.arange(len(y))[live], y[live]] -= 1.0
    p[~live] = 0.0
    return p / max(1, live.sum()) if reduction == "mean" else p


def make_batch(n=240, c=13, seed=0, dtype=np.float32, reduction="mean"):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 3
    y = rng.integers(0, c, n)
    y[::9] = -100
    return z, y, reference_grad(z, y, reduction).astype(dtype)


def write_rows(tmp_path, z, y, g, cuts, shared_labels=False):
    files = []
    if shared_labels:
        np.save(tmp_path / "labels.npy", y)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        np.save(tmp_path / f"logits_{i}.npy", z[a:b])
        np.save(tmp_path / f"grad_{i}.npy", g[a:b])
        if not shared_labels:
            np.save(tmp_path / f"labels_{i}.npy", y[a:b])
        labels = tmp_path / ("labels.npy" if shared_labels else f"labels_{i}.npy")
        files.append(sh.ShardFiles(str(tmp_path / f"logits_{i}.npy"), str(labels),
                                   str(tmp_path / f"grad_{i}.npy")))
    return files


def assert_same_report(merged, single, n_shards):
    """Verdict (PASS/FAIL and the failing check's counts), counts, maxima, worst entries (global
    indices) equal; the loss within the documented bound of the fsum merge. The likely cause is
    each shard's own judgement (shard-prefixed), not compared."""
    assert merged.verdict.split(", ")[0] == single.verdict.split(", ")[0]
    assert merged.ok == single.ok
    assert (merged.shape, merged.n_rows, merged.n_classes, merged.n_ignored) == \
        (single.shape, single.n_rows, single.n_classes, single.n_ignored)
    assert [c.name for c in merged.checks] == [c.name for c in single.checks]
    for m, s in zip(merged.checks, single.checks):
        assert (m.ok, m.mismatches, m.total) == (s.ok, s.mismatches, s.total), m.name
        assert (m.max_abs_err, m.max_rel_err) == (s.max_abs_err, s.max_rel_err), m.name
        assert m.worst == s.worst, m.name
    assert bool(merged.diagnosis) == bool(single.diagnosis)
    bound = (2 + n_shards) * EPS / 2 * abs(single.loss)
    assert abs(merged.loss - single.loss) <= bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fd", ["off", "full"])
def test_row_shards_equal_the_single_process_report(tmp_path, dtype, reduction, fd):
    z, y, g = make_batch(dtype=dtype, reduction=reduction)
    g[200, 4] *= 1.001  # a planted bug in shard 2
    g[7, 0] = -g[7, 0]  # and one in shard 0
    opts = CheckOptions(reduction=reduction, fd=fd)
    files = write_rows(tmp_path, z, y, g, [0, 70, 150, 240])
    sharded = sh.run_shards(files, "rows", opts)
    single = check_grad(z, y, grad=g, options=opts)
    assert not single.ok
    assert_same_report(sharded.report, single, 3)
    worst = {e.index for e in sharded.report.checks[[c.name for c in single.checks]
                                                    .index("grad_vs_reference")].worst if not e.ok}
    assert worst == {(200, 4), (7, 0)}
    assert [s.ok for s in sharded.shards] == [False, True, False]
    assert [s.offset for s in sharded.shards] == [0, 70, 150]


def test_shared_labels_file_is_sliced_per_shard(tmp_path):
    z, y, g = make_batch()
    own = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 100, 240]), None, CheckOptions())
    (tmp_path / "s").mkdir()
    shared = sh.run_shards(write_rows(tmp_path / "s", z, y, g, [0, 100, 240], shared_labels=True),
                           None, CheckOptions())
    assert own.axis == shared.axis == "rows"
    assert own.report.checks == shared.report.checks and own.report.loss == shared.report.loss
    assert own.report.ok


def test_mean_uses_the_global_denominator(tmp_path):
    """Shard 1 has every target ignored: its rows' gradient is 0, the others divide by the
    batch's count, not their own (a shard checked alone with its own mean would fail)."""
    z, y, _ = make_batch(n=60)
    y[30:] = -100
    g = reference_grad(z, y)
    files = write_rows(tmp_path, z, y, g, [0, 30, 60])
    sharded = sh.run_shards(files, "rows", CheckOptions(fd="off"))
    assert sharded.report.ok, sharded.report.verdict
    alone = check_grad(z[:30], y[:30], grad=g[:30], options=CheckOptions(fd="off"))
    assert alone.ok  # here the shard's count is the batch's: same denominator
    g2 = reference_grad(z[:30], y[:30])  # shard 0 normalised by its own count (the same here)
    assert np.array_equal(g2, g[:30])
    y[45] = 3  # now the batch counts one more target than shard 0 alone
    g = reference_grad(z, y)
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 30, 60]), "rows",
                            CheckOptions(fd="off"))
    assert sharded.report.ok
    local = np.concatenate([reference_grad(z[:30], y[:30]), g[30:]])  # the local-mean bug
    bad = sh.run_shards(write_rows(tmp_path, z, y, local, [0, 30, 60]), "rows",
                        CheckOptions(fd="off"))
    assert not bad.report.ok and [s.ok for s in bad.shards] == [False, True]


def lse_direct(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000), st.floats(0.1, 300))
def test_merged_lse_matches_the_direct_lse(k, seed, scale):
    rng = np.random.default_rng(seed)
    c = 40
    z = rng.normal(size=(25, c)) * scale
    z[3, :] = -np.inf
    z[3, 7] = 1.0  # one live entry
    cuts = np.sort(rng.choice(np.arange(1, c), size=k - 1, replace=False)) if k > 1 else []
    parts = np.split(z, cuts, axis=1)
    stats = []
    for p in parts:
        top = p.max(axis=1)
        safe = np.where(np.isneginf(top), 0.0, top)
        e = np.exp(p - safe[:, None])
        e[np.arange(len(p)), p.argmax(axis=1)] = 0.0
        stats.append((top, e.sum(axis=1)))
    lse = sh.merge_row_stats(stats)
    assert np.allclose(lse, lse_direct(z), rtol=8 * EPS, atol=0)
    one = sh.merge_row_stats([stats[0]]) if k == 1 else None
    if one is not None:
        assert np.array_equal(one, stats[0][0] + np.log1p(stats[0][1]))


def vocab_plan(tmp_path):
    z, y, _ = make_batch(n=50, c=20, dtype=np.float64)
    np.save(tmp_path / "labels.npy", y)
    files, shapes = [], []
    for i, (a, b) in enumerate([(0, 6), (6, 15), (15, 20)]):
        np.save(tmp_path / f"v{i}.npy", z[:, a:b])
        files.append(sh.ShardFiles(str(tmp_path / f"v{i}.npy"), str(tmp_path / "labels.npy")))
        shapes.append((50, b - a))
    plan = sh.make_plan(files, shapes, [(50,)], None)
    assert plan.axis == "vocab" and plan.shape == (50, 20)
    assert [s.offset for s in plan.shards] == [0, 6, 15]
    lse = sh.merge_row_stats([sh.shard_row_stats(s) for s in plan.shards])
    assert np.allclose(lse, lse_direct(z), rtol=4 * EPS, atol=0)
    return plan, lse


def test_vocab_pass_one_from_files(tmp_path):
    vocab_plan(tmp_path)


def test_vocab_pass_two_calls_check_grad_with_offset_and_global_lse(tmp_path, monkeypatch):
    """Pins the interface of the vocabulary-shard check: check_grad(z_shard, labels,
    vocab_offset=K, lse=global lse) (issue #13's single-array semantics)."""
    plan, lse = vocab_plan(tmp_path)
    calls = []
    monkeypatch.setattr("ce_cli.verify.shards.vocab.check_grad", lambda z, y, **kw: calls.append((z, y, kw)) or "report")
    assert sh.check_shard(plan.shards[1], CheckOptions(), lse) == "report"
    z, y, kw = calls[0]
    assert z.shape == (50, 9) and kw["options"].vocab_offset == 6
    assert kw["options"].vocab_size == 20
    assert np.array_equal(kw["lse"], lse) and y.shape == (50,)


def test_vocab_shards_give_the_single_process_report(tmp_path, invoke):
    """Vocabulary shards, in this process: the merged report is the whole batch's, a planted
    error is found at its global index, and the loss counts each row's lse once."""
    z, y, _ = make_batch(n=50, c=20, dtype=np.float64)
    g = reference(z, y).grad
    g[7, 12] = g[7, 12] * 1.01 if g[7, 12] else 1e-3
    np.save(tmp_path / "labels.npy", y)
    for i, (a, b) in enumerate([(0, 6), (6, 15), (15, 20)]):
        np.save(tmp_path / f"v{i}.npy", z[:, a:b])
        np.save(tmp_path / f"g{i}.npy", g[:, a:b])
    res = invoke(["grad", tmp_path / "v*.npy", tmp_path / "labels.npy", "--grad",
                  tmp_path / "g*.npy", "--shards", "vocab", "--fd", "off", "--json"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    whole = check_grad(z, y, grad=g, fd="off")
    assert data["loss"] == pytest.approx(whole.loss, rel=8 * EPS)
    grad = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")
    assert grad["mismatches"] == 1 and grad["worst"][0]["index"] == [7, 12]


# ---------------------------------------------------------------- the command line


def test_cli_reports_per_shard(tmp_path, invoke):
    z, y, g = make_batch()
    g[130, 2] *= 1.01
    write_rows(tmp_path, z, y, g, [0, 100, 240])
    res = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy",
                  "--grad", tmp_path / "grad_*.npy", "--shards", "rows", "--json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["shape"] == [240, 13]
    per = data["shards"]["per_shard"]
    assert [p["ok"] for p in per] == [True, False] and per[1]["offset"] == 100
    worst = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")["worst"][0]
    assert worst["index"] == [130, 2] and not worst["ok"]
    table = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy",
                    "--grad", tmp_path / "grad_*.npy", "--shards", "rows"])
    assert table.exit_code == 1 and "shards (rows)" in table.stdout


def test_cli_natural_order(tmp_path, invoke):
    """logits_2 comes before logits_10: shards pair and offset in natural order."""
    z, y, g = make_batch(n=110)
    cuts = list(range(0, 111, 10))
    write_rows(tmp_path, z, y, g, cuts)
    res = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy",
                  "--grad", tmp_path / "grad_*.npy", "--shards", "rows", "--json"])
    assert res.exit_code == 0, res.output
    offsets = [p["offset"] for p in json.loads(res.stdout)["shards"]["per_shard"]]
    assert offsets == cuts[:-1]


@pytest.mark.parametrize("case", ["missing", "corrupt", "count", "out_grad", "workers", "axis",
                                  "shape"])
def test_cli_bad_input_is_one_line(tmp_path, invoke, case):
    z, y, g = make_batch()
    write_rows(tmp_path, z, y, g, [0, 100, 240])
    args = ["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--grad",
            tmp_path / "grad_*.npy", "--shards", "rows"]
    expect = {"missing": "matches no file", "corrupt": "logits_1.npy", "count": "3 files for 2 logits shards",
              "out_grad": "--out-grad: not supported with --shards", "workers": "only with --shards",
              "axis": "unknown split", "shape": "does not match the first shard"}[case]
    if case == "missing":
        args[1] = tmp_path / "nothing_*.npy"
    elif case == "corrupt":
        (tmp_path / "logits_1.npy").write_bytes(b"\x93NUMPY garbage")
    elif case == "count":
        np.save(tmp_path / "grad_9.npy", g[:3])
    elif case == "out_grad":
        args += ["--out-grad", tmp_path / "ref.npy"]
    elif case == "workers":
        args = args[:-2] + ["--workers", "2"]
    elif case == "axis":
        args[-1] = "columns"
    elif case == "shape":
        np.save(tmp_path / "logits_1.npy", np.zeros((140, 12)))
    res = invoke(args)
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("ce-check: error: ")
    assert expect in res.output


def test_plain_path_never_imports_dask(tmp_path):
    """Dask is an optional extra: the single-process shard path neither needs nor imports it."""
    z, y, g = make_batch()
    write_rows(tmp_path, z, y, g, [0, 100, 240])
    code = (
        "import sys\nfrom ce_cli.cli.main import main\n"
        f"sys.argv = ['ce-check', 'grad', {str(tmp_path / 'logits_*.npy')!r}, "
        f"{str(tmp_path / 'labels_*.npy')!r}, '--shards', 'rows', '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'fsspec'))\n"
        "print(code, bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr


def test_loss_merge_bound():
    """math.fsum over per-shard exactly rounded sums: within (2 + k) eps/2 of the exact sum."""
    rng = np.random.default_rng(3)
    rows = rng.exponential(size=10_000) * 10.0 ** rng.integers(-8, 8, 10_000)
    exact = math.fsum(rows.tolist())
    for k in (2, 7, 64):
        parts = np.array_split(rows, k)
        merged = math.fsum(math.fsum(p.tolist()) for p in parts)
        assert abs(merged - exact) <= (2 + k) * EPS / 2 * exact
    with pytest.raises(CeCheckError):
        sh.pair_files(["a", "b"], ["x", "y", "z"], None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fd", ["off", "full"])
def test_vocab_shards_end_to_end(tmp_path, reduction, fd):
    """Vocabulary shards through pass 1 (global lse) and pass 2 (check_grad with vocab_offset):
    the single-process verdict, counts and failing entries (global indices, your values, the
    reference within a few ulps: it uses the merged lse), the loss within the bound. The allowances are each shard's own (its rounding
    floor counts its columns), so the passing entries' ranks may differ."""
    z, y, _ = make_batch(n=50, c=20, dtype=np.float64)
    g = reference(z, y, reduction=reduction).grad
    g[7, 12] *= 1.01
    g[30, 2] = -g[30, 2]
    np.save(tmp_path / "labels.npy", y)
    files = []
    for i, (a, b) in enumerate([(0, 6), (6, 15), (15, 20)]):
        np.save(tmp_path / f"v{i}.npy", z[:, a:b])
        np.save(tmp_path / f"g{i}.npy", g[:, a:b])
        files.append(sh.ShardFiles(str(tmp_path / f"v{i}.npy"), str(tmp_path / "labels.npy"),
                                   str(tmp_path / f"g{i}.npy")))
    opts = CheckOptions(reduction=reduction, fd=fd)
    sharded = sh.run_shards(files, "vocab", opts)
    assert_vocab_merged(sharded, check_grad(z, y, grad=g, options=opts), 8 * EPS, 8 * EPS)
    grad = next(c for c in sharded.report.checks if c.name == "grad_vs_reference")
    assert {e.index for e in grad.worst if not e.ok} == {(7, 12), (30, 2)}
    assert [s.ok for s in sharded.shards] == [False, False, True]  # columns 2 and 12


def assert_vocab_merged(sharded, single, grad_rtol=16 * EPS, loss_rtol=64 * EPS):
    """Vocabulary shards: the single process's verdict (the cause is per shard), counts and
    failing entries (global index, your value), references within `grad_rtol` (from the
    merged lse; a finite difference on a shard: within its truncation and rounding, 1e-6),
    the loss within `loss_rtol`."""
    merged = sharded.report
    assert (merged.ok, merged.shape, merged.n_rows) == (single.ok, single.shape, single.n_rows)
    assert merged.verdict.split(", ")[0] == single.verdict.split(", ")[0]
    assert [c.name for c in merged.checks] == [c.name for c in single.checks]
    for m, s in zip(merged.checks, single.checks):
        assert (m.ok, m.mismatches, m.total) == (s.ok, s.mismatches, s.total), m.name
        bad = sorted((e.index, e.got, e.expected) for e in m.worst if not e.ok)
        want = sorted((e.index, e.got, e.expected) for e in s.worst if not e.ok)
        assert [b[:2] for b in bad] == [w[:2] for w in want], m.name
        rtol = grad_rtol if m.name == "grad_vs_reference" else 1e-6
        assert np.allclose([b[2] for b in bad], [w[2] for w in want], rtol=rtol, atol=0), m.name
    assert abs(merged.loss - single.loss) <= loss_rtol * abs(single.loss)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_row_shards_with_label_smoothing(tmp_path, reduction):
    """Label smoothing is per row: row shards give the single-process report with it."""
    z, y, _ = make_batch(n=90, c=11)
    g = reference(z, y, reduction=reduction, label_smoothing=0.1).grad.astype(np.float32)
    g[61, 3] *= 1.001
    opts = CheckOptions(reduction=reduction, label_smoothing=0.1, fd="full")
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 30, 90]), "rows", opts)
    assert_same_report(sharded.report, check_grad(z, y, grad=g, options=opts), 2)
    assert [s.ok for s in sharded.shards] == [True, False]


@pytest.mark.parametrize("option", [["--out-grad", "OUT"], ["--two-class"]])
def test_binary_shards_refuse_what_they_cannot_take(tmp_path, invoke, option):
    """`binary --shards` writes no reference gradient and takes no (..., 2) softmax batch:
    refused, never ignored."""
    rng = np.random.default_rng(5)
    for i in range(2):
        np.save(tmp_path / f"z_{i}.npy", rng.standard_normal((4, 3)))
        np.save(tmp_path / f"y_{i}.npy", (rng.random((4, 3)) < 0.5).astype(np.float64))
    option = [str(tmp_path / "out.npy") if o == "OUT" else o for o in option]
    res = invoke(["binary", tmp_path / "z_*.npy", tmp_path / "y_*.npy", "--shards", "rows", *option])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1
    assert f"{option[0]}: not supported with --shards" in res.output
    assert not (tmp_path / "out.npy").exists()


# --- training-code options on row shards ---------------------------------------------------

SEMANTICS = {"z_loss": {"z_loss": 1e-3}, "softcap": {"softcap": 5.0},
             "logit_scale": {"logit_scale": 0.5},
             "others": {"smoothing_form": "others", "label_smoothing": 0.1},
             "denominator": {"denominator": 37.0},
             "all": {"z_loss": 1e-4, "softcap": 8.0, "logit_scale": 1.5, "label_smoothing": 0.2,
                     "denominator": 150.0}}


def _reference_grad(tmp_path, z, y, opts: CheckOptions) -> np.ndarray:
    """The single-process float64 reference gradient under `opts` (its --out-grad file)."""
    check_grad(z, y, options=opts, out_grad=tmp_path / "ref.npy")
    return np.load(tmp_path / "ref.npy")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(SEMANTICS))
def test_row_shards_carry_the_training_code_options(tmp_path, name, reduction):
    """z-loss, softcap, logit scale, smoothing form and an outside denominator act row by row:
    row shards give the single-process report (a bug at one entry found at its global index)."""
    z, y, _ = make_batch(n=120, c=11, seed=3)
    opts = CheckOptions(reduction=reduction, fd="full", **SEMANTICS[name])
    g = _reference_grad(tmp_path, z, y, opts).astype(np.float32)
    g[77, 4] *= 1.001
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 50, 120]), "rows", opts)
    single = check_grad(z, y, grad=g, options=opts)
    assert not single.ok
    assert_same_report(sharded.report, single, 2)
    assert sharded.report.options == single.options


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_row_shards_shift_labels_within_their_sequences(tmp_path, reduction):
    """`shift_labels` on (B, T, V) row shards: each shard's sequences are whole, so shifting
    within the shard is the batch's shift, and 'mean' divides by the shifted count."""
    rng = np.random.default_rng(8)
    z = rng.normal(size=(9, 6, 5)) * 2
    y = rng.integers(0, 5, (9, 6))
    y[2, 3] = -100
    opts = CheckOptions(reduction=reduction, shift_labels=True, z_loss=1e-3)
    g = _reference_grad(tmp_path, z, y, opts)
    g[4, 2, 1] += 1e-3
    sharded = sh.run_shards(write_rows(tmp_path, z, y, g, [0, 4, 9]), "rows", opts)
    assert_same_report(sharded.report, check_grad(z, y, grad=g, options=opts), 2)


def test_shift_labels_needs_whole_sequences(tmp_path):
    """2-D row shards could cut a sequence between two shards: `shift_labels` is refused."""
    z, y, g = make_batch(n=20, c=5)
    with pytest.raises(CeCheckError, match="`shift_labels`: row shards need"):
        sh.run_shards(write_rows(tmp_path, z, y, g, [0, 10, 20]), "rows",
                      CheckOptions(shift_labels=True))
