"""`ce-check batch`: manifests with passing, failing and bad cases; exit codes; JSON lines; JUnit
XML parsed back; --fail-fast; --jobs; stdin manifests and relative paths."""

import json
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ce_cli.batch import runner as batch_mod
from ce_cli.batch.manifest import parse_manifest
from ce_cli.batch.runner import run_cases
from ce_cli.errors import CeCheckError
from tests.conftest import FIXTURES, softmax, strict_json

EX = FIXTURES / "example"


def strict_lines(text: str) -> list[dict]:
    """JSON lines, refusing NaN/Infinity (not JSON) and blank or partial lines."""
    assert text == "" or text.endswith("\n")
    return [strict_json(line) for line in text.splitlines()]


@pytest.fixture
def data(tmp_path) -> Path:
    """data/: a 16x5 multiclass case (good and bad gradients, bad labels) and an 8x3 binary one."""
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(7)
    z = rng.standard_normal((16, 5))
    y = rng.integers(0, 5, size=16)
    g = (softmax(z) - np.eye(5)[y]) / 16
    bad = g.copy()
    bad[3, 1] *= 1.01
    y_bad = y.copy()
    y_bad[2] = 9
    x = rng.standard_normal((8, 3))
    t = (rng.random((8, 3)) < 0.5).astype(np.float64)
    gb = (1 / (1 + np.exp(-x)) - t) / x.size
    for name, arr in {"z": z.astype(np.float32), "y": y, "g": g.astype(np.float32),
                      "g_bad": bad.astype(np.float32), "y_bad": y_bad, "x": x, "t": t,
                      "gb": gb, "y_ignored": np.full(16, -100)}.items():
        np.save(d / f"{name}.npy", arr)
    return d


def case(name, kind="multiclass", logits="data/z.npy", labels="data/y.npy", **keys) -> dict:
    return {"name": name, "kind": kind, "logits": logits, "labels": labels, **keys}


PASS = case("good", grad="data/g.npy")
FAIL = case("bad-grad", grad="data/g_bad.npy")
ERROR = case("bad-labels", labels="data/y_bad.npy", grad="data/g.npy")
BINARY = case("bce", kind="binary", logits="data/x.npy", labels="data/t.npy", grad="data/gb.npy")


def write(path: Path, cases, extra_lines=()) -> Path:
    lines = [json.dumps(c) if isinstance(c, dict) else c for c in cases]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


@pytest.fixture
def run(invoke, tmp_path, monkeypatch, data):
    """run(cases, *args) writes tmp/cases.jsonl and runs `ce-check batch` on it from tmp/."""
    monkeypatch.chdir(tmp_path)

    def _run(cases, *args, input=None, extra_lines=()):
        if cases is not None:
            write(tmp_path / "cases.jsonl", cases, extra_lines)
        return invoke(["batch", "cases.jsonl" if input is None else "-", *args], input=input)

    return _run


# --- the main scenario -----------------------------------------------------------------------

