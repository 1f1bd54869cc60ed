"""Errors in the user's words: one line, no numpy reprs, no validator phrasing, a JSON error object
on stdout with --json, a hint for the other class axis, bool labels shown as bool, notes as notes."""

import json

import numpy as np
import pytest

from tests.conftest import FIXTURES, save

EX = FIXTURES / "example"
LOGITS, LABELS = str(EX / "logits.npy"), str(EX / "labels.npy")
JARGON = ("Value error", "Input should be", "np.float64", "np.int64", "Traceback")


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-check: error: "), result.stderr
    for word in JARGON:
        assert word not in lines[0]
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--reduction", "avg"], "--reduction: 'avg' is not one of mean, sum or none"),
    (["--fd", "x"], "--fd: 'x' is not one of auto, full, directional, sample or off"),
    (["--samples", "x"], "--samples: expected a whole number"),
    (["--rtol", "abc"], "--rtol: expected a number"),
    (["--seed", "-1"], "--seed: expected >= 0"),
    (["--rtol", "-1"], "--rtol: must be a finite number >= 0"),
    (["--rtol", "nan"], "--rtol: must be a finite number >= 0"),
    (["--atol", "inf"], "--atol: must be a finite number >= 0"),
    (["--floor-factor", "-2"], "--floor-factor: must be a finite number >= 0"),
    (["--samples", "0"], "--samples: must be at least 1"),
    (["--worst", "-1"], "--worst: must be >= 0"),
    (["--label-smoothing", "2"], "--label-smoothing: must be in [0, 1]"),
])
def test_every_option_is_validated_on_its_own(invoke, args, says):
    """No --grad or --loss: a bad option still exits 2 with a plain line."""
    line = one_error_line(invoke(["grad", LOGITS, LABELS, *args]))
    assert says in line


def test_other_commands_map_validator_wording(invoke):
    assert "--kind: 'x' is not one of multiclass or binary" in one_error_line(
        invoke(["stress", "--kind", "x"]))
    assert "--jobs: expected >= 0" in one_error_line(invoke(["batch", "m.jsonl", "--jobs", "-1"]))


def test_missing_argument_names_the_metavar(invoke):
    assert "missing argument 'LABELS'" in one_error_line(invoke(["grad", LOGITS]))


def test_non_integer_label_has_no_numpy_repr(invoke, tmp_path):
    labels = save(tmp_path, "y.npy", np.array([4.5] + [1.0] * 31))
    line = one_error_line(invoke(["grad", LOGITS, labels]))
    assert "label 4.5 at index (0,)" in line


def test_binary_label_outside_unit_interval_has_no_repr(invoke, tmp_path):
    z = save(tmp_path, "z.npy", np.zeros(3))
    y = save(tmp_path, "y.npy", np.array([0.0, 1.5, 1.0]))
    assert "label 1.5 at index (1,)" in one_error_line(invoke(["binary", z, y]))


def test_nchw_without_class_axis_suggests_the_flag(invoke, tmp_path):
    z = save(tmp_path, "z.npy", np.zeros((2, 3, 4, 4), np.float32))
    y = save(tmp_path, "y.npy", np.zeros((2, 4, 4), np.int64))
    assert "with --class-axis 1 the classes are axis 1" in one_error_line(invoke(["grad", z, y]))
    assert invoke(["grad", z, y, "--class-axis", "1"]).exit_code == 0


def test_class_axis_1_on_channels_last_suggests_the_default(invoke, tmp_path):
    z = save(tmp_path, "z.npy", np.zeros((2, 4, 4, 3), np.float32))
    y = save(tmp_path, "y.npy", np.zeros((2, 4, 4), np.int64))
    line = one_error_line(invoke(["grad", z, y, "--class-axis", "1"]))
    assert "with --class-axis -1 (the default)" in line


def test_shape_error_without_a_fitting_axis_gives_no_hint(invoke, tmp_path):
    y = save(tmp_path, "y.npy", np.zeros(7, np.int64))
    assert "class-axis" not in one_error_line(invoke(["grad", LOGITS, y]))


@pytest.mark.parametrize("args, code", [
    (["grad", LOGITS, LOGITS + ".missing", "--json"], "input"),
    (["grad", LOGITS, LABELS, "--json", "--samples", "0"], "input"),
    (["grad", LOGITS, LABELS, "--json", "--reduction", "avg"], "usage"),
    (["binary", LOGITS, LABELS, "--json"], "input"),
    (["explain", "--json", "--logits", "1,2"], "input"),
])
def test_json_input_error_writes_the_error_object(invoke, args, code):
    result = invoke(args)
    assert result.exit_code == 2
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    doc = json.loads(lines[0])
    assert doc["ok"] is False and doc["error"]["code"] == code
    assert doc["error"]["message"] in result.stderr


def test_without_json_stdout_stays_empty_on_error(invoke):
    assert invoke(["grad", LOGITS, LABELS, "--samples", "0"]).stdout == ""


def test_bool_labels_are_warned_and_shown_as_bool(invoke, tmp_path):
    y = save(tmp_path, "y.npy", np.arange(32) % 2 == 0)
    result = invoke(["grad", LOGITS, y, "--json"])
    assert result.exit_code == 0
    assert "bool labels, read as class indices 0 (False) and 1 (True)" in result.stderr
    labels = next(i for i in json.loads(result.stdout)["inputs"] if i["role"] == "labels")
    assert labels["dtype"] == "bool"


def test_bool_binary_labels_are_accepted_silently(invoke, tmp_path):
    z = save(tmp_path, "z.npy", np.linspace(-2, 2, 6))
    y = save(tmp_path, "y.npy", np.array([True, False] * 3))
    result = invoke(["binary", z, y])
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert "bool" in result.stdout


def test_two_classes_is_a_note_not_a_warning(invoke, tmp_path):
    z = save(tmp_path, "z.npy", np.array([[1.0, -1.0], [0.5, 0.2]]))
    y = save(tmp_path, "y.npy", np.array([0, 1]))
    result = invoke(["grad", z, y])
    assert result.exit_code == 0
    assert "ce-check: note: two classes" in result.stderr
    assert "warning" not in result.stderr
