"""The Python API: `ce_cli.check_grad` / `check_binary` agree with the CLI on the same inputs, and
`ce_cli.testing.assert_ce_grad` / `assert_ce_binary` pass or raise with the worst-entries message."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ce_cli
from ce_cli.report.render import failure_message, report_to_dict
from ce_cli.testing import assert_ce_binary, assert_ce_grad
from tests.conftest import FIXTURES, save

EX = FIXTURES / "example"
BCE = FIXTURES / "binary" / "multilabel_hard_mean.npz"


def example():
    return {name: np.load(EX / f"{name}.npy") for name in ("logits", "labels", "grad", "grad_bad", "loss")}


def bce():
    with np.load(BCE) as d:
        return {k: d[k] for k in d.files}


def without_sources(data: dict) -> dict:
    """The report minus the input descriptions ("logits file 'x.npy'" on the CLI, "logits" in the
    API): everything that was established must be identical."""
    data = dict(data)
    data["inputs"] = [{k: v for k, v in i.items() if k != "source"} for i in data["inputs"]]
    return data


# --- API and CLI agree -----------------------------------------------------------------------

def test_check_grad_agrees_with_the_cli(invoke, tmp_path):
    ex = example()
    weight = np.linspace(0.5, 2.0, 10)
    args = ["grad", EX / "logits.npy", EX / "labels.npy", "--grad", EX / "grad_bad.npy",
            "--weight", save(tmp_path, "w.npy", weight), "--reduction", "sum",
            "--label-smoothing", "0.1", "--rtol", "1e-3", "--json"]
    result = invoke(args)
    assert result.exit_code in (0, 1), result.output
    cli = json.loads(result.stdout)
    report = ce_cli.check_grad(ex["logits"], ex["labels"], grad=ex["grad_bad"], weight=weight,
                               reduction="sum", label_smoothing=0.1, rtol=1e-3)
    assert without_sources(report_to_dict(report)) == without_sources(cli)
    assert report.ok is cli["ok"]


def test_check_grad_failure_agrees_with_the_cli(invoke):
    ex = example()
    result = invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--grad", EX / "grad_bad.npy",
                     "--loss", EX / "loss.npy", "--json"])
    assert result.exit_code == 1
    report = ce_cli.check_grad(ex["logits"], ex["labels"], grad=ex["grad_bad"], loss=ex["loss"])
    assert without_sources(report_to_dict(report)) == without_sources(json.loads(result.stdout))
    assert not report.ok


def test_check_binary_agrees_with_the_cli(invoke):
    d = bce()
    result = invoke(["binary", f"{BCE}:logits", f"{BCE}:labels", "--grad", f"{BCE}:grad",
                     "--loss", f"{BCE}:loss", "--pos-weight", "2", "--json"])
    cli = json.loads(result.stdout)
    report = ce_cli.check_binary(d["logits"], d["labels"], grad=d["grad"], loss=d["loss"],
                                 pos_weight=np.array(2.0))
    assert without_sources(report_to_dict(report)) == without_sources(cli)
    assert result.exit_code == (0 if report.ok else 1)
    assert not report.ok  # torch's gradient was made without pos_weight


# --- ce_cli.testing --------------------------------------------------------------------------

def test_assert_ce_grad_passes_on_a_correct_gradient():
    ex = example()
    report = assert_ce_grad(ex["logits"], ex["labels"], ex["grad"], loss=ex["loss"])
    assert report.ok and report.kind == "multiclass"


def test_assert_ce_grad_names_the_worst_entry():
    ex = example()
    with pytest.raises(AssertionError) as info:
        assert_ce_grad(ex["logits"], ex["labels"], ex["grad_bad"])
    message = str(info.value)
    assert "Mismatched elements: 1 / 320 (0.3%)" in message
    assert "Greatest absolute difference: 8.244e-07 at index (7, 3)" in message
    assert "Greatest relative difference: 1.000e-02 at index (7, 3)" in message
    worst = [line for line in message.splitlines() if line.strip().startswith("(7, 3)")]
    assert worst and worst[0].rstrip().endswith("✗")
    # the same text the JUnit report carries, from the same report
    report = ce_cli.check_grad(ex["logits"], ex["labels"], grad=ex["grad_bad"])
    assert message == failure_message(report)


def test_assertion_message_starts_with_the_verdict():
    ex = example()
    with pytest.raises(AssertionError) as info:
        assert_ce_grad(ex["logits"], ex["labels"], ex["grad_bad"])
    report = ce_cli.check_grad(ex["logits"], ex["labels"], grad=ex["grad_bad"])
    first, second = str(info.value).splitlines()[:2]
    assert report.verdict.startswith("FAIL — grad_vs_reference: 1/320 entries")
    assert first == report.verdict
    assert second.startswith("multiclass check failed: grad_vs_reference, fd_vs_grad (shape (32, 10)")


@pytest.mark.parametrize("assertion", ["grad", "binary"])
def test_assertions_hide_their_own_frames(assertion):
    """pytest leaves out frames whose locals set `__tracebackhide__`: every frame of
    ce_cli/testing.py does, so the traceback ends at the test's own call."""
    if assertion == "grad":
        ex = example()
        call = lambda: assert_ce_grad(ex["logits"], ex["labels"], ex["grad_bad"])  # noqa: E731
    else:
        d = bce()
        call = lambda: assert_ce_binary(d["logits"], d["labels"], -d["grad"])  # noqa: E731
    with pytest.raises(AssertionError) as info:
        call()
    own = [e for e in info.traceback if e.path == Path(ce_cli.testing.__file__)]
    assert len(own) == 2  # assert_ce_* and _assert
    assert all(e.frame.f_locals.get("__tracebackhide__") is True for e in own)
    shown = info.traceback.filter(info)
    assert all(e.path != Path(ce_cli.testing.__file__) for e in shown)


