"""`ce-check binary` through the CLI: exit codes, --pos-weight as a number or a file, --two-class."""

import json

import numpy as np
import pytest

from tests.conftest import save, sigmoid


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 4)) * 3
    y = (rng.random((12, 4)) > 0.5).astype(np.float64)
    pw = np.array([1.0, 2.0, 0.5, 3.0])
    grad = ((1 + (pw - 1) * y) * sigmoid(x) - pw * y) / x.size
    loss = np.mean(pw * y * np.log1p(np.exp(-x)) + (1 - y) * np.log1p(np.exp(x)))
    paths = {name: save(tmp_path, f"{name}.npy", arr) for name, arr in
             (("x", x), ("y", y), ("pw", pw), ("grad", grad), ("loss", loss),
              ("sigma_only", sigmoid(x) / x.size), ("rows_mean", grad * x.size / 12))}
    return paths


def test_correct_gradient_passes(invoke, case):
    result = invoke(["binary", case["x"], case["y"], "--pos-weight", case["pw"], "--grad", case["grad"],
                     "--loss", case["loss"], "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "binary" and report["ok"]
    names = {c["name"] for c in report["checks"]}
    assert {"grad_vs_reference", "loss_vs_reference", "fd_vs_reference", "two_class_bridge"} <= names


@pytest.mark.parametrize("bug", ["sigma_only", "rows_mean"])
def test_bugs_fail_with_exit_1(invoke, case, bug):
    result = invoke(["binary", case["x"], case["y"], "--pos-weight", case["pw"], "--grad", case[bug]])
    assert result.exit_code == 1, result.output
    assert "gradient vs reference" in result.stdout and "FAIL" in result.stdout


def test_pos_weight_as_a_number(invoke, case, tmp_path):
    x, y = np.load(case["x"]), np.load(case["y"])
    grad = ((1 + (2.5 - 1) * y) * sigmoid(x) - 2.5 * y)  # reduction sum
    result = invoke(["binary", case["x"], case["y"], "--pos-weight", "2.5", "--reduction", "sum",
                     "--grad", save(tmp_path, "g25.npy", grad)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, needle", [
    (["--pos-weight", "abc"], "--pos-weight"),
    (["--pos-weight", "[1,2]"], "--pos-weight"),
])
def test_bad_pos_weight_is_an_input_error(invoke, case, args, needle):
    result = invoke(["binary", case["x"], case["y"], *args])
    assert result.exit_code == 2
    assert needle in result.stderr and "Traceback" not in result.output


def test_labels_outside_unit_interval(invoke, case, tmp_path):
    y = np.load(case["y"])
    y[3, 2] = 1.5
    result = invoke(["binary", case["x"], save(tmp_path, "bad_y.npy", y)])
    assert result.exit_code == 2
    assert "(3, 2)" in result.stderr and "[0, 1]" in result.stderr


def test_two_class_bridge_on_softmax_logits(invoke, tmp_path):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((20, 2))
    y = rng.integers(0, 2, 20)
    result = invoke(["binary", save(tmp_path, "z2.npy", z), save(tmp_path, "y2.npy", y), "--two-class",
                     "--json"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["two_class_bridge"]["ok"] and checks["two_class_bridge"]["total"] == 60
    assert "two classes" not in result.stderr


def test_grad_on_two_columns_mentions_binary(invoke, tmp_path):
    z = np.random.default_rng(2).standard_normal((6, 2))
    result = invoke(["grad", save(tmp_path, "z2.npy", z), save(tmp_path, "y2.npy", np.array([0, 1] * 3))])
    assert result.exit_code == 0
    assert "binary --two-class" in result.stderr


def test_binary_help(invoke):
    result = invoke(["binary", "--help"])
    assert result.exit_code == 0
    assert "BCEWithLogitsLoss" in result.stdout and "--pos-weight" in result.stdout


def test_pos_weight_file_keeps_its_shape_and_a_csv_column_is_a_vector(tmp_path, invoke):
    """A (C, 1) .npy pos_weight broadcasts along axis 1 of (N, C, d) logits, as in PyTorch; a
    CSV of K values written down one column is the K values (along the last axis)."""
    import json

    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 4))
    y = (rng.random((5, 3, 4)) < 0.4).astype(np.float64)
    pw = rng.uniform(0.5, 4.0, (3, 1))
    g = ((1.0 + (pw - 1.0) * y) / (1.0 + np.exp(-x)) - pw * y) / x.size
    for name, arr in (("x", x), ("y", y), ("g", g), ("pw", pw)):
        np.save(tmp_path / f"{name}.npy", arr)
    res = invoke(["binary", tmp_path / "x.npy", tmp_path / "y.npy", "--pos-weight",
                  tmp_path / "pw.npy", "--grad", tmp_path / "g.npy", "--json"])
    assert res.exit_code == 0, res.output
    pw4 = rng.uniform(0.5, 4.0, 4)
    (tmp_path / "pw4.csv").write_text("\n".join(repr(float(v)) for v in pw4) + "\n")
    g4 = ((1.0 + (pw4 - 1.0) * y) / (1.0 + np.exp(-x)) - pw4 * y) / x.size
    np.save(tmp_path / "g4.npy", g4)
    res = invoke(["binary", tmp_path / "x.npy", tmp_path / "y.npy", "--pos-weight",
                  tmp_path / "pw4.csv", "--grad", tmp_path / "g4.npy", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ok"]
