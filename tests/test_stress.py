"""`ce-check stress`: the built-in sweep finds each textbook form's breaking point, the stable forms
hold, and a user's implementation (a Python callable or any program) is judged cell by cell, with
crashes, hangs and mis-shaped outputs reported as failed cells, never as ce-check errors."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ce_cli.stress as stress
from ce_cli.stress import dtypes as stress_dtypes
from ce_cli.verify.checks import reference
from ce_cli.stress.render import stress_to_dict

PY = sys.executable
OVERFLOW_SCALE = {"f16": 30.0, "bf16": 100.0, "f32": 100.0, "f64": 1000.0}  # first failing grid scale

IMPLS = '''
import numpy as np


def naive(logits, labels):
    """Textbook softmax -> log in the dtype of the logits (no max shift)."""
    z = np.asarray(logits)
    n = z.shape[0]
    r = np.arange(n)
    e = np.exp(z)
    p = e / e.sum(axis=-1, keepdims=True)
    loss = -np.log(p[r, labels]).mean()
    g = p.copy()
    g[r, labels] -= 1
    return loss, g / n


def stable(logits, labels):
    """Log-softmax via log-sum-exp, accumulating in float32 for 16-bit inputs; ignore_index -100."""
    z = np.asarray(logits)
    dt = z.dtype
    acc = np.float32 if dt.itemsize <= 2 else dt
    valid = labels != -100
    y = np.where(valid, labels, 0)
    r = np.arange(z.shape[0])
    zs = (z - z.max(axis=-1, keepdims=True)).astype(acc)
    logp = zs - np.log(np.exp(zs).sum(axis=-1, keepdims=True))
    d = max(1, int(valid.sum()))
    loss = np.where(valid, -logp[r, y], 0).sum() / d
    g = np.exp(logp)
    g[r, y] -= 1
    g = np.where(valid[:, None], g, 0) / d
    return np.asarray(loss).astype(dt), g.astype(dt)
'''

SCRIPT = '''
import os, subprocess, sys, time
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from {module} import naive, stable

mode, logits_path, labels_path, grad_path, loss_path = sys.argv[1:6]
logits, labels = np.load(logits_path), np.load(labels_path)
big = float(np.max(np.abs(logits[np.isfinite(logits)]))) >= 100
if mode == "crash" and big:
    print("diagnostic line 1", file=sys.stderr)
    print("fatal: logits too large for me", file=sys.stderr)
    sys.exit(3)
if mode == "segv" and big:
    os.kill(os.getpid(), 9)
if mode == "hang" and big:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(sys.argv[6], "w") as fh:
        fh.write(str(child.pid))
    time.sleep(120)
loss, grad = (naive if mode == "naive" else stable)(logits, labels)
if mode == "shape":
    grad = grad[:, :-1]
if mode == "noloss-file":
    np.save(grad_path, grad)
    sys.exit(0)
if mode == "nograd":
    sys.exit(0)
if mode == "vector-loss":
    loss = np.full(3, loss)
np.save(grad_path, grad)
np.save(loss_path, np.asarray(loss))
'''


@pytest.fixture
def impls(tmp_path, monkeypatch):
    """A module of implementations in tmp_path (the current directory), and a script using it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = "stress_impls_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{module}.py").write_text(IMPLS)
    script = tmp_path / "impl_cmd.py"
    script.write_text(SCRIPT.format(module=module))
    yield module, script
    sys.modules.pop(module, None)


def cmd(script: Path, mode: str, *extra: str) -> str:
    return " ".join([f"'{PY}'", f"'{script}'", mode, "{logits}", "{labels}", "{grad}", "{loss}", *extra])


