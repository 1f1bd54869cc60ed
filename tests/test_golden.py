"""Golden outputs: every fixture case through `--json` of every command, against stored JSON.

The stored files (tests/golden/) were written before the code was reorganised; the JSON must
stay the same. Only keys present in the stored file are compared, so a field deliberately added
later does not break it; a field deliberately changed means regenerating the file in the commit
that changes it (`CE_CHECK_GOLDEN=write python -m pytest tests/test_golden.py`).

`CE_CHECK_GOLDEN=exact` compares every number bit for bit (use it on the machine that wrote the
files, around a refactor). By default numbers compare to 1e-6 relative, and the sizes of rounding
errors (which differ between CPUs' exp and log) only where a check failed, since there they
measure a planted bug, not rounding.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.conftest import FIXTURES

GOLDEN = Path(__file__).resolve().parent / "golden"
MODE = os.environ.get("CE_CHECK_GOLDEN", "")
PARITY = FIXTURES / "parity"
BINARY = FIXTURES / "binary"
EXAMPLE = FIXTURES / "example"
# rounding-error sizes: machine-dependent on passing checks
ROUNDING_KEYS = {"max_abs_err", "max_rel_err", "abs_err", "got", "grad_max_abs", "grad_max_rel",
                 "loss_abs", "loss_rel", "grad_ratio", "loss_ratio", "worst", "errors"}
# not outputs of the computation: which kernel ran (CPU-dependent), wall-clock times
VOLATILE_KEYS = {"kernel", "seconds", "elapsed"}


def _grad_cases() -> dict[str, list[str]]:
    cases = {}
    for name, c in json.loads((PARITY / "cases.json").read_text()).items():
        f = str(PARITY / c["file"])
        args = ["grad", f"{f}:logits", f"{f}:labels", "--grad", f"{f}:grad", "--loss", f"{f}:loss",
                "--reduction", c["reduction"], "--ignore-index", str(c["ignore_index"]),
                "--label-smoothing", str(c["label_smoothing"]), "--class-axis", str(c["class_axis"])]
        if c["weighted"]:
            args += ["--weight", f"{f}:weight"]
        cases[f"grad_{name}"] = args
    ex = [str(EXAMPLE / "logits.npy"), str(EXAMPLE / "labels.npy")]
    cases["grad_example"] = ["grad", *ex, "--grad", str(EXAMPLE / "grad.npy"),
                             "--loss", str(EXAMPLE / "loss.npy")]
    cases["grad_example_bad"] = ["grad", *ex, "--grad", str(EXAMPLE / "grad_bad.npy")]
    for fd in ("full", "directional", "sample", "off"):
        cases[f"grad_example_bad_fd_{fd}"] = ["grad", *ex, "--grad", str(EXAMPLE / "grad_bad.npy"),
                                              "--fd", fd, "--samples", "40", "--seed", "3"]
        cases[f"grad_example_fd_{fd}"] = ["grad", *ex, "--grad", str(EXAMPLE / "grad.npy"), "--fd", fd]
    cases["grad_example_f32_precision"] = ["grad", *ex, "--grad", str(EXAMPLE / "grad.npy"),
                                           "--precision", "f32", "--rtol", "1e-6", "--atol", "1e-9",
                                           "--floor-factor", "8", "--worst", "2"]
    cases["grad_example_loss_number"] = ["grad", *ex, "--loss", "4.19"]
    return cases


def _binary_cases() -> dict[str, list[str]]:
    cases = {}
    for name, c in json.loads((BINARY / "cases.json").read_text()).items():
        f = str(BINARY / c["file"])
        args = ["binary", f"{f}:logits", f"{f}:labels", "--grad", f"{f}:grad", "--loss", f"{f}:loss",
                "--reduction", c["reduction"]]
        if c["two_class"]:
            args.append("--two-class")
        if c["has_weight"]:
            args += ["--weight", f"{f}:weight"]
        if c["has_pos_weight"]:
            args += ["--pos-weight", f"{f}:pos_weight"]
        cases[f"binary_{name}"] = args
    return cases


def _other_cases() -> dict[str, list[str]]:
    ex = [str(EXAMPLE / "logits.npy"), str(EXAMPLE / "labels.npy")]
    return {
        "explain_example_row0": ["explain", *ex, "--row", "0"],
        "explain_inline": ["explain", "--logits", "2.0,1.0,0.1", "--label", "0", "--compare-mse"],
        "explain_inline_target_steps": ["explain", "--logits", "3,-1,0.5,2", "--target",
                                        "0.1,0.2,0.3,0.4", "--steps", "--entry", "2"],
        "explain_binary": ["explain", "--kind", "binary", "--logits", "1.5", "--label", "1",
                           "--compare-mse", "--steps"],
        "stress_multiclass": ["stress", "--dtypes", "f16,f32,f64", "--scales", "1,100,1e4"],
        "stress_binary": ["stress", "--kind", "binary", "--dtypes", "f32,f64", "--scales", "1,1e3"],
        "stress_impl": ["stress", "--impl", "ce_cli.stress:naive_softmax_ce", "--dtypes", "f32",
                        "--scales", "1,100", "--scenarios", "spread,far-label"],
    }


def _batch_manifest(tmp: Path) -> Path:
    ex = EXAMPLE
    b = BINARY / "weight_pos_weight_sum.npz"
    lines = [
        {"name": "ok", "kind": "multiclass", "logits": str(ex / "logits.npy"),
         "labels": str(ex / "labels.npy"), "grad": str(ex / "grad.npy"), "loss": str(ex / "loss.npy")},
        {"name": "bad", "kind": "multiclass", "logits": str(ex / "logits.npy"),
         "labels": str(ex / "labels.npy"), "grad": str(ex / "grad_bad.npy"), "precision": "f32"},
        {"name": "bin", "kind": "binary", "logits": f"{b}:logits", "labels": f"{b}:labels",
         "grad": f"{b}:grad", "weight": f"{b}:weight", "pos_weight": f"{b}:pos_weight",
         "reduction": "sum"},
        {"name": "missing", "kind": "multiclass", "logits": str(tmp / "nope.npy"),
         "labels": str(ex / "labels.npy")},
        {"name": "badkey", "kind": "binary", "logits": str(ex / "logits.npy"),
         "labels": str(ex / "labels.npy"), "ignore_index": 3},
    ]
    path = tmp / "cases.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


ALL = {**_grad_cases(), **_binary_cases(), **_other_cases(), "batch": ["batch"]}


def _normalise(text: str, names: dict[str, str]) -> object:
    for path, name in names.items():
        text = text.replace(json.dumps(path)[1:-1], name)
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else lines


def _compare(stored, got, where: str, failed: bool = False, rounding: bool = False) -> None:
    """Every key of `stored` must be in `got` with the same value (new keys are allowed).

    `failed`: inside a failing check (the nearest "ok" is false); `rounding`: under a key whose
    numbers are error sizes, which only a planted bug makes machine-independent."""
    if rounding and not failed and MODE != "exact":
        return
    if isinstance(stored, dict):
        assert isinstance(got, dict), f"{where}: expected an object, got {got!r}"
        if isinstance(stored.get("ok"), bool):
            failed = not stored["ok"]
        for key, value in stored.items():
            assert key in got, f"{where}: key {key!r} is gone"
            if key not in VOLATILE_KEYS:
                _compare(value, got[key], f"{where}.{key}", failed, rounding or key in ROUNDING_KEYS)
    elif isinstance(stored, list):
        assert isinstance(got, list) and len(got) == len(stored), f"{where}: {stored!r} != {got!r}"
        for i, (a, b) in enumerate(zip(stored, got)):
            _compare(a, b, f"{where}[{i}]", failed, rounding)
    elif MODE == "exact" or not isinstance(stored, float) or not isinstance(got, (int, float)):
        assert stored == got and type(stored) is type(got), f"{where}: {stored!r} != {got!r}"
    elif not rounding:
        assert math.isclose(stored, got, rel_tol=1e-6, abs_tol=1e-300), f"{where}: {stored!r} != {got!r}"
    elif abs(stored) > 1e-9:
        assert math.isclose(stored, got, rel_tol=1e-3), f"{where}: {stored!r} != {got!r}"


@pytest.mark.parametrize("name", sorted(ALL))
def test_golden(name, invoke, tmp_path, monkeypatch):
    args = ALL[name]
    names = {str(FIXTURES): "<fixtures>", str(tmp_path): "<tmp>"}
    if name == "batch":
        args = ["batch", str(_batch_manifest(tmp_path))]
    else:
        args = [*args, "--json"]
    monkeypatch.chdir(tmp_path)
    result = invoke(args)
    assert result.exit_code in ((0, 1, 2) if name == "batch" else (0, 1)), result.output
    got = _normalise(result.stdout, names)
    path = GOLDEN / f"{name}.json"
    if MODE == "write":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps({"exit_code": result.exit_code, "output": got}, indent=1,
                                   sort_keys=True) + "\n")
        return
    stored = json.loads(path.read_text())
    assert result.exit_code == stored["exit_code"]
    _compare(stored["output"], got, name)