def test_pass_fail_and_bad_input(run, tmp_path):
    result = run([PASS, FAIL, ERROR, BINARY], "--junit-xml", "report.xml")
    assert result.exit_code == 2, result.output
    lines = strict_lines(result.stdout)
    assert [(r["name"], r["status"]) for r in lines] == [
        ("good", "pass"), ("bad-grad", "fail"), ("bad-labels", "error"), ("bce", "pass")]
    good, bad, err, bce = lines
    assert good["ok"] is True and good["kind"] == "multiclass" and good["shape"] == [16, 5]
    assert bce["ok"] is True and bce["kind"] == "binary"
    failed = [c for c in bad["checks"] if not c["ok"]]
    assert {c["name"] for c in failed} == {"grad_vs_reference", "fd_vs_grad"}
    assert failed[0]["worst"][0]["index"] == [3, 1]
    assert err == {"name": "bad-labels", "status": "error", "ok": False, "kind": "multiclass",
                   "error": err["error"]}
    assert "label 9 at index (2,)" in err["error"] and "data/y_bad.npy" in err["error"]
    # the summary on stderr, for humans
    assert "bad-grad" in result.stderr and "grad_vs_reference 1/80 at (3, 1)" in result.stderr
    assert "4 cases: 2 passed, 1 failed, 1 error" in result.stderr

    suite = ET.parse(tmp_path / "report.xml").getroot()
    assert suite.tag == "testsuites"
    (ts,) = suite.findall("testsuite")
    assert (ts.get("tests"), ts.get("failures"), ts.get("errors"), ts.get("skipped")) == ("4", "1", "1", "0")
    cases = ts.findall("testcase")
    assert [c.get("name") for c in cases] == ["good", "bad-grad", "bad-labels", "bce"]
    assert [c.get("classname") for c in cases] == ["ce-check.multiclass"] * 3 + ["ce-check.binary"]
    assert list(cases[0]) == [] and list(cases[3]) == []
    (failure,) = cases[1]
    assert failure.tag == "failure" and "grad_vs_reference" in failure.get("message")
    assert "Mismatched elements: 1 / 80" in failure.text and "at index (3, 1)" in failure.text
    (error,) = cases[2]
    assert error.tag == "error" and error.get("message") == err["error"] == error.text
    assert all(float(c.get("time")) >= 0 for c in cases)


@pytest.mark.parametrize("cases, code", [
    pytest.param([PASS, BINARY], 0, id="all-pass"),
    pytest.param([PASS, FAIL, BINARY], 1, id="a-fail"),
    pytest.param([FAIL, ERROR], 2, id="fail-and-error"),
    pytest.param([PASS, ERROR], 2, id="an-error"),
])
def test_exit_codes(run, cases, code):
    result = run(cases)
    assert result.exit_code == code, result.output
    assert len(strict_lines(result.stdout)) == len(cases)


def test_a_case_is_the_same_object_as_json(run, invoke, data):
    result = run([FAIL])
    (line,) = strict_lines(result.stdout)
    single = invoke(["grad", "data/z.npy", "data/y.npy", "--grad", "data/g_bad.npy", "--json"])
    assert single.exit_code == 1
    assert line == {"name": "bad-grad", "status": "fail", **json.loads(single.stdout)}


def test_options_reach_the_checks(run):
    cases = [
        case("sum-smooth-weighted", reduction="sum", label_smoothing=0.1, weight="data/w.csv"),
        case("rtol-widens", grad="data/g_bad.npy", rtol=0.02),
        case("precision", grad="data/g.npy", precision="bf16"),
        case("pos-weight-number", kind="binary", logits="data/x.npy", labels="data/t.npy", pos_weight=2.5),
        case("class-axis", logits="data/z.npy", labels="data/y.npy", class_axis=-1, ignore_index=0),
    ]
    Path("data/w.csv").write_text("1,2,3,4,5\n")  # one CSV row: flattened to C weights
    result = run(cases)
    assert result.exit_code == 0, result.output
    by_name = {r["name"]: r for r in strict_lines(result.stdout)}
    assert by_name["sum-smooth-weighted"]["reduction"] == "sum"
    assert by_name["sum-smooth-weighted"]["options"]["label_smoothing"] == 0.1
    assert by_name["sum-smooth-weighted"]["options"]["weighted"] is True
    assert "rtol 0.02" in by_name["rtol-widens"]["checks"][1]["rule"]
    assert by_name["precision"]["checks"][1]["rule"].startswith("bf16")
    assert by_name["pos-weight-number"]["options"]["pos_weighted"] is True
    assert by_name["pos-weight-number"]["ok"] is True
    assert by_name["class-axis"]["options"]["ignore_index"] == 0


