"""Every command's --json output validates against its JSON Schema in docs/schema/, taken from
real runs; the options echo what was used; nulls and numbers never contradict each other."""

import json

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
from referencing import Registry, Resource  # noqa: E402  (a jsonschema dependency)

from tests.conftest import FIXTURES, ROOT, save  # noqa: E402

SCHEMAS = {p.stem: json.loads(p.read_text()) for p in (ROOT / "docs" / "schema").glob("*.json")}
REGISTRY = Registry().with_resources(
    (s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values())
EX = FIXTURES / "example"
LOGITS, LABELS, GRAD = (str(EX / n) for n in ("logits.npy", "labels.npy", "grad.npy"))


def validate(doc: dict, schema: str) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[schema])
    jsonschema.Draft202012Validator(SCHEMAS[schema], registry=REGISTRY).validate(doc)


def run_json(invoke, args, codes=(0, 1)):
    result = invoke(args)
    assert result.exit_code in codes, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("args", [
    ["grad", LOGITS, LABELS, "--grad", GRAD],
    ["grad", LOGITS, LABELS, "--grad", str(EX / "grad_bad.npy"), "--loss", str(EX / "loss.npy")],
    ["grad", LOGITS, LABELS, "--fd", "sample"],
    ["binary", str(FIXTURES / "binary" / "soft_labels_mean.npz") + ":logits",
     str(FIXTURES / "binary" / "soft_labels_mean.npz") + ":labels"],
])
def test_check_reports_validate(invoke, args):
    validate(run_json(invoke, [*args, "--json"]), "report")


def test_options_echo_the_class_axis_given_and_resolved(invoke, tmp_path):
    doc = run_json(invoke, ["grad", LOGITS, LABELS, "--json"])
    assert doc["options"]["class_axis"] == -1 and doc["options"]["class_axis_resolved"] == 1
    z = save(tmp_path, "z.npy", np.zeros((2, 3, 4), np.float32))
    y = save(tmp_path, "y.npy", np.zeros((2, 4), np.int64))
    doc = run_json(invoke, ["grad", z, y, "--class-axis", "1", "--json"])
    assert doc["options"]["class_axis"] == 1 and doc["options"]["class_axis_resolved"] == 1


def test_nan_gradient_has_no_relative_error_beside_null(invoke, tmp_path):
    g = np.load(GRAD)
    g[0, 0] = np.nan
    doc = run_json(invoke, ["grad", LOGITS, LABELS, "--grad", save(tmp_path, "g.npy", g),
                            "--json"])
    validate(doc, "report")
    bad = next(c for c in doc["checks"] if c["name"] == "grad_vs_reference")
    assert bad["max_abs_err"] is None and bad["max_rel_err"] is None


def test_explain_validates(invoke):
    validate(run_json(invoke, ["explain", "--logits", "2,1,0.1", "--label", "0", "--json"]),
             "explain")
    validate(run_json(invoke, ["explain", "--kind", "binary", "--logits", "1.5", "--label", "1",
                               "--json"]), "explain")


def test_stress_validates_and_nan_cells_are_null(invoke):
    doc = run_json(invoke, ["stress", "--dtypes", "f16,f32", "--scales", "1,1e4", "--json"])
    validate(doc, "stress")
    nan_cells = [c for c in doc["cells"] if c["errors"]["grad_max_abs"] is None]
    assert nan_cells, "the built-in sweep at 1e4 in f16 has NaN cells"
    assert all(c["errors"]["grad_max_rel"] is None for c in nan_cells)


def test_batch_lines_validate(invoke, tmp_path):
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text(
        json.dumps({"name": "ok", "kind": "multiclass", "logits": LOGITS, "labels": LABELS,
                    "grad": GRAD}) + "\n"
        + json.dumps({"name": "missing", "kind": "multiclass", "logits": "nope.npy",
                      "labels": LABELS}) + "\n")
    result = invoke(["batch", str(manifest)])
    assert result.exit_code == 2
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["status"] for d in lines] == ["pass", "error"]
    for doc in lines:
        validate(doc, "batch")


@pytest.mark.parametrize("args", [
    ["grad", LOGITS, LABELS, "--json", "--reduction", "avg"],
    ["grad", LOGITS, "nope.npy", "--json"],
    ["explain", "--json"],
    ["stress", "--json", "--timeout", "0"],
])
def test_error_objects_validate(invoke, args):
    validate(run_json(invoke, args, codes=(2,)), "error")


def test_every_command_has_a_schema():
    assert {"report", "error", "batch", "explain", "stress"} <= set(SCHEMAS)
