"""`--shards` inputs: LOGITS listed (`grad z0.npy z1.npy labels.npy --grad g0.npy --grad g1.npy`)
or globbed, and fsspec URLs (`file://`, `memory://`) read where the shard is checked."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

from ce_cli.errors import CeCheckError
from ce_cli.verify import shards as sh
from ce_cli.verify.checks import check_grad
from ce_cli.verify.options import CheckOptions
from tests.test_shards import assert_same_report, make_batch, write_rows

fsspec = pytest.importorskip("fsspec")


def rows_args(tmp_path, url=""):
    z, y, g = make_batch()
    g[150, 3] *= 1.01
    write_rows(tmp_path, z, y, g, [0, 80, 170, 240], shared_labels=True)
    return [f"{url}{tmp_path}/logits_{i}.npy" for i in range(3)], f"{url}{tmp_path}/labels.npy", \
        [f"{url}{tmp_path}/grad_{i}.npy" for i in range(3)]


def test_listed_files_equal_the_glob(tmp_path, invoke):
    logits, labels, grads = rows_args(tmp_path)
    listed = invoke(["grad", *logits, labels, *[a for g in grads for a in ("--grad", g)],
                     "--shards", "rows", "--json"])
    globbed = invoke(["grad", f"{tmp_path}/logits_*.npy", labels, "--grad",
                      f"{tmp_path}/grad_*.npy", "--shards", "rows", "--json"])
    mixed = invoke(["grad", logits[0], f"{tmp_path}/logits_[12].npy", labels, "--grad", grads[0],
                    "--grad", f"{tmp_path}/grad_[12].npy", "--shards", "auto", "--json"])
    assert listed.exit_code == globbed.exit_code == mixed.exit_code == 1, listed.output
    data = json.loads(listed.stdout)
    assert data == json.loads(globbed.stdout) == json.loads(mixed.stdout)
    assert [p["offset"] for p in data["shards"]["per_shard"]] == [0, 80, 170]
    worst = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")["worst"][0]
    assert worst["index"] == [150, 3]


@pytest.mark.parametrize("args, expect", [
    (["a.npy", "b.npy", "y.npy"], "--shards"),
    (["a.npy", "y.npy", "--grad", "g.npy", "--grad", "h.npy"], "--grad: given 2 times"),
])
def test_several_files_need_shards(invoke, args, expect):
    res = invoke(["grad", *args])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert expect in res.output


def test_one_argument_still_misses_labels(invoke):
    res = invoke(["grad", "a.npy"])
    assert res.exit_code == 2 and "missing argument 'LABELS'" in res.output


def test_file_urls_equal_local_paths(tmp_path, invoke):
    """file:// URLs go through fsspec (globs too) and give the local report."""
    _, labels, grads = rows_args(tmp_path, url="file://")
    by_url = invoke(["grad", f"file://{tmp_path}/logits_*.npy", labels, "--grad", *grads[:1],
                     "--grad", f"file://{tmp_path}/grad_[12].npy", "--shards", "rows", "--json"])
    local = invoke(["grad", f"{tmp_path}/logits_*.npy", f"{tmp_path}/labels.npy", "--grad",
                    f"{tmp_path}/grad_*.npy", "--shards", "rows", "--json"])
    assert by_url.exit_code == local.exit_code == 1, by_url.output
    a, b = json.loads(by_url.stdout), json.loads(local.stdout)
    assert a["checks"] == b["checks"] and a["loss"] == b["loss"]
    assert a["shards"]["per_shard"][1]["source"] == f"file://{tmp_path}/logits_1.npy"


def test_memory_urls_in_process():
    """fsspec's memory:// file system (one process): shapes from the .npy header, then the
    check, equal to the concatenated batch's."""
    z, y, g = make_batch(n=90)
    mem = fsspec.filesystem("memory")
    files = []
    for i, (a, b) in enumerate([(0, 40), (40, 90)]):
        for name, arr in (("z", z[a:b]), ("y", y[a:b]), ("g", g[a:b])):
            buf = io.BytesIO()
            np.save(buf, arr)
            mem.pipe(f"/shards-test/{name}{i}.npy", buf.getvalue())
        files.append(sh.ShardFiles(*(f"memory://shards-test/{n}{i}.npy" for n in "zyg")))
    assert sh.describe(files[1].logits, "logits") == (50, 13)
    opts = CheckOptions(fd="full")
    sharded = sh.run_shards(files, "rows", opts)
    assert_same_report(sharded.report, check_grad(z, y, grad=g, options=opts), 2)
    mem.rm("/shards-test", recursive=True)


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:-40])  # the header claims more data than the file holds


def _link(path):
    os.replace(path, path.with_suffix(".real"))
    os.symlink(path.with_suffix(".real"), path)


@pytest.mark.parametrize("fault, expect", [
    ("missing", "no such file"), ("truncated", "truncated"), ("symlink", "symbolic link"),
    ("protocol", "cannot read"), ("no fsspec", "needs fsspec"),
])
def test_url_faults_are_one_line(tmp_path, invoke, monkeypatch, fault, expect):
    logits, labels, _ = rows_args(tmp_path, url="file://")
    target = tmp_path / "logits_1.npy"
    if fault == "missing":
        target.unlink()
    elif fault == "truncated":
        _corrupt(target)
    elif fault == "symlink":
        _link(target)
    elif fault == "protocol":
        logits[1] = "nosuchprotocol://bucket/logits_1.npy"
    else:
        monkeypatch.setitem(sys.modules, "fsspec", None)  # `import fsspec` raises ImportError
    res = invoke(["grad", *logits, labels, "--shards", "rows"])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("ce-check: error: ")
    assert expect in res.output
    if fault != "protocol":
        assert "logits_" in res.output


@pytest.mark.parametrize("url", ["s3://bucket/logits_*.npy", "nosuchprotocol://b/logits_*.npy"])
def test_url_glob_without_its_backend_says_so(monkeypatch, url):
    """fsspec installed but not the protocol's backend (s3fs): `cannot list`, naming the
    backend, not "needs fsspec"."""
    def missing(path, **kw):
        raise ImportError("Install s3fs to access S3")

    if url.startswith("s3"):
        monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(CeCheckError, match="cannot list") as err:
        sh.expand(url, "logits")
    assert "needs fsspec" not in str(err.value)


def test_url_size_limit(tmp_path, monkeypatch):
    """A URL is read whole: above MAX_STREAM_BYTES it is refused before reading."""
    from ce_cli.io import limits

    logits, _, _ = rows_args(tmp_path, url="file://")
    monkeypatch.setattr(limits, "MAX_STREAM_BYTES", 100)
    with pytest.raises(CeCheckError, match="over the 100"):
        sh.load(logits[0], "logits")


@pytest.mark.parametrize("flag, expect", [
    (["--vocab-offset", "3"], "--vocab-offset: not supported with --shards"),
    (["--z-loss-value", "0.1"], "--z-loss-value: needs --z-loss"),
    (["--out-grad", "ref.npy"], "--out-grad: not supported with --shards")])
def test_semantics_shards_do_not_carry_are_refused(tmp_path, invoke, flag, expect):
    """Never silently ignored: each is an exit-2 line naming the flag (the row-local options,
    --z-loss, --softcap, --logit-scale, --smoothing-form, --denominator, are carried, and the
    batch's inputs --weight, --loss, --sample-weight, --lse, --z-loss-value)."""
    logits, labels, _ = rows_args(tmp_path)
    res = invoke(["grad", *logits, labels, "--shards", "rows", *flag])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert expect in res.output
