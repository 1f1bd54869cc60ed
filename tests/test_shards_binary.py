"""`binary --shards`: a sigmoid BCE batch split by rows or by columns (every entry is independent:
no normaliser pass), merged into the single-process report (ce_cli/verify/shards/)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ce_cli.errors import CeCheckError
from ce_cli.verify import shards as sh
from ce_cli.verify.checks import check_binary
from ce_cli.verify.options import CheckOptions
from tests.test_shards import EPS


def bce_batch(shape, seed=0, dtype=np.float32, reduction="mean"):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape) * 3
    y = rng.random(shape)
    y[..., ::3] = np.round(y[..., ::3])  # hard labels too
    g = 1.0 / (1.0 + np.exp(-z)) - y
    if reduction == "mean":
        g /= z.size
    return z, y, g.astype(dtype)


def write(tmp_path, z, y, g, cuts, axis, shared_labels=False):
    """One logits/labels/grad file per shard, cut along axis 0 (rows) or the last (cols)."""
    files = []
    if shared_labels:
        np.save(tmp_path / "labels.npy", y)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        part = (slice(a, b),) if axis == "rows" else (Ellipsis, slice(a, b))
        np.save(tmp_path / f"z_{i}.npy", z[part])
        np.save(tmp_path / f"g_{i}.npy", g[part])
        labels = tmp_path / ("labels.npy" if shared_labels else f"y_{i}.npy")
        if not shared_labels:
            np.save(labels, y[part])
        files.append(sh.ShardFiles(str(tmp_path / f"z_{i}.npy"), str(labels),
                                   str(tmp_path / f"g_{i}.npy")))
    return files


def assert_identical(merged, single, n_shards):
    """Every check field equal (the two-class bridge included), the loss within the fsum bound."""
    assert (merged.ok, merged.verdict, merged.shape, merged.n_rows, merged.n_classes) == \
        (single.ok, single.verdict, single.shape, single.n_rows, single.n_classes)
    assert merged.checks == single.checks
    assert merged.loss_per_sample_shape == single.loss_per_sample_shape
    assert abs(merged.loss - single.loss) <= (2 + n_shards) * EPS / 2 * abs(single.loss)


CASES = [  # shape, axis, cuts along the split axis
    ((300, 7), "rows", [0, 100, 190, 300]),
    ((300, 7), "cols", [0, 3, 4, 7]),
    ((5000, 20), "rows", [0, 1000, 3000, 3276, 5000]),  # the bridge's 3276 rows end in shard 2
    ((40, 3000), "cols", [0, 1000, 2999, 3000]),
    ((70000,), "cols", [0, 30000, 70000]),  # 1-D: one row, its entries are columns
    ((30, 4, 9), "rows", [0, 10, 30]),
]


@pytest.mark.parametrize("shape, axis, cuts", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_shards_equal_the_single_process_report(tmp_path, shape, axis, cuts, reduction):
    z, y, g = bce_batch(shape, reduction=reduction)
    g.flat[17] *= 1.01  # a planted bug in shard 0
    g.flat[z.size - 2] = -g.flat[z.size - 2]  # and one in the last shard
    opts = CheckOptions(reduction=reduction, fd="off")
    files = write(tmp_path, z, y, g, cuts, axis)
    sharded = sh.run_shards(files, axis, opts, kind="binary")
    single = check_binary(z, y, grad=g, options=opts)
    assert not single.ok
    assert_identical(sharded.report, single, len(cuts) - 1)
    grad = next(c for c in sharded.report.checks if c.name == "grad_vs_reference")
    planted = {tuple(int(i) for i in np.unravel_index(k, shape)) for k in (17, z.size - 2)}
    assert {e.index for e in grad.worst if not e.ok} == planted
    along = 0 if axis == "rows" else -1
    owners = {int(np.searchsorted(cuts, p[along], side="right")) - 1 for p in planted}
    assert [i for i, s in enumerate(sharded.shards) if not s.ok] == sorted(owners)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_binary_full_finite_differences_and_dtypes(tmp_path, dtype, axis):
    """Row or column shards: the whole report is identical (a finite difference evaluates its
    element alone, wherever the element's row was cut), and `auto` picks `full` for the whole
    batch as one process does."""
    z, y, g = bce_batch((60, 6), seed=2, dtype=dtype)
    g[41, 5] *= 1.01
    cuts = [0, 25, 60] if axis == "rows" else [0, 2, 6]
    for opts in (CheckOptions(fd="full"), CheckOptions()):
        sharded = sh.run_shards(write(tmp_path, z, y, g, cuts, axis), axis, opts, kind="binary")
        merged, single = sharded.report, check_binary(z, y, grad=g, options=opts)
        assert not single.ok and (single.fd_mode, single.fd_evaluations) == ("full", z.size * 2)
        assert (merged.fd_mode, merged.fd_evaluations) == ("full", z.size * 2)
        assert_identical(merged, single, 2)


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_one_labels_file_is_cut_per_shard(tmp_path, axis):
    z, y, g = bce_batch((50, 8), seed=1)
    cuts = [0, 20, 50] if axis == "rows" else [0, 5, 8]
    sharded = sh.run_shards(write(tmp_path, z, y, g, cuts, axis, shared_labels=True), None,
                            CheckOptions(fd="off"), kind="binary")
    assert sharded.axis == axis  # auto: the labels file's shape tells
    assert_identical(sharded.report, check_binary(z, y, grad=g, fd="off"), 2)


def test_auto_tells_columns_from_the_shapes(tmp_path):
    z, y, g = bce_batch((50, 8))
    files = write(tmp_path, z, y, g, [0, 3, 8], "cols")
    assert sh.run_shards(files, None, CheckOptions(fd="off"), kind="binary").axis == "cols"
    with pytest.raises(CeCheckError, match="unknown split 'vocab'"):
        sh.run_shards(files, "vocab", CheckOptions(fd="off"), kind="binary")


def test_cli_binary_shards_list_and_glob(tmp_path, invoke):
    """`binary a.npy b.npy y.npy --grad ga --grad gb --shards cols` (files listed) and the glob
    form print the same report, the single-process one."""
    z, y, g = bce_batch((40, 9), reduction="sum")
    g[31, 7] += 0.5
    write(tmp_path, z, y, g, [0, 4, 9], "cols", shared_labels=True)
    listed = invoke(["binary", tmp_path / "z_0.npy", tmp_path / "z_1.npy", tmp_path / "labels.npy",
                     "--grad", tmp_path / "g_0.npy", "--grad", tmp_path / "g_1.npy",
                     "--shards", "cols", "--reduction", "sum", "--json"])
    globbed = invoke(["binary", tmp_path / "z_*.npy", tmp_path / "labels.npy", "--grad",
                      tmp_path / "g_*.npy", "--shards", "cols", "--reduction", "sum", "--json"])
    assert listed.exit_code == globbed.exit_code == 1, listed.output
    data = json.loads(listed.stdout)
    assert data == json.loads(globbed.stdout)
    worst = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")["worst"][0]
    assert worst["index"] == [31, 7]
    assert [p["offset"] for p in data["shards"]["per_shard"]] == [0, 4]
    assert [p["ok"] for p in data["shards"]["per_shard"]] == [True, False]


@pytest.mark.parametrize("axis, cuts", [("rows", [0, 12, 30]), ("cols", [0, 3, 8])])
@pytest.mark.parametrize("given", ["number", "file"])
def test_pos_weight(tmp_path, invoke, axis, cuts, given):
    """--pos-weight with shards: a number, or a file of K values (column shards take theirs):
    the single-process report (the bridge checked without it, as there)."""
    z, y, _ = bce_batch((30, 8), seed=5)
    pw = np.linspace(0.5, 4.0, 8) if given == "file" else np.float64(2.5)
    s = 1.0 / (1.0 + np.exp(-z))
    g = ((1.0 + (pw - 1.0) * y) * s - pw * y) / z.size  # d/dz of BCE with pos_weight, mean
    g[17, 6] *= 1.01
    write(tmp_path, z, y, g, cuts, axis)
    np.save(tmp_path / "pw.npy", pw)
    arg = str(tmp_path / "pw.npy") if given == "file" else "2.5"
    res = invoke(["binary", tmp_path / "z_*.npy", tmp_path / "y_*.npy", "--grad",
                  tmp_path / "g_*.npy", "--shards", axis, "--pos-weight", arg, "--json"])
    single = check_binary(z, y, grad=g, pos_weight=pw, fd="auto")
    assert res.exit_code == 1, res.output
    data = json.loads(res.stdout)
    assert not single.ok and data["verdict"].split(", ")[0] == single.verdict.split(", ")[0]
    for got, want in zip(data["checks"], single.checks):
        assert (got["name"], got["mismatches"], got["total"]) == (want.name, want.mismatches,
                                                                  want.total)
    grad = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")
    assert grad["worst"][0]["index"] == [17, 6] and not grad["worst"][0]["ok"]
    merged = sh.run_shards(write(tmp_path, z, y, g, cuts, axis), axis, CheckOptions(),
                           kind="binary", pos_weight=str(tmp_path / "pw.npy") if given == "file"
                           else 2.5)
    if axis == "rows":
        assert_identical(merged.report, check_binary(z, y, grad=g, pos_weight=pw), 2)


def test_pos_weight_of_the_wrong_width(tmp_path, invoke):
    z, y, g = bce_batch((20, 4))
    write(tmp_path, z, y, g, [0, 1, 4], "cols")
    np.save(tmp_path / "pw.npy", np.ones(3))
    res = invoke(["binary", tmp_path / "z_*.npy", tmp_path / "y_*.npy", "--shards", "cols",
                  "--pos-weight", tmp_path / "pw.npy"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "pw.npy" in res.output and "expected (4,)" in res.output


@pytest.mark.parametrize("flag", [["--two-class"], ["--out-grad", "out.npy"]])
def test_cli_binary_refuses_what_shards_do_not_support(tmp_path, invoke, flag):
    z, y, g = bce_batch((20, 4))
    write(tmp_path, z, y, g, [0, 10, 20], "rows")
    res = invoke(["binary", tmp_path / "z_*.npy", tmp_path / "y_*.npy", "--shards", "rows", *flag])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert f"{flag[0]}: not supported with --shards" in res.output


@pytest.mark.parametrize("axis, cuts", [("rows", [0, 25, 60]), ("cols", [0, 2, 6])])
@pytest.mark.parametrize("kw", [{"softcap": 4.0}, {"logit_scale": 0.7}, {"denominator": 11.0},
                                {"label_smoothing": 0.2},
                                {"softcap": 6.0, "logit_scale": 1.5, "label_smoothing": 0.1,
                                 "denominator": 90.0, "reduction": "sum"}],
                         ids=lambda kw: "-".join(kw))
def test_binary_shards_carry_the_training_code_options(tmp_path, axis, cuts, kw):
    """Every binary option acts element by element: row and column shards give the
    single-process report, the bridge on the plain loss as there."""
    z, y, _ = bce_batch((60, 6), seed=4)
    opts = CheckOptions(**kw)
    check_binary(z, y, options=opts, out_grad=tmp_path / "ref.npy")
    g = np.load(tmp_path / "ref.npy")
    g[41, 5] *= 1.01
    sharded = sh.run_shards(write(tmp_path, z, y, g, cuts, axis), axis, opts, kind="binary")
    single = check_binary(z, y, grad=g, options=opts)
    assert not single.ok
    assert_identical(sharded.report, single, 2)
    assert sharded.report.options == single.options


def test_binary_shards_refuse_softmax_only_options(tmp_path):
    z, y, g = bce_batch((20, 4))
    with pytest.raises(CeCheckError, match="`z_loss`: applies to softmax"):
        sh.run_shards(write(tmp_path, z, y, g, [0, 10, 20], "rows"), "rows",
                      CheckOptions(z_loss=1e-4), kind="binary")


def test_a_column_pos_weight_file_is_refused_by_shards(tmp_path):
    """A (K, 1) .npy pos_weight broadcasts along axis -2 in one process; shards take K values or
    one number, so they refuse it rather than read it as K values. A one-row file is K values."""
    z, y, g = bce_batch((20, 4))
    files = write(tmp_path, z, y, g, [0, 10, 20], "rows")
    np.save(tmp_path / "col.npy", np.ones((4, 1)))
    np.save(tmp_path / "row.npy", np.full((1, 4), 2.0))
    with pytest.raises(CeCheckError, match=r"shape \(4, 1\)"):
        sh.run_shards(files, "rows", CheckOptions(fd="off"), kind="binary",
                      pos_weight=str(tmp_path / "col.npy"))
    row = sh.run_shards(files, "rows", CheckOptions(fd="off"), kind="binary",
                        pos_weight=str(tmp_path / "row.npy"))
    single = check_binary(z, y, grad=g, pos_weight=np.full(4, 2.0), fd="off")
    assert row.report.loss == pytest.approx(single.loss, rel=1e-15)