def run_json(invoke, args):
    result = invoke(["stress", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result, json.loads(result.stdout)


def first_failing(data, scenario="spread"):
    """dtype -> smallest failing scale of the scenario (None: every scale passed)."""
    out = {}
    for c in data["cells"]:
        if c["scenario"] != scenario:
            continue
        out.setdefault(c["dtype"], None)
        if not c["ok"] and (out[c["dtype"]] is None or c["scale"] < out[c["dtype"]]):
            out[c["dtype"]] = c["scale"]
    return out


# ---------------------------------------------------------------------------------------------
# the built-in sweep


@pytest.fixture(scope="module")
def sweep():
    return stress.builtin_sweep("multiclass", dtypes=("f16", "f32", "f64"))


@pytest.mark.parametrize("dtype", ["f16", "f32", "f64"])
def test_naive_softmax_breaks_past_ln_max(sweep, dtype):
    bp = {(b.impl, b.dtype): b for b in sweep.breaking_points()}
    spread = [c for c in sweep.cells if c.impl == "naive" and c.dtype == dtype and c.scenario == "spread"]
    first = min(c.scale for c in spread if not c.ok)
    last = max(c.scale for c in spread if c.ok)
    assert first == OVERFLOW_SCALE[dtype] and last < first
    assert last < stress.thresholds(dtype).exp_overflow < first    # 11.09, 88.72, 709.78
    assert all(c.ok == (c.scale < first) for c in spread)
    overflow = next(c for c in spread if c.scale == first)
    assert overflow.reason == "nan grad" and "NaN/inf" in overflow.error
    assert bp[("naive", dtype)].first_fail is not None


@pytest.mark.parametrize("dtype", ["f16", "f32", "f64"])
def test_max_shift_breaks_where_p_y_underflows(sweep, dtype):
    far = [c for c in sweep.cells if c.impl == "max-shift" and c.dtype == dtype and c.scenario == "far-label"]
    first = min(c.scale for c in far if not c.ok)
    gap = stress.thresholds(dtype).softmax_underflow     # the label sits 2s below the max
    assert max(c.scale for c in far if c.ok) < gap / 2 <= first
    assert next(c for c in far if c.scale == first).reason == "inf loss"
    assert all(c.ok for c in sweep.cells if c.impl == "max-shift" and c.scenario in ("equal", "dominant"))


def test_log_softmax_holds_everywhere(sweep):
    cells = [c for c in sweep.cells if c.impl == "log-softmax"]
    assert len(cells) == len(stress.SCENARIOS["multiclass"]) * 6 * 3
    assert all(c.ok for c in cells), [c for c in cells if not c.ok][:3]
    assert all(0 <= c.worst_ratio <= 1 for c in cells)
    bps = [b for b in sweep.breaking_points() if b.impl == "log-softmax"]
    assert all(b.first_fail is None and b.last_ok == 1e4 for b in bps)


def test_naive_float16_breaks_at_any_scale_with_131k_classes(sweep):
    vocab = [c for c in sweep.cells if c.impl == "naive" and c.dtype == "f16" and c.scenario == "vocab"]
    assert vocab and not any(c.ok for c in vocab)   # a float16 sum of 131,072 terms >= 0.5 overflows


def test_builtin_sweep_cli_is_a_report(invoke):
    result = invoke(["stress", "--dtypes", "f16,f32,f64", "--scenarios", "spread,dominant", "--verbose"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("naive", "max-shift", "log-softmax", "holds to 1e4", "(10, 30]", "(30, 100]",
                 "(100, 1e3]", "11.09", "88.72", "709.78", "verdict: a report"):
        assert text in out, text


@pytest.mark.parametrize("dtype", ["f16", "f32", "f64"])
def test_naive_bce_breaks_and_stable_bce_holds(dtype):
    report = stress.builtin_sweep("binary", dtypes=(dtype,), scales=(1.0, 10.0, 30.0, 1e4))
    naive = [c for c in report.cells if c.impl == "naive"]
    assert all(c.ok for c in naive if c.scale == 1.0)
    assert not any(c.ok for c in naive if c.scale == 1e4)
    # the loss of log(1 - s(x)) is off by eps*e^x relative: over tolerance by x = 10
    assert not all(c.ok for c in naive if c.scale == 10.0)
    stable = [c for c in report.cells if c.impl == "stable"]
    assert all(c.ok for c in stable), [c for c in stable if not c.ok][:2]


def test_stable_bce_float64_large_logits():
    """Regression: the float64 BCE reference once formed s(x) as exp(-softplus(-x)), relative
    error eps*|x| at x << 0, beyond the binary tolerance floor; it now uses exp(-|x|)."""
    report = stress.builtin_sweep("binary", dtypes=("f64",), scales=(30.0, 100.0),
                                  scenarios=[s for s in stress.SCENARIOS["binary"] if s.name == "spread"])
    assert all(c.ok for c in report.cells if c.impl == "stable")


def test_scenarios_are_deterministic_and_rounded_once():
    sc = stress.SCENARIOS["multiclass"][0]
    a = stress.make_case("multiclass", sc, 30.0, "f16", seed=0)
    b = stress.make_case("multiclass", sc, 30.0, "f16", seed=0)
    c = stress.make_case("multiclass", sc, 30.0, "f16", seed=1)
    assert np.array_equal(a.logits, b.logits) and not np.array_equal(a.logits, c.logits)
    assert a.logits.dtype == np.float16 and a.logits64.dtype == np.float64
    assert np.array_equal(a.logits.astype(np.float64), a.logits64)   # the reference sees the rounded inputs
    assert np.all(a.logits64.max(axis=1) == 30.0)


def test_dominant_margin_is_past_cancellation():
    sc = next(s for s in stress.SCENARIOS["multiclass"] if s.name == "dominant")
    for dtype in ("f16", "f32", "f64"):
        case = stress.make_case("multiclass", sc, 1.0, dtype)
        ref = reference(case.logits64, case.labels64, reduction="sum")
        r = np.arange(case.logits.shape[0])
        p_y = ref.grad[r, case.labels64] + 1.0
        assert np.all(1.0 - p_y < stress.thresholds(dtype).eps / 2)   # p_y rounds to 1 in the dtype


def test_unrepresentable_scale_is_skipped_with_a_note(invoke):
    result, data = run_json(invoke, ["--dtypes", "f16,f32", "--scales", "1,1e5", "--scenarios", "spread"])
    assert {(c["dtype"], c["scale"]) for c in data["cells"]} >= {("f32", 1e5), ("f16", 1.0)}
    assert ("f16", 1e5) not in {(c["dtype"], c["scale"]) for c in data["cells"]}
    assert any("skipped for f16" in n for n in data["notes"])


# ---------------------------------------------------------------------------------------------
# bfloat16: with ml_dtypes, and without it


def test_bf16_skipped_without_ml_dtypes(monkeypatch, invoke):
    monkeypatch.setattr(stress_dtypes, "bfloat16_dtype", lambda: None)
    dtypes, notes = stress.parse_dtypes(None)
    assert dtypes == ("f16", "f32", "f64") and "ml_dtypes" in notes[0]
    result = invoke(["stress", "--scales", "1", "--scenarios", "spread"])
    assert result.exit_code == 0 and "bf16 skipped" in result.stdout
    result = invoke(["stress", "--dtypes", "bf16"])
    assert result.exit_code == 2 and "ml_dtypes" in result.stderr


def test_bf16_column_with_a_stand_in_dtype(monkeypatch):
    # float32 storage as a stand-in exercises the bf16 plumbing (bf16 tolerances) without ml_dtypes
    monkeypatch.setattr(stress_dtypes, "bfloat16_dtype", lambda: np.float32)
    dtypes, notes = stress.parse_dtypes(None)
    assert dtypes == ("f16", "bf16", "f32", "f64") and not notes
    report = stress.builtin_sweep("multiclass", dtypes=("bf16",), scales=(1.0, 1e4),
                                  scenarios=stress.SCENARIOS["multiclass"][:2])
    assert {c.dtype for c in report.cells} == {"bf16"}
    assert all(c.ok for c in report.cells if c.impl == "log-softmax")


def test_bf16_with_ml_dtypes(impls, invoke):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sc = stress.SCENARIOS["multiclass"][0]
    assert stress.make_case("multiclass", sc, 1.0, "bf16").logits.dtype == np.dtype(ml_dtypes.bfloat16)
    report = stress.builtin_sweep("multiclass", dtypes=("bf16",), scenarios=[sc])
    naive = [c for c in report.cells if c.impl == "naive"]
    assert min(c.scale for c in naive if not c.ok) == OVERFLOW_SCALE["bf16"]
    assert all(c.ok for c in report.cells if c.impl == "log-softmax")
    module, script = impls
    _, data = run_json(invoke, ["--impl-cmd", cmd(script, "stable"), "--dtypes", "bf16",
                                "--scales", "1,1e4", "--scenarios", "spread"])
    assert data["ok"]


# ---------------------------------------------------------------------------------------------
# --impl package.module:function


def test_impl_naive_caught_at_the_right_scale_in_each_dtype(impls, invoke):
    module, _ = impls
    result, data = run_json(invoke, ["--impl", f"{module}:naive", "--dtypes", "f16,f32,f64",
                                     "--scenarios", "spread"])
    assert result.exit_code == 1
    assert first_failing(data) == {"f16": 30.0, "f32": 100.0, "f64": 1000.0}
    bps = {b["dtype"]: b for b in data["breaking_points"]}
    assert bps["f32"]["last_passing_scale"] == 30.0 and bps["f32"]["first_failing_scale"] == 100.0


def test_impl_stable_passes(impls, invoke):
    module, _ = impls
    result = invoke(["stress", "--impl", f"{module}:stable", "--dtypes", "f16,f32,f64"])
    assert result.exit_code == 0, result.output
    assert "verdict: PASS" in result.stdout


def test_builtin_function_as_impl(invoke):
    result = invoke(["stress", "--impl", "ce_cli.stress:log_softmax_ce", "--dtypes", "f32",
                     "--scales", "1,1e4"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_impl_reductions(tmp_path, monkeypatch, invoke, reduction):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = f"stress_red_{reduction}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from ce_cli.stress import log_softmax_ce, stable_sigmoid_bce
        def ce(z, y):
            return log_softmax_ce(z, y, reduction="{reduction}")
        def bce(x, t):
            return stable_sigmoid_bce(x, t, reduction="{reduction}")
        def wrong(z, y):
            return log_softmax_ce(z, y, reduction="mean")
    """))
    try:
        for fn, kind in (("ce", "multiclass"), ("bce", "binary")):
            result = invoke(["stress", "--impl", f"{module}:{fn}", "--kind", kind, "--reduction",
                             reduction, "--dtypes", "f16,f32", "--scales", "1,100"])
            assert result.exit_code == 0, result.output
        result = invoke(["stress", "--impl", f"{module}:wrong", "--reduction", reduction,
                         "--dtypes", "f32", "--scales", "1", "--scenarios", "spread"])
        assert result.exit_code == 1
    finally:
        sys.modules.pop(module, None)


def test_impl_exceptions_prints_and_bad_returns_are_failed_cells(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "stress_bad_impls.py").write_text(textwrap.dedent("""
        import numpy as np
        def raises(z, y):
            print("about to fail")
            if np.abs(z[np.isfinite(z)]).max() > 50:
                raise ValueError("too big for me")
            return 0.0, np.zeros_like(z)
        def not_a_pair(z, y):
            return 1.0
        def wrong_shape(z, y):
            return 0.0, np.zeros(z.shape[1:])
        def int_grad(z, y):
            return 0.0, np.zeros(z.shape, dtype=np.int64)
    """))
    try:
        result, data = run_json(invoke, ["--impl", "stress_bad_impls:raises", "--dtypes", "f32",
                                         "--scales", "100", "--scenarios", "spread"])
        cell = data["cells"][0]
        assert result.exit_code == 1 and cell["reason"] == "crash"
        assert "ValueError: too big for me" in cell["error"]
        assert "about to fail" in cell["stderr_tail"] and "stress_bad_impls.py" in cell["stderr_tail"]
        for fn, text in (("not_a_pair", "not (loss, grad)"), ("wrong_shape", "gradient has shape"),
                         ("int_grad", "integer dtype")):
            result, data = run_json(invoke, ["--impl", f"stress_bad_impls:{fn}", "--dtypes", "f32",
                                             "--scales", "1", "--scenarios", "spread"])
            assert result.exit_code == 1 and text in data["cells"][0]["error"], data["cells"][0]
            assert data["cells"][0]["reason"] == "bad output"
    finally:
        sys.modules.pop("stress_bad_impls", None)


def test_impl_hang_times_out(tmp_path, monkeypatch, invoke):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "stress_slow_impl.py").write_text(textwrap.dedent("""
        import time
        def slow(z, y):
            while True:
                time.sleep(0.01)
    """))
    try:
        t0 = time.monotonic()
        result, data = run_json(invoke, ["--impl", "stress_slow_impl:slow", "--dtypes", "f32",
                                         "--scales", "1", "--scenarios", "spread", "--timeout", "1"])
        assert time.monotonic() - t0 < 10
        assert result.exit_code == 1 and data["cells"][0]["reason"] == "timeout"
    finally:
        sys.modules.pop("stress_slow_impl", None)


# ---------------------------------------------------------------------------------------------
# --impl-cmd: any program


def test_impl_cmd_naive_caught_and_stable_passes(impls, invoke):
    _, script = impls
    result, data = run_json(invoke, ["--impl-cmd", cmd(script, "naive"), "--dtypes", "f16,f32,f64",
                                     "--scales", "10,30,100,1e3", "--scenarios", "spread"])
    assert result.exit_code == 1
    assert first_failing(data) == {"f16": 30.0, "f32": 100.0, "f64": 1000.0}
    result = invoke(["stress", "--impl-cmd", cmd(script, "stable"), "--dtypes", "f16,f32,f64",
                     "--scales", "1e4", "--scenarios", "ignored"])
    assert result.exit_code == 0, result.output


def test_impl_cmd_without_loss_placeholder_checks_the_gradient(impls, invoke):
    _, script = impls
    template = f"'{PY}' '{script}' noloss-file {{logits}} {{labels}} {{grad}} unused"
    result, data = run_json(invoke, ["--impl-cmd", template, "--dtypes", "f32", "--scales", "1",
                                     "--scenarios", "spread"])
    assert result.exit_code == 0 and data["cells"][0]["errors"]["loss_abs"] is None


def test_impl_cmd_crash_is_a_failed_cell_with_stderr_tail(impls, invoke):
    _, script = impls
    result, data = run_json(invoke, ["--impl-cmd", cmd(script, "crash"), "--dtypes", "f32",
                                     "--scales", "1,100", "--scenarios", "spread"])
    assert result.exit_code == 1
    ok, bad = sorted(data["cells"], key=lambda c: c["scale"])
    assert ok["ok"] and not bad["ok"] and bad["reason"] == "crash"
    assert "exit status 3" in bad["error"]
    assert bad["stderr_tail"].splitlines()[-2:] == ["diagnostic line 1", "fatal: logits too large for me"]
    table = invoke(["stress", "--impl-cmd", cmd(script, "crash"), "--dtypes", "f32", "--scales", "100",
                    "--scenarios", "spread"])
    assert table.exit_code == 1 and "| fatal: logits too large for me" in table.stdout
    assert "internal error" not in table.output


def test_impl_cmd_killed_by_signal(impls, invoke):
    _, script = impls
    _, data = run_json(invoke, ["--impl-cmd", cmd(script, "segv"), "--dtypes", "f32", "--scales", "100",
                                "--scenarios", "spread"])
    assert data["cells"][0]["reason"] == "crash" and "SIGKILL" in data["cells"][0]["error"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_impl_cmd_hang_is_killed_with_its_process_group(impls, invoke, tmp_path):
    _, script = impls
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    result, data = run_json(invoke, ["--impl-cmd", cmd(script, "hang", str(pidfile)), "--dtypes", "f32",
                                     "--scales", "100", "--scenarios", "spread", "--timeout", "2"])
    assert time.monotonic() - t0 < 20
    assert result.exit_code == 1
    cell = data["cells"][0]
    assert cell["reason"] == "timeout" and "killed after 2 s" in cell["error"]
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the program's own child outlived the timeout"


@pytest.mark.parametrize("mode, text", [
    ("shape", "gradient has shape (16, 7), the logits (16, 8)"),
    ("nograd", "no gradient written to {grad}"),
    ("noloss-file", "no loss written to {loss}"),
    ("vector-loss", "loss has shape (3,)"),
])
def test_impl_cmd_bad_outputs_are_failed_cells(impls, invoke, mode, text):
    _, script = impls
    result, data = run_json(invoke, ["--impl-cmd", cmd(script, mode), "--dtypes", "f32", "--scales", "1",
                                     "--scenarios", "spread"])
    assert result.exit_code == 1
    cell = data["cells"][0]
    assert not cell["ok"] and cell["reason"] == "bad output" and text in cell["error"], cell


def test_save_failures_writes_a_reproducer(impls, invoke, tmp_path):
    _, script = impls
    out = tmp_path / "repro"
    result, data = run_json(invoke, ["--impl-cmd", cmd(script, "naive"), "--dtypes", "f32",
                                     "--scales", "1,100", "--scenarios", "spread,far-label",
                                     "--save-failures", str(out)])
    assert result.exit_code == 1
    failing = [c for c in data["cells"] if not c["ok"]]
    assert len(data["saved"]) == len(failing) == 2
    folder = Path(data["saved"][0])
    names = {p.name for p in folder.iterdir()}
    assert {"logits.npy", "labels.npy", "expected_grad.npy", "expected_loss.npy", "grad.npy",
            "loss.npy", "command.sh", "README.txt"} <= names
    logits, labels = np.load(folder / "logits.npy"), np.load(folder / "labels.npy")
    assert logits.dtype == np.float32 and logits.shape == (1, 8)   # shrunk to one failing row
    ref = reference(logits, labels)
    assert np.array_equal(np.load(folder / "expected_grad.npy"), ref.grad)
    assert float(np.load(folder / "expected_loss.npy")) == ref.loss
    command = (folder / "command.sh").read_text()
    assert str(script) in command and str(folder / "logits.npy") in command
    assert "ce-check grad logits.npy labels.npy --grad grad.npy --loss loss.npy" in command
    assert "--precision f32 --fd off" in command
    (folder / "grad.npy").unlink()
    env = dict(os.environ, PATH=str(Path(PY).parent) + os.pathsep + os.environ.get("PATH", ""))
    run = subprocess.run(["sh", str(folder / "command.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert (folder / "grad.npy").exists()        # the command reran the implementation
    if (Path(PY).parent / "ce-check").exists():
        assert run.returncode == 1 and "FAIL" in run.stdout   # and the check still fails


def test_save_failures_for_a_python_impl(impls, invoke, tmp_path):
    module, _ = impls
    out = tmp_path / "repro"
    result = invoke(["stress", "--impl", f"{module}:naive", "--dtypes", "f16", "--scales", "30",
                     "--scenarios", "spread", "--save-failures", str(out), "-q"])
    assert result.exit_code == 1 and result.stdout == ""
    (folder,) = out.iterdir()
    command = (folder / "command.sh").read_text()
    assert f"importlib.import_module(\"{module}\")" in command
    (folder / "grad.npy").unlink()
    rerun = [line for line in command.splitlines() if line.startswith(("cd ", f"'{PY}'", PY))][:2]
    subprocess.run(["sh", "-c", "\n".join(rerun)], check=True, timeout=60)
    assert np.load(folder / "grad.npy").dtype == np.float16


def test_json_has_one_entry_per_cell(impls, invoke):
    module, _ = impls
    result, data = run_json(invoke, ["--impl", f"{module}:naive", "--dtypes", "f16,f32",
                                     "--scales", "1,100", "--scenarios", "spread,equal"])
    assert len(data["cells"]) == 2 * 2 * 2 and data["ok"] is False and data["mode"] == "impl"
    for c in data["cells"]:
        assert {"scenario", "dtype", "scale", "ok", "errors"} <= set(c)
        assert set(c["errors"]) == {"grad_max_abs", "grad_max_rel", "loss_abs", "worst_over_allowed"}
    json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert {d: t["exp_overflow"] for d, t in data["thresholds"].items()} == pytest.approx(
        {"f16": 11.09, "f32": 88.72}, abs=0.01)


def test_python_api_report_round_trips_to_json():
    report = stress.builtin_sweep("binary", dtypes=("f32",), scales=(1.0, 30.0),
                                  scenarios=stress.SCENARIOS["binary"][:1])
    data = json.loads(json.dumps(stress_to_dict(report), allow_nan=False))
    assert len(data["cells"]) == 4 and data["kind"] == "binary"
    assert math.isclose(data["thresholds"]["f32"]["sigmoid_saturation"], math.log(2**24))


# ---------------------------------------------------------------------------------------------
# usage errors: exit 2, one line


@pytest.mark.parametrize("args, text", [
    (["--impl", "a:b", "--impl-cmd", "x {logits} {labels} {grad}"], "not both"),
    (["--impl", "no_such_module_xyz:fn"], "cannot import"),
    (["--impl", "nocolon"], "package.module:function"),
    (["--impl", "ce_cli.stress:no_such_fn"], "no attribute"),
    (["--impl", "ce_cli.stress:__all__"], "not a callable"),
    (["--impl-cmd", f"'{PY}' {{logits}} {{labels}}"], "missing {grad}"),
    (["--impl-cmd", "no-such-program-xyz {logits} {labels} {grad}"], "not found"),
    (["--impl-cmd", "'unbalanced {logits}"], "cannot split"),
    (["--dtypes", "f8"], "unknown dtype"),
    (["--scales", "1,nan"], "--scales"),
    (["--scales", "ten"], "not a number"),
    (["--scenarios", "spread,nope"], "unknown scenario 'nope'"),
    (["--kind", "binary", "--scenarios", "vocab"], "unknown scenario 'vocab'"),
    (["--timeout", "0"], "--timeout"),
    (["--kind", "other"], "--kind"),
])
def test_usage_errors_exit_2(invoke, args, text):
    result = invoke(["stress", *args])
    assert result.exit_code == 2, result.output
    assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_save_failures_must_be_a_folder(invoke, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = invoke(["stress", "--save-failures", str(f)])
    assert result.exit_code == 2 and "not a folder" in result.stderr