def test_assert_ce_grad_takes_the_options():
    ex = example()
    with pytest.raises(AssertionError, match="grad_vs_reference"):
        assert_ce_grad(ex["logits"], ex["labels"], ex["grad"], reduction="sum")
    assert_ce_grad(ex["logits"], ex["labels"], ex["grad_bad"], rtol=0.02)  # 1% is within 2%


def test_assert_ce_grad_on_a_wrong_loss_only():
    ex = example()
    with pytest.raises(AssertionError) as info:
        assert_ce_grad(ex["logits"], ex["labels"], loss=4.2)
    assert "loss_vs_reference" in str(info.value) and "at index ()" in str(info.value)


def test_assert_ce_grad_bad_input_is_not_an_assertion():
    ex = example()
    labels = ex["labels"].copy()
    labels[5] = 10
    with pytest.raises(ce_cli.CeCheckError, match=r"label 10 at index \(5,\)"):
        assert_ce_grad(ex["logits"], labels, ex["grad"])


def test_assert_ce_binary():
    d = bce()
    assert assert_ce_binary(d["logits"], d["labels"], d["grad"], loss=d["loss"]).ok
    bad = d["grad"].copy()
    bad[3, 2] *= 1.001
    with pytest.raises(AssertionError) as info:
        assert_ce_binary(d["logits"], d["labels"], bad)
    assert "binary check failed" in str(info.value)
    assert "at index (3, 2)" in str(info.value)


class FakeTensor:
    """What the assertion needs of a torch tensor: detach(), cpu(), then the array protocol."""

    def __init__(self, arr, on_device=True, requires_grad=True):
        self.arr, self.on_device, self.requires_grad = arr, on_device, requires_grad

    def detach(self):
        return FakeTensor(self.arr, self.on_device, requires_grad=False)

    def cpu(self):
        return FakeTensor(self.arr, on_device=False, requires_grad=self.requires_grad)

    def __array__(self, dtype=None, copy=None):
        if self.on_device or self.requires_grad:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad")
        return np.asarray(self.arr, dtype=dtype)


def test_tensors_are_detached_and_copied_to_the_cpu():
    ex = example()
    assert_ce_grad(FakeTensor(ex["logits"]), FakeTensor(ex["labels"]), FakeTensor(ex["grad"]),
                   loss=FakeTensor(ex["loss"]))


def test_import_ce_cli_stays_light():
    code = ("import sys, ce_cli; ce_cli.testing.assert_ce_grad; ce_cli.testing.assert_ce_binary; "
            "print(sorted(m for m in ('rich', 'typer', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


CHECKS = {
    "index": lambda z, y, g: ce_cli.check_grad(z, y.argmax(axis=1), grad=g),
    "probs": lambda z, y, g: ce_cli.check_grad(z, y / y.sum(axis=1, keepdims=True), grad=g),
    "semantics": lambda z, y, g: ce_cli.check_grad(z, y.argmax(axis=1), grad=g, z_loss=1e-4),
    "binary": lambda z, y, g: ce_cli.check_binary(z, y, grad=g, fd="sample"),
    "binary_full": lambda z, y, g: ce_cli.check_binary(z, y, grad=g, fd="full"),
}


@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("kernel", ["1", "0"])
def test_a_check_leaves_no_reference_cycle(name, kernel, monkeypatch):
    """A check's objects (problem, kernel, their arrays) are freed when its report is dropped,
    without the cyclic garbage collector, which large arrays do not prompt: checks in a loop
    hold one batch at a time (a problem <-> kernel cycle kept every batch until a collection:
    12 checks of 32 MB logits grew to 860 MB)."""
    import gc

    monkeypatch.setenv("CE_CHECK_FUSED", kernel)
    rng = np.random.default_rng(1)
    z = rng.standard_normal((16, 50))
    y = (rng.random((16, 50)) < 0.3).astype(np.float64)
    y[:, 0] = 1.0
    CHECKS[name](z, y, np.zeros_like(z))  # first use: lazy imports, caches
    gc.collect()
    gc.disable()
    try:
        CHECKS[name](z, y, np.zeros_like(z))
        assert gc.collect() == 0
    finally:
        gc.enable()
