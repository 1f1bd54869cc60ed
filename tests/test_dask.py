"""`grad --shards` on Dask: a LocalCluster of 2 worker processes gives the single-process report;
faults (a worker killed, a corrupt or missing shard, Ctrl-C) behave as ce_cli/distributed says.

Dask is in the `test` extra; without it these tests skip, except under CI, where that fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from ce_cli.verify import shards as sh
from ce_cli.verify.checks import check_grad
from ce_cli.verify.options import CheckOptions
from tests.test_shards import assert_same_report, make_batch, vocab_plan, write_rows

try:
    import distributed
except ImportError:  # pragma: no cover
    if os.environ.get("CI"):
        raise
    pytest.skip("dask[distributed] is not installed (pip install -e '.[test]')",
                allow_module_level=True)

from ce_cli.distributed.dask_run import DaskMapper, run_on_dask  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def idle(client, limit=60.0):
    """Wait (polling, up to `limit` s) until the scheduler holds no task of ours."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0:
            return True
        time.sleep(0.1)
    return False


def test_row_shards_equal_the_single_process_report(tmp_path, client):
    z, y, g = make_batch(n=400)
    g[334, 5] *= 1.001
    cuts = [0, 50, 120, 200, 260, 330, 400]
    files = write_rows(tmp_path, z, y, g, cuts)
    opts = CheckOptions(fd="full")
    on_dask = run_on_dask(files, None, opts, client=client)
    here = sh.run_shards(files, None, opts)
    assert on_dask == here  # every field, per shard and merged
    assert_same_report(on_dask.report, check_grad(z, y, grad=g, options=opts), len(cuts) - 1)
    bad = [s.index for s in on_dask.shards if not s.ok]
    assert bad == [5]
    grad_check = next(c for c in on_dask.report.checks if c.name == "grad_vs_reference")
    assert grad_check.worst[0].index == (334, 5) and not grad_check.worst[0].ok


def test_row_shards_with_the_batch_inputs(tmp_path, client):
    """--weight, --sample-weight (one file per shard) and a wrong reduced --loss on the cluster:
    the report made here, field by field, the loss check merged on the client."""
    z, y, g = make_batch(n=120, c=11)
    np.save(tmp_path / "w.npy", np.linspace(0.5, 2.0, 11))
    cuts = [0, 50, 120]
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        np.save(tmp_path / f"sw_{i}.npy", np.arange(a, b) % 3 + 0.5)
    inputs = sh.BatchInputs(weight=str(tmp_path / "w.npy"), loss=2.5, arrays=(
        ("sample_weight", (str(tmp_path / "sw_0.npy"), str(tmp_path / "sw_1.npy"))),))
    files = write_rows(tmp_path, z, y, g, cuts)
    opts = CheckOptions(fd="off")
    on_dask = run_on_dask(files, "rows", opts, client=client, inputs=inputs)
    assert on_dask == sh.run_shards(files, "rows", opts, inputs=inputs)
    loss = next(c for c in on_dask.report.checks if c.name == "loss_vs_reference")
    assert not loss.ok and loss.worst[0].got == 2.5


def test_vocab_shards(tmp_path, client):
    plan, lse = vocab_plan(tmp_path)
    mapper = DaskMapper(client)
    future = mapper.reduce(sh.shard_row_stats, plan.shards, sh.merge_row_stats)
    assert np.array_equal(future.result(), lse)  # pass 1 on the cluster: the same lse, bit for bit
    files = [s.files for s in plan.shards]
    z = np.concatenate([np.load(f.logits) for f in files], axis=1)
    y = np.load(files[0].labels)
    opts = CheckOptions(fd="off")
    on_dask = run_on_dask(files, "vocab", opts, client=client)
    assert on_dask == sh.run_shards(files, "vocab", opts)
    assert_same_report(on_dask.report, check_grad(z, y, options=opts), len(files))
    # your loss and lse, checked on the client against pass 1's lse (a future on the cluster)
    np.save(tmp_path / "lse.npy", np.where(np.arange(len(y)) == 7, lse + 1e-3, lse))
    inputs = sh.BatchInputs(arrays=(("lse", (str(tmp_path / "lse.npy"),)),),
                            loss=check_grad(z, y, options=opts).loss)
    on_dask = run_on_dask(files, "vocab", opts, client=client, inputs=inputs)
    assert on_dask == sh.run_shards(files, "vocab", opts, inputs=inputs)
    checks = {c.name: c for c in on_dask.report.checks}
    assert list(checks)[-2:] == ["loss_vs_reference", "lse_vs_reference"]
    assert checks["loss_vs_reference"].ok and not checks["lse_vs_reference"].ok
    assert [e.index for e in checks["lse_vs_reference"].worst if not e.ok] == [(7,)]


