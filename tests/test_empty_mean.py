"""'mean' over nothing: every target ignored, or the targets' class weights summing to 0 - a 0/0.
PyTorch and MindSpore return NaN, Liger, Keras and PaddlePaddle 0, tinygrad a NaN loss and a NaN
gradient (fixtures/frameworks_semantics/empty_mean/, made by
scripts/frameworks/empty_mean_cases.py in each framework's venv; none is imported here).
`empty_mean` ("nan", the default, or "zero"; `--empty-mean`) says which a check expects."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ce_cli.errors import CeCheckError
from ce_cli.verify.checks import check_binary, check_grad
from ce_cli.verify.linear import check_linear

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "frameworks"))
import empty_mean_cases  # noqa: E402  (numpy only at import)

pytestmark = pytest.mark.usefixtures("both_kernels")

CASES = sorted(str(p) for p in (ROOT / "fixtures" / "frameworks_semantics" / "empty_mean").glob("*.npz"))
META = {p: empty_mean_cases.load(p)[1] for p in CASES}
CLEAN = [p for p in CASES if META[p]["framework"] != "tinygrad"]
OTHER = {"nan": "zero", "zero": "nan"}


def _check(path: str, empty_mean: str):
    arr, meta = empty_mean_cases.load(path)
    return check_grad(arr["logits"], arr["labels"], grad=arr["grad"], loss=arr["loss"],
                      weight=arr.get("weight"), ignore_index=meta["ignore_index"],
                      empty_mean=empty_mean)


def _failed(report) -> dict[str, str]:
    return {c.name: c.note for c in report.checks if not c.ok}


def test_the_frameworks_fixtures_are_there():
    seen = {(m["framework"], m["case"], m["returns"]) for m in META.values()}
    assert seen >= {("torch", "all_ignored", "nan"), ("torch", "zero_weights", "nan"),
                    ("mindspore", "all_ignored", "nan"), ("liger", "all_ignored", "zero"),
                    ("keras", "all_ignored", "zero"), ("paddle", "all_ignored", "zero"),
                    ("paddle", "zero_weights", "zero"), ("tinygrad", "all_ignored", "nan")}


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: Path(p).stem)
def test_each_framework_passes_with_its_convention_only(path):
    returns = META[path]["returns"]
    assert not _failed(_check(path, returns))
    failed = _failed(_check(path, OTHER[returns]))
    assert "loss_vs_reference" in failed, failed


def test_tinygrads_nan_gradient_fails_either_way():
    (path,) = [p for p in CASES if META[p]["framework"] == "tinygrad"]
    for empty_mean in ("nan", "zero"):
        failed = _failed(_check(path, empty_mean))
        assert "NaN/inf on one side only" in failed["grad_vs_reference"]


def _all_ignored(n: int = 6, c: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c)).astype(np.float32), np.full(n, -100), np.zeros((n, c), np.float32)


def test_zero_makes_the_loss_and_gradient_zero_and_says_so():
    z, y, g = _all_ignored()
    zero = check_grad(z, y, grad=g, loss=0.0, empty_mean="zero")
    assert zero.ok and zero.loss == 0.0
    assert any("empty mean 'zero'" in w and "are 0" in w for w in zero.warnings)
    nan = check_grad(z, y, grad=g, loss=0.0)
    assert not nan.ok and np.isnan(nan.loss)
    assert any("Liger, Keras and Paddle return 0" in w for w in nan.warnings)


def test_zero_weights_with_smoothing_are_zero_not_a_sum():
    """Smoothing gives the rows a loss even where the targets' weights are 0: 'zero' is still 0
    (0/0 made 0), not their sum."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, 6))
    y = np.array([0, 1, 0, 1])
    w = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 1.0])
    zeros = np.zeros_like(z)
    report = check_grad(z, y, grad=zeros, loss=0.0, weight=w, label_smoothing=0.1,
                        empty_mean="zero")
    assert report.ok, _failed(report)
    assert not check_grad(z, y, grad=zeros, loss=0.0, weight=w, label_smoothing=0.1).ok


def test_z_loss_value_is_zero_too():
    z, y, g = _all_ignored()
    report = check_grad(z, y, grad=g, loss=0.0, z_loss=1e-4, z_loss_value=0.0, empty_mean="zero")
    assert report.ok, _failed(report)


def test_unknown_value_and_binary_are_refused():
    z, y, _g = _all_ignored()
    with pytest.raises(CeCheckError, match="empty_mean"):
        check_grad(z, y, empty_mean="0")
    with pytest.raises(CeCheckError, match="empty_mean"):
        check_binary(z, (z > 0).astype(np.float32), empty_mean="zero")


def test_linear_takes_it():
    rng = np.random.default_rng(2)
    h, w = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    y = np.full(4, -100)
    zero = check_linear(h, w, y, grad_hidden=np.zeros_like(h), loss=0.0, empty_mean="zero")
    assert zero.ok, _failed(zero)
    assert not check_linear(h, w, y, grad_hidden=np.zeros_like(h), loss=0.0).ok


def test_cli_and_row_shards(tmp_path, invoke):
    z, y, g = _all_ignored(8)
    for name, arr in (("z0", z[:3]), ("z1", z[3:]), ("g0", g[:3]), ("g1", g[3:]), ("y", y),
                      ("z", z), ("g", g)):
        np.save(tmp_path / f"{name}.npy", arr)
    one = [str(tmp_path / "z.npy"), str(tmp_path / "y.npy"), "--grad", str(tmp_path / "g.npy")]
    sharded = [str(tmp_path / "z0.npy"), str(tmp_path / "z1.npy"), str(tmp_path / "y.npy"),
               "--grad", str(tmp_path / "g0.npy"), "--grad", str(tmp_path / "g1.npy"),
               "--shards", "rows"]
    for args in (one, sharded):
        zero = invoke(["grad", *args, "--loss", "0", "--empty-mean", "zero", "--json"])
        assert zero.exit_code == 0, zero.output
        data = json.loads(zero.stdout)
        assert data["loss"] == 0.0 and data["options"]["empty_mean"] == "zero"
        nan = invoke(["grad", *args, "--loss", "0", "--json"])
        assert nan.exit_code == 1 and json.loads(nan.stdout)["loss"] is None
    bad = invoke(["grad", *one, "--empty-mean", "none"])
    assert bad.exit_code == 2 and "nan or zero" in bad.output