def test_loss_as_number_or_file(run, data):
    from ce_cli import check_grad

    ref = check_grad(np.load(data / "z.npy"), np.load(data / "y.npy")).loss
    np.save(data / "loss.npy", np.float32(ref))
    typed = f"{ref:.5f}"
    off = f"{float(typed) + 3e-5:.5f}"  # beyond half a unit of the last digit

    def raw(name, number):  # the number as typed: json.dumps(float(...)) would drop trailing zeros
        return json.dumps(case(name, loss=0)).replace('"loss": 0', f'"loss": {number}')

    cases = [case("file", loss="data/loss.npy"), raw("typed", typed), case("typed-string", loss=typed),
             raw("typed-off", off), case("not-a-number", loss="data/missing.npy")]
    result = run(cases)
    lines = {r["name"]: r for r in strict_lines(result.stdout)}
    assert {n: r["status"] for n, r in lines.items()} == {
        "file": "pass", "typed": "pass", "typed-string": "pass", "typed-off": "fail",
        "not-a-number": "error"}
    assert lines["not-a-number"]["error"] == "loss file 'data/missing.npy': no such file"


def test_typed_loss_keeps_its_digits():
    """4.1915 in the manifest is compared to +-5e-5, as `--loss 4.1915` is (not to float equality)."""
    (spec,) = parse_manifest(json.dumps(case("x", loss=4.1915)) + "\n")
    assert spec.numbers == {"loss": "4.1915"}
    (spec,) = parse_manifest('{"name": "x", "kind": "multiclass", "logits": "a", "labels": "b", "loss": 4.19150}\n')
    assert spec.numbers == {"loss": "4.19150"}


def test_nan_loss_is_null_not_NaN(run):
    result = run([case("all-ignored", labels="data/y_ignored.npy")])
    (line,) = strict_lines(result.stdout)
    assert line["loss"] is None and line["status"] == "pass"
    assert ": NaN" not in result.stdout  # strict_lines refused it too; NaN only in the warning text
    assert "warning:" in result.stderr


def test_empty_mean_key(run):
    """Liger, Keras and Paddle return 0 for an all-ignored batch: `empty_mean: zero` passes it."""
    result = run([case("liger-like", labels="data/y_ignored.npy", loss=0, empty_mean="zero"),
                  case("torch-like", labels="data/y_ignored.npy", loss=0),
                  case("bad", empty_mean="0")])
    lines = {r["name"]: r for r in strict_lines(result.stdout)}
    assert {n: r["status"] for n, r in lines.items()} == {
        "liger-like": "pass", "torch-like": "fail", "bad": "error"}
    assert lines["liger-like"]["loss"] == 0.0
    assert "'empty_mean': must be one of nan, zero" in lines["bad"]["error"]


# --- invalid lines are errors, the rest runs --------------------------------------------------

INVALID = [
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "gard": "g"}',
     "line 2: unknown key 'gard'; did you mean 'grad'?"),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "colour": 1}',
     "line 2: unknown key 'colour' (known keys: name, kind"),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy"}', "line 2: missing key 'labels'"),
    ('{"name": "a", "kind": "softmax", "logits": "data/z.npy", "labels": "data/y.npy"}',
     "line 2: 'kind': must be \"multiclass\" or \"binary\", got \"softmax\""),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "pos_weight": 2}',
     "line 2: key 'pos_weight' applies to kind \"binary\", not \"multiclass\""),
    ('{"name": "a", "kind": "binary", "logits": "data/x.npy", "labels": "data/t.npy", "z_loss": 0.1}',
     "line 2: key 'z_loss' applies to kind \"multiclass\", not \"binary\""),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "reduction": "avg"}',
     "line 2: 'reduction': must be one of mean, sum, none, got \"avg\""),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "ignore_index": 1.5}',
     "line 2: 'ignore_index': must be an integer, got 1.5"),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "rtol": -1}',
     "line 2: 'rtol': must be a finite number >= 0, got -1"),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "rtol": "1e-3"}',
     "line 2: 'rtol': must be a finite number >= 0"),
    ('{"name": "a", "kind": "multiclass", "logits": 3, "labels": "data/y.npy"}',
     "line 2: 'logits': must be a path"),
    ('{"name": "a", "kind": "multiclass", "logits": "-", "labels": "data/y.npy"}',
     "line 2: 'logits': '-' (stdin) cannot be an input in a batch"),
    ('{"name": "", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy"}',
     "line 2: 'name': must be a non-empty string"),
    ('{"name": "good", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy"}',
     "line 2: duplicate name 'good' (also on line 1)"),
    ('{"name": "a", "name": "b", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy"}',
     "line 2: not valid JSON (duplicate key 'name')"),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", "loss": NaN}',
     "line 2: not valid JSON (NaN is not JSON"),
    ('{"name": "a", "kind": "multiclass", "logits": "data/z.npy" "labels": "data/y.npy"}',
     "line 2: not valid JSON (Expecting ',' delimiter at column"),
    ('["good", "multiclass"]', "line 2: expected a JSON object, got an array"),
]