def test_worker_killed_mid_run(tmp_path, client):
    """A worker SIGKILLed after the first shard finishes: its tasks rerun, the report stands."""
    z, y, g = make_batch(n=600)
    g[590, 1] = 0.5
    files = write_rows(tmp_path, z, y, g, list(range(0, 601, 50)))
    opts = CheckOptions(fd="full")
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    state = {"killed": False}

    def progress(done, total):
        if not state["killed"]:
            state["killed"] = True
            os.kill(victim, signal.SIGKILL)

    on_dask = run_on_dask(files, "rows", opts, client=client, progress=progress)
    assert state["killed"]
    assert on_dask == sh.run_shards(files, "rows", opts)
    assert [s.ok for s in on_dask.shards].count(False) == 1
    client.wait_for_workers(2)


def test_ctrl_c_cancels_the_tasks(tmp_path, client):
    z, y, g = make_batch(n=600)
    files = write_rows(tmp_path, z, y, g, list(range(0, 601, 50)))
    mapper = DaskMapper(client)

    def progress(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sh.run_shards(files, "rows", CheckOptions(fd="full"), mapper, progress)
    assert all(f.status in ("cancelled", "finished") for f in mapper.futures)
    assert idle(client)


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_a_shard_that_fails_to_load(tmp_path, client, invoke, fault):
    """Exit 2, one line naming the shard; the run's other tasks are cancelled."""
    z, y, g = make_batch()
    write_rows(tmp_path, z, y, g, [0, 60, 120, 180, 240])
    if fault == "corrupt":
        (tmp_path / "logits_2.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
        name = "logits_2.npy"
    else:
        os.remove(tmp_path / "grad_3.npy")
        os.symlink(tmp_path / "gone.npy", tmp_path / "grad_3.npy")  # listed, not readable
        name = "grad_3.npy"
    res = invoke(["grad", tmp_path / "logits_*.npy", tmp_path / "labels_*.npy", "--grad",
                  tmp_path / "grad_*.npy", "--shards", "rows", "--scheduler",
                  client.scheduler.address])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and name in res.output
    assert idle(client)


def test_console_script_with_local_workers(tmp_path):
    """`ce-check grad ... --shards rows --workers 2` (its own LocalCluster) prints the report
    the single-process run prints."""
    exe = shutil.which("ce-check")
    assert exe is not None
    z, y, g = make_batch()
    g[10, 3] *= 1.01
    write_rows(tmp_path, z, y, g, [0, 100, 240])
    args = [exe, "grad", str(tmp_path / "logits_*.npy"), str(tmp_path / "labels_*.npy"),
            "--grad", str(tmp_path / "grad_*.npy"), "--shards", "rows", "--json"]
    here = subprocess.run(args, capture_output=True, text=True)
    there = subprocess.run(args + ["--workers", "2"], capture_output=True, text=True)
    assert here.returncode == there.returncode == 1, there.stderr
    assert json.loads(here.stdout) == json.loads(there.stdout)


@pytest.mark.parametrize("axis, cuts", [("rows", [0, 30, 45, 80]), ("cols", [0, 2, 7, 9])])
def test_binary_shards_on_dask(tmp_path, client, axis, cuts):
    """binary --shards on 2 worker processes: the single-process report, per shard and merged;
    the planted error at its global index, in the shard that holds it."""
    from ce_cli.verify.checks import check_binary
    from tests.test_shards_binary import assert_identical, bce_batch, write

    z, y, g = bce_batch((80, 9), seed=4)
    g[40, 5] *= 1.01
    files = write(tmp_path, z, y, g, cuts, axis)
    opts = CheckOptions(fd="off")
    on_dask = run_on_dask(files, axis, opts, client=client, kind="binary")
    assert on_dask == sh.run_shards(files, axis, opts, kind="binary")
    assert_identical(on_dask.report, check_binary(z, y, grad=g, options=opts), len(cuts) - 1)
    assert [s.index for s in on_dask.shards if not s.ok] == [1]
    grad_check = next(c for c in on_dask.report.checks if c.name == "grad_vs_reference")
    assert grad_check.worst[0].index == (40, 5)


def test_file_urls_on_process_workers(tmp_path, client):
    """Workers (other processes) read file:// URLs through fsspec: the report of the local
    paths, for row and vocabulary shards."""
    z, y, g = make_batch(n=300)
    g[222, 4] *= 1.001
    files = write_rows(tmp_path, z, y, g, [0, 100, 300])
    urls = [sh.ShardFiles(*(f"file://{p}" for p in (f.logits, f.labels, f.grad))) for f in files]
    opts = CheckOptions(fd="full")
    by_url = run_on_dask(urls, "rows", opts, client=client)
    local = sh.run_shards(files, "rows", opts)
    assert same_but_names(by_url.report, local.report)
    assert [s.ok for s in by_url.shards] == [True, False]
    assert by_url.report.inputs[0].source == f"logits file 'file://{files[0].logits}'"
    plan, _ = vocab_plan(tmp_path)
    vocab = [sh.ShardFiles(f"file://{s.files.logits}", f"file://{s.files.labels}")
             for s in plan.shards]
    assert same_but_names(run_on_dask(vocab, "vocab", CheckOptions(fd="off"), client=client).report,
                          sh.run_shards([s.files for s in plan.shards], "vocab",
                                        CheckOptions(fd="off")).report)


def same_but_names(a, b):
    """Equal reports but for the inputs' names (a URL and its local path)."""
    from dataclasses import replace

    return replace(a, inputs=()) == replace(b, inputs=()) and \
        [(i.role, i.shape, i.dtype) for i in a.inputs] == [(i.role, i.shape, i.dtype) for i in b.inputs]


def test_console_script_binary_listed_on_local_workers(tmp_path):
    """`ce-check binary a.npy b.npy y.npy --grad ga --grad gb --shards cols --workers 2` (its own
    LocalCluster) prints the single-process run's JSON."""
    from tests.test_shards_binary import bce_batch, write

    exe = shutil.which("ce-check")
    assert exe is not None
    z, y, g = bce_batch((60, 10), seed=6)
    g[5, 8] *= 1.01
    write(tmp_path, z, y, g, [0, 4, 10], "cols", shared_labels=True)
    args = [exe, "binary", str(tmp_path / "z_0.npy"), str(tmp_path / "z_1.npy"),
            str(tmp_path / "labels.npy"), "--grad", str(tmp_path / "g_0.npy"), "--grad",
            str(tmp_path / "g_1.npy"), "--shards", "cols", "--fd", "off", "--json"]
    here = subprocess.run(args, capture_output=True, text=True)
    there = subprocess.run(args + ["--workers", "2"], capture_output=True, text=True)
    assert here.returncode == there.returncode == 1, there.stderr
    data = json.loads(there.stdout)
    assert json.loads(here.stdout) == data
    grad = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")
    assert grad["worst"][0]["index"] == [5, 8]


def test_linear_row_shards_on_dask(tmp_path, client):
    """`linear --shards rows` on the cluster: the in-process merged report, field by field, and
    the single-process `check_linear` one; a planted dL/dH bug at its global row and a dL/dW bug
    at its vocabulary row (opened by the second mapped pass on the workers)."""
    from ce_cli.distributed.dask_run import run_linear_on_dask
    from ce_cli.verify.shards.linear_run import LinearBatch, run_linear_shards
    from tests.test_shards_linear import assert_same_linear, make_linear, run_both, write_linear

    arrays, grads = make_linear()
    grads["grad_hidden"][52, 3] += 0.05
    grads["grad_weight"][17, 0] -= 0.03
    cuts = [0, 30, 60, 90]
    files = write_linear(tmp_path, arrays, grads, cuts)
    opts = CheckOptions()  # `fd` auto: the shards' probes and partial loss differences too
    batch = LinearBatch(str(tmp_path / "weight.npy"), str(tmp_path / "bias.npy"))
    kw = {"grad_weight": str(tmp_path / "grad_weight.npy"),
          "grad_bias": str(tmp_path / "grad_bias.npy")}
    on_dask = run_linear_on_dask(files, opts, batch, client=client, **kw)
    assert on_dask == run_linear_shards(files, opts, batch, **kw)
    merged, single = run_both(tmp_path, arrays, grads, cuts, fd="auto")
    assert on_dask.report.fd_mode == "directional"
    assert_same_linear(on_dask.report, single, 3)
    checks = {c.name: c for c in on_dask.report.checks}
    assert checks["grad_hidden_vs_reference"].worst[0].index == (52, 3)
    assert checks["grad_weight_vs_reference"].worst[0].index == (17, 0)
    assert [s.ok for s in on_dask.shards] == [True, False, True]


def test_console_script_linear_on_local_workers(tmp_path):
    """`ce-check linear ... --shards rows --workers 2` prints what the in-process run prints."""
    from tests.test_shards_linear import make_linear, write_linear

    exe = shutil.which("ce-check")
    assert exe is not None
    arrays, grads = make_linear()
    grads["grad_weight"][5] *= 1.1
    write_linear(tmp_path, arrays, grads, [0, 40, 90])
    args = [exe, "linear", str(tmp_path / "hidden_*.npy"), str(tmp_path / "weight.npy"),
            str(tmp_path / "labels_*.npy"), "--bias", str(tmp_path / "bias.npy"),
            "--grad-hidden", str(tmp_path / "gh_*.npy"), "--grad-weight",
            str(tmp_path / "grad_weight.npy"), "--grad-bias", str(tmp_path / "grad_bias.npy"),
            "--shards", "rows", "--json"]
    here = subprocess.run(args, capture_output=True, text=True)
    there = subprocess.run(args + ["--workers", "2"], capture_output=True, text=True)
    assert here.returncode == there.returncode == 1, there.stderr
    assert json.loads(here.stdout) == json.loads(there.stdout)
    weight = next(c for c in json.loads(there.stdout)["checks"]
                  if c["name"] == "grad_weight_vs_reference")
    assert weight["worst"][0]["index"][0] == 5
