"""`--threads N` / `CheckOptions.threads`: the kernel's thread count for one check (issue #15).

It overrides CE_CHECK_THREADS for that check only, reaches both kernels (the compiled kernel's
rows and the numpy kernel's pool read `default_threads()`), and changes no bit of the report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ce_cli import check_binary, check_grad
from ce_cli.errors import CeCheckError
from ce_cli.kernels.compiled import default_threads, use_threads
from ce_cli.verify.options import CheckOptions

N, C = 96, 700  # 67,200 entries: the compiled kernel splits a chunk over up to 4 threads


def _problem(tmp_path, kind: str):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((N, C)).astype(np.float32) * 3
    if kind == "binary":
        y = (rng.random((N, C)) < 0.1).astype(np.float32)
        g = ((1 / (1 + np.exp(-z.astype(np.float64))) - y) / y.size).astype(np.float32)
    else:
        y = rng.integers(0, C, N)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        g = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        g[np.arange(N), y] -= 1
        g /= N
    g[7, 11] *= 1.5  # one wrong entry: the worst-entry lists and counts are compared too
    for name, arr in (("z", z), ("y", y), ("g", g)):
        np.save(tmp_path / f"{name}.npy", arr)
    return z, y, g


@pytest.mark.parametrize("kind", ["grad", "binary"])
def test_cli_report_is_the_same_for_any_thread_count(tmp_path, invoke, both_kernels, kind):
    _problem(tmp_path, kind)
    args = [kind, tmp_path / "z.npy", tmp_path / "y.npy", "--grad", tmp_path / "g.npy", "--json"]
    outs = []
    for threads in (1, 2, 3):
        res = invoke([*args, "--threads", threads], env={"CE_CHECK_THREADS": "1"})
        assert res.exit_code == 1, res.output
        outs.append(res.stdout)
    assert outs[0] == outs[1] == outs[2]
    checks = {c["name"]: c for c in json.loads(outs[0])["checks"]}
    assert checks["grad_vs_reference"]["worst"][0]["index"] == [7, 11]


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_cli_refuses_a_bad_thread_count(tmp_path, invoke, bad):
    _problem(tmp_path, "grad")
    res = invoke(["grad", tmp_path / "z.npy", tmp_path / "y.npy", "--threads", bad])
    assert res.exit_code == 2
    assert "--threads" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("check", [check_grad, check_binary], ids=["grad", "binary"])
def test_the_count_reaches_the_kernels_for_that_check_only(tmp_path, both_kernels, monkeypatch, check):
    """During the check default_threads() (what both kernels read) is `threads`; before and
    after it is CE_CHECK_THREADS again."""
    monkeypatch.setenv("CE_CHECK_THREADS", "2")
    z, y, g = _problem(tmp_path, "binary" if check is check_binary else "grad")
    seen: list[int] = []
    check(z, y, grad=g, threads=5, progress=lambda done, total: seen.append(default_threads()))
    assert seen and set(seen) == {5}
    assert default_threads() == 2
    seen.clear()
    check(z, y, grad=g, progress=lambda done, total: seen.append(default_threads()))
    assert set(seen) == {2}


def test_use_threads_nests_and_restores():
    outer = default_threads()
    with use_threads(3):
        assert default_threads() == 3
        with use_threads(None):  # no setting: the enclosing one stays
            assert default_threads() == 3
        with use_threads(1):
            assert default_threads() == 1
        assert default_threads() == 3
    assert default_threads() == outer


def test_options_refuse_fewer_than_one_thread():
    with pytest.raises(CeCheckError, match="`threads`"):
        CheckOptions(threads=0)