@pytest.mark.parametrize("line, message", INVALID, ids=[m.split(": ", 1)[1][:40] for _l, m in INVALID])
def test_an_invalid_line_is_an_error_and_the_rest_runs(run, line, message):
    result = run([PASS, line, BINARY])
    assert result.exit_code == 2, result.output
    good, bad, bce = strict_lines(result.stdout)
    assert good["status"] == bce["status"] == "pass"
    assert bad["status"] == "error" and bad["ok"] is False
    assert bad["error"].startswith(message), bad["error"]


def test_blank_lines_are_skipped_and_line_numbers_kept(run):
    result = run([PASS, "", "   ", '{"name": "x"}'])
    assert [r["status"] for r in strict_lines(result.stdout)] == ["pass", "error"]
    assert strict_lines(result.stdout)[1]["error"].startswith("line 4: missing key 'kind'")
    assert strict_lines(result.stdout)[1]["name"] == "x"


@pytest.mark.parametrize("content, message", [
    pytest.param("", "empty: no cases", id="empty"),
    pytest.param("\n  \n", "empty: no cases", id="blank"),
    pytest.param('{\n  "name": "a",\n  "kind": "binary"\n}\n', "not JSON lines", id="json-document"),
    pytest.param('[{"name": "a"}, {"name": "b"}]\n', "not JSON lines", id="json-array"),
    pytest.param("name,kind\na,binary\n", "not JSON lines", id="csv"),
    pytest.param(b"\x93NUMPY\x01\x00v\x00", "binary data", id="npy"),
])
def test_a_manifest_that_is_not_json_lines_is_a_usage_error(run, tmp_path, content, message):
    path = tmp_path / "cases.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run(None)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("ce-check: error: manifest 'cases.jsonl': ")
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_usage_errors(invoke, tmp_path):
    missing = invoke(["batch", tmp_path / "nope.jsonl"])
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    directory = invoke(["batch", tmp_path])
    assert directory.exit_code == 2 and "is a directory" in directory.stderr
    write(tmp_path / "c.jsonl", [case("a", logits=str(EX / "logits.npy"), labels=str(EX / "labels.npy"))])
    bad_junit = invoke(["batch", tmp_path / "c.jsonl", "--junit-xml", tmp_path / "no" / "r.xml"])
    assert bad_junit.exit_code == 2 and "does not exist" in bad_junit.stderr
    assert bad_junit.stdout == ""  # refused before any case ran
    for args in (["--jobs", "-1"], ["--format", "xml"]):
        result = invoke(["batch", tmp_path / "c.jsonl", *args])
        assert result.exit_code == 2 and result.stderr.startswith("ce-check: error:")


# --- --fail-fast, --jobs -----------------------------------------------------------------------

def test_fail_fast_stops_after_the_first_failure(run, tmp_path):
    result = run([PASS, FAIL, PASS | {"name": "p2"}, ERROR], "--fail-fast", "--junit-xml", "r.xml")
    assert result.exit_code == 1, result.output
    assert [(r["name"], r["status"]) for r in strict_lines(result.stdout)] == [
        ("good", "pass"), ("bad-grad", "fail")]
    assert "2 skipped (--fail-fast)" in result.stderr
    ts = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert (ts.get("tests"), ts.get("failures"), ts.get("errors"), ts.get("skipped")) == ("4", "1", "0", "2")
    skipped = [c.get("name") for c in ts.findall("testcase") if c.find("skipped") is not None]
    assert skipped == ["p2", "bad-labels"]


def test_fail_fast_stops_at_an_invalid_line(run):
    result = run([PASS, '{"oops": 1}', FAIL], "--fail-fast")
    assert result.exit_code == 2
    assert [r["status"] for r in strict_lines(result.stdout)] == ["pass", "error"]


