"""The `ce-check` command line end to end: exit codes, help, JSON, colour, quiet mode, --out-grad,
layouts and stdin, in-process (CliRunner) and through the installed console script."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import ce_cli
from tests.conftest import CE_CHECK, FIXTURES, npy_bytes, run_script, save, script_env, softmax, strict_json

EX = FIXTURES / "example"
ESC = "\x1b["


def example(grad="grad.npy", *extra):
    return ["grad", EX / "logits.npy", EX / "labels.npy", "--grad", EX / grad, *extra]


def ce_grad(z, y, axis=-1):
    """Independent float64 gradient of the mean CE with index targets."""
    z = np.moveaxis(np.asarray(z, dtype=np.float64), axis, -1)
    C = z.shape[-1]
    g = (softmax(z) - np.eye(C)[y]) / y.size
    return np.moveaxis(g, -1, axis)


def ce_loss(z, y) -> float:
    z = np.asarray(z, dtype=np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.mean(lse - np.take_along_axis(z, y[..., None], -1)[..., 0]))


# --- exit codes ------------------------------------------------------------------------------

EXIT_CASES = [
    pytest.param(example("grad.npy"), 0, None, id="correct-grad"),
    pytest.param(example("grad_bad.npy"), 1, "(7, 3)", id="bad-grad"),
    pytest.param(["grad", EX / "missing.npy", EX / "labels.npy"], 2, None, id="missing-file"),
]


@pytest.mark.parametrize("args, code, in_stdout", EXIT_CASES)
def test_exit_codes_in_process(invoke, args, code, in_stdout):
    result = invoke(args)
    assert result.exit_code == code, result.output
    if in_stdout:
        assert in_stdout in result.stdout
    if code == 2:
        assert result.stderr.startswith("ce-check: error:") and "missing.npy" in result.stderr


@pytest.mark.parametrize("args, code, in_stdout", EXIT_CASES)
def test_exit_codes_console_script(args, code, in_stdout):
    proc = run_script(args)
    assert proc.returncode == code, proc.stderr.decode()
    if in_stdout:
        assert in_stdout in proc.stdout.decode()
    if code == 2:
        assert proc.stderr.decode().startswith("ce-check: error:")
    assert b"Traceback" not in proc.stderr


def test_bad_grad_table_names_the_entry(invoke):
    result = invoke(example("grad_bad.npy"))
    row = next(line for line in result.stdout.splitlines() if line.startswith("(7, 3)"))
    assert "✗" in row
    assert "verdict: FAIL" in result.stdout


# --- version and help ------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--version"], f"ce-check {ce_cli.__version__}"),
    (["--help"], "Exit codes"),
    (["-h"], "grad"),
    (["grad", "--help"], "--label-smoothing"),
    (["grad", "-h"], "--out-grad"),
])
def test_version_and_help(invoke, args, expected):
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert expected in result.stdout
    proc = run_script(args)
    assert proc.returncode == 0, proc.stderr.decode()
    assert expected in proc.stdout.decode()


def test_python_dash_m_version():
    proc = subprocess.run([sys.executable, "-m", "ce_cli", "--version"], capture_output=True,
                          timeout=60, env=script_env())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == f"ce-check {ce_cli.__version__}"


# --- JSON ------------------------------------------------------------------------------------

CHECK_KEYS = {"name", "ok", "max_abs_err", "max_rel_err", "mismatches", "total", "worst"}


def test_json_shape_of_the_report(invoke):
    result = invoke(example("grad.npy", "--loss", EX / "loss.npy", "--json"))
    assert result.exit_code == 0, result.output
    data = strict_json(result.stdout)
    assert data["ok"] is True
    assert data["kind"] == "multiclass"
    assert data["shape"] == [32, 10]
    assert isinstance(data["loss"], float) and abs(data["loss"] - 4.191544897) < 1e-8
    names = [c["name"] for c in data["checks"]]
    assert "grad_vs_reference" in names and "loss_vs_reference" in names
    for check in data["checks"]:
        assert CHECK_KEYS <= set(check), check.keys()
        assert check["ok"] is True and check["mismatches"] == 0 and check["total"] > 0


def test_json_failed_check_names_the_entry(invoke):
    result = invoke(example("grad_bad.npy", "--json"))
    assert result.exit_code == 1
    data = strict_json(result.stdout)
    assert data["ok"] is False
    grad_check = next(c for c in data["checks"] if c["name"] == "grad_vs_reference")
    assert grad_check["ok"] is False and grad_check["mismatches"] == 1
    assert grad_check["worst"][0]["index"] == [7, 3]


def test_json_all_ignored_mean_loss_is_null_and_warning_on_stderr(tmp_path, invoke):
    z = np.random.default_rng(1).standard_normal((3, 4))
    y = np.full(3, -100)
    args = ["grad", save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", y),
            "--grad", save(tmp_path, "g.npy", np.zeros((3, 4))), "--json"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    data = strict_json(result.stdout)  # a bare NaN would raise here
    assert data["loss"] is None
    assert "ce-check: warning" not in result.stdout
    assert "ce-check: warning:" in result.stderr and "ignored" in result.stderr
    proc = run_script(args)
    assert strict_json(proc.stdout.decode())["loss"] is None
    assert b"ce-check: warning:" in proc.stderr


def test_table_warnings_go_to_stderr(tmp_path, invoke):
    z = np.random.default_rng(1).standard_normal((3, 4))
    result = invoke(["grad", save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", np.full(3, 7)),
                     "--ignore-index", "7"])
    assert result.exit_code == 0, result.output
    assert "ce-check: warning" not in result.stdout
    assert "ce-check: warning:" in result.stderr
    assert "loss: nan" in result.stdout


# --- colour, quiet ---------------------------------------------------------------------------

def test_no_escape_codes_in_process(invoke):
    for env in ({"NO_COLOR": "1"}, {"NO_COLOR": None}):
        result = invoke(example("grad_bad.npy"), env=env)
        assert result.exit_code == 1
        assert ESC not in result.stdout and ESC not in result.stderr


@pytest.mark.parametrize("env", [script_env(NO_COLOR="1"), script_env()], ids=["NO_COLOR", "non-tty"])
def test_no_escape_codes_console_script(env):
    assert "FORCE_COLOR" not in env
    for args in (example("grad_bad.npy"), example("grad_bad.npy", "--json"),
                 ["grad", EX / "nope.npy", EX / "labels.npy"]):
        proc = run_script(args, env=env)
        assert ESC not in proc.stdout.decode() and ESC not in proc.stderr.decode()


@pytest.mark.skipif(os.name != "posix", reason="needs a pseudo-terminal")
def test_no_color_on_a_terminal_has_no_escape_codes():
    import pty
    if not CE_CHECK.exists():
        pytest.skip("console script not installed")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([str(CE_CHECK), *map(str, example("grad_bad.npy"))], stdin=subprocess.DEVNULL,
                            stdout=secondary, stderr=secondary, env=script_env(NO_COLOR="1"))
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 1
    assert b"verdict" in out
    assert ESC.encode() not in out


def test_quiet_prints_nothing(invoke):
    bad = invoke(example("grad_bad.npy", "-q"))
    assert bad.exit_code == 1 and bad.stdout == "" and bad.stderr == ""
    good = invoke(example("grad.npy", "--quiet"))
    assert good.exit_code == 0 and good.stdout == ""
    proc = run_script(example("grad_bad.npy", "-q"))
    assert proc.returncode == 1 and proc.stdout == b""


def test_quiet_still_reports_input_errors(invoke):
    result = invoke(["grad", EX / "nope.npy", EX / "labels.npy", "-q"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("ce-check: error:")


@pytest.mark.parametrize("json_out", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("bad", [False, True], ids=["pass", "fail"])
def test_closed_pipe_keeps_the_verdict_exit_code(tmp_path, json_out, bad):
    """`ce-check ... | head -1`: the reader goes away; the exit code must still be the verdict."""
    if not CE_CHECK.exists():
        pytest.skip("console script not installed")
    rng = np.random.default_rng(3)
    z = rng.standard_normal((3000, 10))
    y = rng.integers(0, 10, 3000)
    g = ce_grad(z, y)
    if bad:
        g[5, 5] += 1.0
    args = ["grad", save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", y),
            "--grad", save(tmp_path, "g.npy", g), "--fd", "off", "--worst", "3000"]
    if json_out:
        args.append("--json")
    proc = subprocess.Popen([str(CE_CHECK), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=script_env())
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == (1 if bad else 0), err.decode()
    assert b"Traceback" not in err and b"internal error" not in err


# --- --out-grad ------------------------------------------------------------------------------

def test_out_grad_class_axis_last(tmp_path, invoke):
    out = tmp_path / "ref.npy"
    result = invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--out-grad", out])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    assert got.dtype == np.float64 and got.shape == (32, 10)
    z, y = np.load(EX / "logits.npy"), np.load(EX / "labels.npy")
    np.testing.assert_array_equal(got, ce_cli.reference(z, y).grad)
    np.testing.assert_allclose(got, ce_grad(z, y), rtol=1e-12, atol=1e-17)


def test_out_grad_class_axis_1(tmp_path, invoke):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((2, 6, 3, 4)).astype(np.float32)  # (N, C, d1, d2)
    y = rng.integers(0, 6, (2, 3, 4))
    out = tmp_path / "ref.npy"
    result = invoke(["grad", save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", y),
                     "--class-axis", "1", "--out-grad", out])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    assert got.dtype == np.float64 and got.shape == z.shape
    np.testing.assert_array_equal(got, ce_cli.reference(z, y, class_axis=1).grad)
    np.testing.assert_allclose(got, ce_grad(z, y, axis=1), rtol=1e-12, atol=1e-17)


# --- --loss ----------------------------------------------------------------------------------

def test_loss_typed_as_a_number(invoke):
    z, y = np.load(EX / "logits.npy"), np.load(EX / "labels.npy")
    exact = ce_cli.reference(z, y).loss
    assert invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--loss", repr(exact)]).exit_code == 0
    # a number typed with few digits is compared to half a unit of its last digit
    assert invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--loss", "4.19"]).exit_code == 0
    result = invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--loss", "4.18"])
    assert result.exit_code == 1
    assert "loss vs reference" in result.stdout  # the display name of loss_vs_reference


def test_loss_typed_number_in_json(invoke):
    result = invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--loss", "2.3", "--json"])
    assert result.exit_code == 1
    check = next(c for c in strict_json(result.stdout)["checks"] if c["name"] == "loss_vs_reference")
    assert check["ok"] is False


def test_loss_from_a_file(invoke):
    result = invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--loss", EX / "loss.npy", "--json"])
    assert result.exit_code == 0, result.output
    names = [c["name"] for c in strict_json(result.stdout)["checks"]]
    assert "loss_vs_reference" in names


def test_per_sample_loss_file_with_reduction_none(tmp_path, invoke):
    z, y = np.load(EX / "logits.npy"), np.load(EX / "labels.npy")
    per = ce_cli.reference(z, y, reduction="none").per_sample.astype(np.float32)
    result = invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--reduction", "none",
                     "--loss", save(tmp_path, "per.npy", per)])
    assert result.exit_code == 0, result.output


# --- layouts ---------------------------------------------------------------------------------

def test_sequence_logits_b_t_v(tmp_path, invoke):
    rng = np.random.default_rng(7)
    z = rng.standard_normal((2, 3, 7))
    y = rng.integers(0, 7, (2, 3))
    g = ce_grad(z, y)
    result = invoke(["grad", save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", y),
                     "--grad", save(tmp_path, "g.npy", g), "--json"])
    assert result.exit_code == 0, result.output
    assert strict_json(result.stdout)["shape"] == [2, 3, 7]
    g[1, 2, 4] += 1e-3
    result = invoke(["grad", tmp_path / "z.npy", tmp_path / "y.npy",
                     "--grad", save(tmp_path, "g2.npy", g), "--json"])
    assert result.exit_code == 1
    grad_check = next(c for c in strict_json(result.stdout)["checks"] if c["name"] == "grad_vs_reference")
    assert grad_check["worst"][0]["index"] == [1, 2, 4]


def test_class_axis_1_n_c_d1(tmp_path, invoke):
    rng = np.random.default_rng(8)
    z = rng.standard_normal((3, 5, 4))
    y = rng.integers(0, 5, (3, 4))
    g = ce_grad(z, y, axis=1)
    g[2, 1, 3] *= 1.5
    result = invoke(["grad", save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", y),
                     "--grad", save(tmp_path, "g.npy", g), "--class-axis", "1"])
    assert result.exit_code == 1
    assert "(2, 1, 3)" in result.stdout
    g[2, 1, 3] /= 1.5
    result = invoke(["grad", tmp_path / "z.npy", tmp_path / "y.npy",
                     "--grad", save(tmp_path, "g.npy", g), "--class-axis", "1"])
    assert result.exit_code == 0, result.output


def test_single_sample_with_scalar_label(tmp_path, invoke):
    z = np.array([0.5, -1.0, 2.0, 0.0])
    y = np.array(2)  # a 0-d .npy
    g = softmax(z) - np.eye(4)[2]
    result = invoke(["grad", save(tmp_path, "z.npy", z), save(tmp_path, "y.npy", y),
                     "--grad", save(tmp_path, "g.npy", g), "--loss", repr(ce_loss(z[None], y[None]))])
    assert result.exit_code == 0, result.output


def test_labels_as_one_column_csv(tmp_path, invoke):
    y = np.load(EX / "labels.npy")
    path = tmp_path / "labels.csv"
    path.write_text("label\n" + "\n".join(map(str, y)) + "\n")
    result = invoke(["grad", EX / "logits.npy", path, "--grad", EX / "grad.npy"])
    assert result.exit_code == 0, result.output


def test_probability_targets(tmp_path, invoke):
    z = np.load(EX / "logits.npy")
    t = softmax(np.random.default_rng(9).standard_normal(z.shape))
    g = (softmax(z) - t) / z.shape[0]
    result = invoke(["grad", EX / "logits.npy", save(tmp_path, "t.npy", t),
                     "--grad", save(tmp_path, "g.npy", g), "--json"])
    assert result.exit_code == 0, result.output
    assert strict_json(result.stdout)["target_kind"] == "probability"


def test_neg_inf_logits_do_not_break_the_table(tmp_path, invoke):
    z = np.load(EX / "logits.npy").astype(np.float64)
    y = np.load(EX / "labels.npy")
    col = (y[0] + 1) % 10
    z[0, col] = -np.inf
    g = ce_grad(z, y)
    assert g[0, col] == 0.0
    result = invoke(["grad", save(tmp_path, "z.npy", z), EX / "labels.npy",
                     "--grad", save(tmp_path, "g.npy", g), "--fd", "off"])
    assert result.exit_code == 0, result.output


# --- stdin -----------------------------------------------------------------------------------

def test_logits_from_stdin_as_npy(invoke):
    data = (EX / "logits.npy").read_bytes()
    result = invoke(["grad", "-", EX / "labels.npy", "--grad", EX / "grad.npy"], input=data)
    assert result.exit_code == 0, result.output
    assert "logits from stdin" in result.stdout
    proc = run_script(["grad", "-", EX / "labels.npy", "--grad", EX / "grad_bad.npy"], input=data)
    assert proc.returncode == 1 and b"(7, 3)" in proc.stdout


def test_logits_from_stdin_as_csv(invoke):
    z = np.load(EX / "logits.npy")
    text = "\n".join(",".join(repr(float(v)) for v in row) for row in z) + "\n"
    result = invoke(["grad", "-", EX / "labels.npy", "--grad", EX / "grad.npy"], input=text)
    assert result.exit_code == 0, result.output
    proc = run_script(["grad", "-", EX / "labels.npy", "--grad", EX / "grad.npy"], input=text.encode())
    assert proc.returncode == 0, proc.stderr.decode()


@pytest.mark.parametrize("form", ["npy", "csv"])
def test_labels_from_stdin(invoke, form):
    y = np.load(EX / "labels.npy")
    data = npy_bytes(y) if form == "npy" else ("\n".join(map(str, y)) + "\n").encode()
    result = invoke(["grad", EX / "logits.npy", "-", "--grad", EX / "grad.npy"], input=data)
    assert result.exit_code == 0, result.output
    assert "labels from stdin" in result.stdout


def test_grad_from_stdin(invoke):
    data = (EX / "grad_bad.npy").read_bytes()
    result = invoke(["grad", EX / "logits.npy", EX / "labels.npy", "--grad", "-"], input=data)
    assert result.exit_code == 1
    assert re.search(r"^\(7, 3\)", result.stdout, re.M)


@pytest.mark.parametrize("fd", ["auto", "full", "directional", "sample", "off"])
def test_every_fd_mode_is_reachable(invoke, fd):
    good = invoke(example("grad.npy", "--fd", fd, "--json"))
    assert good.exit_code == 0, good.output
    data = strict_json(good.stdout)
    if fd != "auto":
        assert data["fd"]["mode"] == fd
    assert invoke(example("grad_bad.npy", "--fd", fd, "-q")).exit_code == 1