def test_fail_fast_with_jobs_gives_a_prefix_with_the_failure(run):
    cases = [PASS, FAIL] + [PASS | {"name": f"p{i}"} for i in range(6)]
    result = run(cases, "--fail-fast", "--jobs", "2")
    assert result.exit_code == 1
    names = [r["name"] for r in strict_lines(result.stdout)]
    assert names[:2] == ["good", "bad-grad"]
    assert names == [c["name"] for c in cases[:len(names)]]  # a prefix, in manifest order


def test_fail_fast_starts_nothing_once_a_failure_is_seen(monkeypatch):
    """jobs=2: the failure (fast) is seen while the first case (slow) still runs: nothing else starts."""
    started = []

    def fake(spec):
        started.append(spec.name)
        time.sleep(0 if spec.name == "bad" else 0.2)
        return batch_mod.CaseResult(spec.name, spec.line, spec.kind, "fail" if spec.name == "bad" else "pass")

    monkeypatch.setattr(batch_mod, "run_case", fake)
    text = "\n".join(json.dumps(case(n)) for n in ("slow", "bad", "a", "b")) + "\n"
    out = list(run_cases(parse_manifest(text), jobs=2, fail_fast=True,
                         executor_factory=ThreadPoolExecutor))
    assert [(r.name, r.status) for r in out] == [("slow", "pass"), ("bad", "fail")]
    assert sorted(started) == ["bad", "slow"]


def test_jobs_2_gives_the_same_output_as_jobs_1(run, tmp_path):
    cases = [PASS, FAIL, ERROR, BINARY, '{"bad": true}'] + [PASS | {"name": f"p{i}"} for i in range(5)]
    one = run(cases, "--jobs", "1", "--junit-xml", "one.xml")
    two = run(None, "--jobs", "2", "--junit-xml", "two.xml")
    auto = run(None, "--jobs", "0")
    assert one.exit_code == two.exit_code == auto.exit_code == 2
    assert one.stdout == two.stdout == auto.stdout
    assert len(strict_lines(one.stdout)) == 10

    def testcases(name):
        return [(c.get("name"), [e.tag for e in c]) for c in ET.parse(tmp_path / name).getroot().iter("testcase")]

    assert testcases("one.xml") == testcases("two.xml")


def test_results_stream_in_manifest_order_while_cases_run_concurrently(monkeypatch):
    """A slow first case does not hold back the others from running, only from being emitted."""
    started = []
    lock = threading.Lock()

    def fake(spec):
        with lock:
            started.append(spec.name)
        time.sleep(0.3 if spec.name == "slow" else 0.01)
        return batch_mod.CaseResult(spec.name, spec.line, spec.kind, "pass")

    monkeypatch.setattr(batch_mod, "run_case", fake)
    text = "\n".join(json.dumps(case(n)) for n in ("slow", "a", "b", "c")) + "\n"
    out = list(run_cases(parse_manifest(text), jobs=2, executor_factory=ThreadPoolExecutor))
    assert [r.name for r in out] == ["slow", "a", "b", "c"]
    assert set(started) == {"slow", "a", "b", "c"}


# --- paths, stdin --------------------------------------------------------------------------------

def test_paths_are_relative_to_the_manifest_folder(invoke, tmp_path, data, monkeypatch):
    (tmp_path / "ci").mkdir()
    write(tmp_path / "ci" / "cases.jsonl",
          [case("rel", logits="../data/z.npy", labels="../data/y.npy", grad="../data/g.npy")])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke(["batch", "../ci/cases.jsonl"])
    assert result.exit_code == 0, result.output
    (line,) = strict_lines(result.stdout)
    assert line["inputs"][0]["source"] == "logits file '../ci/../data/z.npy'"
    monkeypatch.chdir(tmp_path)
    result = invoke(["batch", tmp_path / "ci" / "cases.jsonl"])
    assert result.exit_code == 0, result.output


def test_absolute_paths_and_npz_keys(invoke, tmp_path):
    bce = FIXTURES / "binary" / "multilabel_hard_mean.npz"
    write(tmp_path / "c.jsonl", [case("npz", kind="binary", logits=f"{bce}:logits", labels=f"{bce}:labels",
                                      grad=f"{bce}:grad", loss=f"{bce}:loss")])
    result = invoke(["batch", tmp_path / "c.jsonl"])
    assert result.exit_code == 0, result.output


def test_stdin_manifest_paths_are_relative_to_the_working_directory(run, tmp_path):
    text = "\n".join(json.dumps(c) for c in (PASS, FAIL)) + "\n"
    result = run(None, input=text)
    assert result.exit_code == 1, result.output
    assert [r["status"] for r in strict_lines(result.stdout)] == ["pass", "fail"]
    assert "ce-check batch (stdin)" in result.stderr
    empty = run(None, input="")
    assert empty.exit_code == 2 and "manifest from stdin: empty" in empty.stderr


# --- output options --------------------------------------------------------------------------------

def test_format_table_prints_the_summary_on_stdout(run):
    result = run([PASS, FAIL], "--format", "table")
    assert result.exit_code == 1
    assert "bad-grad" in result.stdout and "grad_vs_reference 1/80 at (3, 1)" in result.stdout
    assert "{" not in result.stdout and result.stderr == ""


def test_quiet_prints_nothing_but_writes_junit(run, tmp_path):
    result = run([PASS, FAIL], "-q", "--junit-xml", "r.xml")
    assert result.exit_code == 1
    assert result.stdout == "" and result.stderr == ""
    assert ET.parse(tmp_path / "r.xml").getroot().find("testsuite").get("failures") == "1"


def test_no_escape_codes_when_not_a_terminal(run, invoke):
    result = run([PASS, FAIL])
    plain = invoke(["batch", "cases.jsonl"], env={"NO_COLOR": None})
    assert "\x1b[" not in result.stderr and "\x1b[" not in plain.stderr
    assert "bad-grad" in plain.stderr


def test_junit_survives_names_xml_cannot_carry(run, tmp_path):
    result = run([PASS | {"name": "bell\u0007 & <tag> \"q\""}], "--junit-xml", "r.xml")
    assert result.exit_code == 0
    (tc,) = ET.parse(tmp_path / "r.xml").getroot().iter("testcase")
    assert tc.get("name") == "bell\ufffd & <tag> \"q\""
    assert strict_lines(result.stdout)[0]["name"] == "bell\u0007 & <tag> \"q\""


def test_an_internal_error_exits_3_and_the_rest_runs(run, monkeypatch):
    real = batch_mod.check_binary

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(batch_mod, "check_binary", broken)
    monkeypatch.delenv("CE_CHECK_DEBUG", raising=False)
    result = run([BINARY, PASS])
    assert result.exit_code == 3
    bce, good = strict_lines(result.stdout)
    assert bce["status"] == "error" and bce["error"].startswith("internal error: ZeroDivisionError: boom")
    assert good["status"] == "pass"
    assert real is not broken


def test_parse_manifest_raises_for_no_object():
    with pytest.raises(CeCheckError, match="not JSON lines"):
        parse_manifest("1\n2\n", label="manifest 'm'")


def test_null_means_not_given(run):
    result = run([case("nulls", grad=None, loss=None, weight=None, reduction=None, rtol=None,
                       ignore_index=None, pos_weight=None)])
    assert result.exit_code == 0, result.output
    (line,) = strict_lines(result.stdout)
    assert [c["name"] for c in line["checks"]] == ["fd_vs_reference"]
    assert line["reduction"] == "mean" and line["options"]["ignore_index"] == -100


# --- the settings the manifest takes besides the inputs: fd, samples, seed, worst, floor_factor,
# two_class (the flags' names) ---------------------------------------------------------------------

def test_fd_samples_seed_worst_and_floor_factor_take_effect(run):
    sampled = dict(grad="data/g_bad.npy", fd="sample", samples=7)
    cases = [case("default", grad="data/g_bad.npy"),
             case("sampled", **sampled), case("seed-1", **sampled, seed=1),
             case("fd-off", grad="data/g.npy", fd="off"),
             case("worst-2", grad="data/g_bad.npy", worst=2),
             case("no-floor", grad="data/g.npy", floor_factor=0)]
    result = run(cases)
    by_name = {r["name"]: r for r in strict_lines(result.stdout)}
    assert by_name["default"]["fd"]["mode"] != "sample"
    assert by_name["sampled"]["fd"]["mode"] == "sample"
    fd_checks = {n: next(c for c in by_name[n]["checks"] if c["name"] == "fd_vs_reference")
                 for n in ("sampled", "seed-1")}
    assert fd_checks["sampled"]["total"] == fd_checks["seed-1"]["total"] == 7
    assert ([e["index"] for e in fd_checks["sampled"]["worst"]]
            != [e["index"] for e in fd_checks["seed-1"]["worst"]])  # other entries sampled
    assert by_name["fd-off"]["fd"]["mode"] == "off"
    assert "fd_vs_reference" not in [c["name"] for c in by_name["fd-off"]["checks"]]
    assert len(by_name["default"]["checks"][0]["worst"]) == 5
    assert len(by_name["worst-2"]["checks"][0]["worst"]) == 2
    assert "floor 4eps" in by_name["default"]["checks"][0]["rule"]
    rules = {c["name"]: c["rule"] for c in by_name["no-floor"]["checks"]}
    assert "floor 0eps" in rules["grad_vs_reference"], rules


def test_two_class_takes_effect(run, data):
    rng = np.random.default_rng(3)
    z2 = rng.standard_normal((8, 2))
    y2 = rng.integers(0, 2, size=8)
    np.save(data / "z2.npy", z2)
    np.save(data / "y2.npy", y2)
    np.save(data / "g2.npy", (softmax(z2) - np.eye(2)[y2]) / 8)
    pair = dict(kind="binary", logits="data/z2.npy", labels="data/y2.npy")
    result = run([case("two-class", **pair, grad="data/g2.npy", two_class=True),
                  case("not-two-class", **pair)])
    two, plain = strict_lines(result.stdout)
    assert two["status"] == "pass", two
    assert two["kind"] == "multiclass" and two["shape"] == [8, 2]  # checked as softmax logits
    assert "two_class_bridge" in [c["name"] for c in two["checks"]]
    assert plain["status"] == "error" and "labels" in plain["error"]  # class indices are not BCE labels


NEW_KEYS_INVALID = [
    ('"fd": "some"', "line 2: 'fd': must be one of auto, full, directional, sample, off, got \"some\""),
    ('"samples": 0', "line 2: 'samples': must be an integer >= 1, got 0"),
    ('"samples": 2.5', "line 2: 'samples': must be an integer >= 1, got 2.5"),
    ('"seed": -1', "line 2: 'seed': must be an integer >= 0, got -1"),
    ('"worst": "3"', "line 2: 'worst': must be an integer >= 0, got \"3\""),
    ('"floor_factor": -4', "line 2: 'floor_factor': must be a finite number >= 0, got -4"),
    ('"two_class": 1', "line 2: key 'two_class' applies to kind \"binary\", not \"multiclass\""),
]


@pytest.mark.parametrize("key, message", NEW_KEYS_INVALID, ids=[k.split(":")[0].strip('"') + "-" + str(i)
                                                               for i, (k, _m) in enumerate(NEW_KEYS_INVALID)])
def test_new_keys_are_validated_in_one_line(run, key, message):
    line = '{"name": "a", "kind": "multiclass", "logits": "data/z.npy", "labels": "data/y.npy", ' + key + "}"
    result = run([PASS, line])
    good, bad = strict_lines(result.stdout)
    assert good["status"] == "pass" and bad["status"] == "error"
    assert bad["error"] == message


def test_two_class_must_be_a_boolean(run):
    result = run([case("a", kind="binary", logits="data/x.npy", labels="data/t.npy", two_class="yes")])
    (bad,) = strict_lines(result.stdout)
    assert bad["error"] == "line 1: 'two_class': must be true or false, got \"yes\""
