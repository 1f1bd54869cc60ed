"""Bad input exits 2 with exactly one line on stderr, `ce-check: error: ...`, naming the file,
the shape and the offending index; never a traceback, never exit 3, never a hang.

Every case runs twice: in-process through CliRunner and through the installed console script.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CE_CHECK, npy_bytes, run_script, save, script_env, softmax

def assert_one_line_error(code: int, stdout: str, stderr: str, fragments) -> str:
    assert code == 2, f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    assert lines[0].startswith("ce-check: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert stdout == ""
    return lines[0]


# --- a small valid problem, and the bad variants ---------------------------------------------

def base(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 5))
    y = np.array([0, 1, 2, 4])
    g = (softmax(z) - np.eye(5)[y]) / 4
    return z, y, g, save(tmp_path, "logits.npy", z), save(tmp_path, "labels.npy", y), \
        save(tmp_path, "grad.npy", g)


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return str(path)


def case_missing_file(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", str(tmp_path / "nope.npy"), lab], ["nope.npy", "no such file"], None


def case_missing_grad_file(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--grad", str(tmp_path / "g_missing.npy")], \
        ["grad file", "g_missing.npy", "no such file"], None


def case_directory(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    (tmp_path / "adir").mkdir()
    return ["grad", str(tmp_path / "adir"), lab], ["adir", "directory"], None


def case_text_garbage_npy(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", write(tmp_path, "garbage.npy", "this is not an array\n"), lab], \
        ["garbage.npy", "not a .npy file"], None


def case_binary_garbage(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", write(tmp_path, "junk.bin", bytes(range(256))), lab], ["junk.bin", "binary"], None


def case_pickled_object_array(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    path = tmp_path / "pickled.npy"
    np.save(path, np.array([[1.0, "x"], [None, {}]], dtype=object), allow_pickle=True)
    return ["grad", path, lab], ["pickled.npy", "shape (2, 2)", "object", "pickled"], None


def case_truncated_npy(tmp_path):
    z, _, _, _, lab, _ = base(tmp_path)
    data = npy_bytes(z)
    return ["grad", write(tmp_path, "cut.npy", data[:-13]), lab], \
        ["cut.npy", "truncated", "(4, 5)"], None


def case_header_claims_more(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    path = tmp_path / "liar.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 10**5)})
        fh.write(b"\0" * 80)
    return ["grad", path, lab], ["liar.npy", "truncated", "(1000000000, 100000)"], None


def case_unicode_dtype(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", save(tmp_path, "words.npy", np.array([["a", "b"], ["c", "d"]])), lab], \
        ["words.npy", "shape (2, 2)", "not numeric"], None


def case_complex_dtype(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", save(tmp_path, "cplx.npy", np.ones((4, 5), dtype=complex)), lab], \
        ["cplx.npy", "shape (4, 5)", "complex"], None


def case_ragged_csv(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", write(tmp_path, "ragged.csv", "1,2,3\n4,5\n"), lab], \
        ["ragged.csv", "line 2", "ragged"], None


def case_non_numeric_csv_cell(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", write(tmp_path, "cells.csv", "a,b,c\n1,2,3\n4,five,6\n"), lab], \
        ["cells.csv", "line 3, column 2", "'five'"], None


def case_empty_batch(tmp_path):
    return ["grad", save(tmp_path, "empty.npy", np.zeros((0, 5))),
            save(tmp_path, "elabels.npy", np.zeros(0, dtype=np.int64))], \
        ["empty.npy", "(0, 5)", "empty batch"], None


def case_scalar_logits(tmp_path):
    return ["grad", save(tmp_path, "scalar.npy", np.array(1.5)), save(tmp_path, "l0.npy", np.array(0))], \
        ["scalar.npy", "scalar", "shape ()"], None


def case_labels_shape_mismatch(tmp_path):
    _, _, _, log, _, _ = base(tmp_path)
    return ["grad", log, save(tmp_path, "short.npy", np.array([0, 1, 2]))], \
        ["short.npy", "(3,)", "(4, 5)", "(4,)"], None


def case_grad_shape_mismatch(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--grad", save(tmp_path, "gT.npy", np.zeros((5, 4)))], \
        ["gT.npy", "(5, 4)", "(4, 5)"], None


def case_weight_shape_mismatch(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--weight", save(tmp_path, "w4.npy", np.ones(4))], \
        ["w4.npy", "(4,)", "5 classes"], None


def case_weight_non_finite(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--weight", save(tmp_path, "wnan.npy", [1, 1, np.nan, 1, 1])], \
        ["wnan.npy", "non-finite", "(2,)"], None


def case_label_out_of_range(tmp_path):
    _, _, _, log, _, _ = base(tmp_path)
    return ["grad", log, save(tmp_path, "big.npy", np.array([0, 1, 5, 2]))], \
        ["big.npy", "label 5", "index (2,)", "[0, 5)"], None


def case_negative_label(tmp_path):
    _, _, _, log, _, _ = base(tmp_path)
    return ["grad", log, save(tmp_path, "neg.npy", np.array([0, -1, 2, 2]))], \
        ["neg.npy", "label -1", "index (1,)", "-100"], None


def case_fractional_label(tmp_path):
    _, _, _, log, _, _ = base(tmp_path)
    return ["grad", log, save(tmp_path, "frac.npy", np.array([0.0, 1.0, 2.5, 3.0]))], \
        ["frac.npy", "2.5", "index (2,)", "whole number"], None


def case_nan_label(tmp_path):
    _, _, _, log, _, _ = base(tmp_path)
    return ["grad", log, save(tmp_path, "nanlab.npy", np.array([0.0, np.nan, 2.0, 3.0]))], \
        ["nanlab.npy", "index (1,)"], None


def case_nan_logit(tmp_path):
    z, _, _, _, lab, _ = base(tmp_path)
    z[2, 3] = np.nan
    return ["grad", save(tmp_path, "nanz.npy", z), lab], ["nanz.npy", "NaN", "(2, 3)", "(4, 5)"], None


def case_posinf_logit(tmp_path):
    z, _, _, _, lab, _ = base(tmp_path)
    z[2, 3] = np.inf
    return ["grad", save(tmp_path, "infz.npy", z), lab], ["infz.npy", "+inf", "(2, 3)"], None


def case_nan_logit_class_axis_1(tmp_path):
    z = np.zeros((2, 5, 3))
    z[1, 4, 2] = np.nan
    return ["grad", save(tmp_path, "nchw.npy", z), save(tmp_path, "l23.npy", np.zeros((2, 3), int)),
            "--class-axis", "1"], ["nchw.npy", "NaN", "(1, 4, 2)"], None


def case_all_neg_inf_row_not_ignored(tmp_path):
    z, _, _, _, lab, _ = base(tmp_path)
    z[1] = -np.inf
    return ["grad", save(tmp_path, "masked.npy", z), lab, "--fd", "off"], \
        ["masked.npy", "sample (1,)", "-inf"], None


def case_label_smoothing_too_big(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--label-smoothing", "1.5"], ["--label-smoothing", "1.5"], None


def case_label_smoothing_negative(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--label-smoothing", "-0.1"], ["--label-smoothing", "-0.1"], None


def case_unknown_reduction(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--reduction", "avg"], ["--reduction", "avg"], None


def case_unknown_fd(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--fd", "maybe"], ["--fd", "maybe"], None


def case_unknown_option(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--frobnicate"], ["--frobnicate"], None


def case_missing_argument(tmp_path):
    _, _, _, log, _, _ = base(tmp_path)
    return ["grad", log], ["labels"], None


def case_unknown_command(tmp_path):
    return ["gradd"], ["gradd"], None


def case_bad_int_option(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--ignore-index", "x"], ["--ignore-index"], None


def case_negative_seed(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--fd", "sample", "--seed", "-1"], ["--seed"], None


def case_bad_class_axis(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--class-axis", "5"], ["logits.npy", "(4, 5)", "axis 5"], None


def case_zero_samples(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--fd", "sample", "--samples", "0"], ["--samples"], None


def case_negative_rtol(tmp_path):
    _, _, _, log, lab, grad = base(tmp_path)
    return ["grad", log, lab, "--grad", grad, "--rtol", "-1"], ["--rtol"], None


def case_two_stdin_inputs(tmp_path):
    return ["grad", "-", "-"], ["only one input", "logits", "labels"], b""


def case_two_stdin_inputs_grad(tmp_path):
    _, _, _, log, _, _ = base(tmp_path)
    return ["grad", log, "-", "--grad", "-"], ["only one input", "labels", "grad"], b""


def case_empty_stdin(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    return ["grad", "-", lab], ["logits from stdin", "empty"], b""


def case_truncated_stdin(tmp_path):
    z, _, _, _, lab, _ = base(tmp_path)
    return ["grad", "-", lab], ["logits from stdin", "truncated"], npy_bytes(z)[:-9]


def case_npz_without_key(tmp_path):
    z, y, _, _, lab, _ = base(tmp_path)
    np.savez(tmp_path / "both.npz", logits=z, labels=y)
    return ["grad", tmp_path / "both.npz", lab], ["both.npz", "logits, labels", "FILE.npz:KEY"], None


def case_npz_missing_key(tmp_path):
    z, y, _, _, _, _ = base(tmp_path)
    np.savez(tmp_path / "both.npz", logits=z, labels=y)
    return ["grad", f"{tmp_path / 'both.npz'}:logits", f"{tmp_path / 'both.npz'}:targets"], \
        ["both.npz", "'targets'", "logits, labels"], None


def case_ignore_index_with_probabilities(tmp_path):
    z, _, _, log, _, _ = base(tmp_path)
    return ["grad", log, save(tmp_path, "soft.npy", softmax(z)), "--ignore-index", "0"], \
        ["--ignore-index 0", "probability targets", "soft.npy"], None


def case_integer_grad(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--grad", save(tmp_path, "gint.npy", np.zeros((4, 5), dtype=np.int32))], \
        ["gint.npy", "int32", "floating point"], None


def case_loss_neither_file_nor_number(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--loss", "lossfile.npy"], ["--loss", "lossfile.npy"], None


def case_loss_wrong_shape(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--loss", save(tmp_path, "l3.npy", np.ones(3))], \
        ["l3.npy", "(3,)", "scalar"], None


def case_per_sample_loss_wrong_shape(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--reduction", "none", "--loss", save(tmp_path, "l3.npy", np.ones(3))], \
        ["l3.npy", "(3,)", "(4,)"], None


def case_out_grad_unwritable(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--out-grad", tmp_path / "no" / "such" / "dir" / "g.npy"], \
        ["--out-grad", "g.npy", "cannot write"], None


def case_out_grad_is_the_logits_file(tmp_path):
    _, _, _, log, lab, _ = base(tmp_path)
    return ["grad", log, lab, "--out-grad", log], ["--out-grad", "logits.npy", "logits file"], None


def case_out_grad_is_the_grad_file(tmp_path):
    _, _, _, log, lab, grad = base(tmp_path)
    return ["grad", log, lab, "--grad", grad, "--out-grad", grad], ["--out-grad", "grad.npy", "grad file"], None


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]
IDS = [f.__name__[5:] for f in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_in_process(tmp_path, invoke, case):
    args, fragments, stdin = case(tmp_path)
    result = invoke(args, input=stdin)
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, fragments)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_console_script(tmp_path, case):
    args, fragments, stdin = case(tmp_path)
    proc = run_script(args, input=stdin if stdin is not None else b"")
    assert_one_line_error(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), fragments)


# --- cases that need a real process, or are legal ----------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path, invoke):
    _, _, _, log, lab, _ = base(tmp_path)
    os.chmod(log, 0)
    try:
        result = invoke(["grad", log, lab])
        assert_one_line_error(result.exit_code, result.stdout, result.stderr,
                              ["logits.npy", "cannot read"])
    finally:
        os.chmod(log, 0o600)


@pytest.mark.skip(reason="stdin from a TTY needs a pseudo-terminal session; loading refuses isatty()")
def test_stdin_from_tty_does_not_hang():
    pass


@pytest.mark.skipif(os.name != "posix", reason="needs fork/close")
def test_closed_stdin(tmp_path):
    _, _, _, _, lab, _ = base(tmp_path)
    proc = run_script(["grad", "-", lab], stdin=None, preexec_fn=lambda: os.close(0))
    assert_one_line_error(proc.returncode, proc.stdout.decode(), proc.stderr.decode(),
                          ["logits from stdin", "closed"])


@pytest.mark.skipif(shutil.which("bash") is None or not CE_CHECK.exists(), reason="needs bash")
@pytest.mark.parametrize("fmt", ["npy", "csv"])
def test_process_substitution_is_read_whole(tmp_path, fmt):
    """bash's <(cmd) is a pipe: sniffing its format must not eat its first bytes."""
    z, _, g, _, lab, grad = base(tmp_path)
    if fmt == "npy":
        src = save(tmp_path, "copy.npy", z)
    else:
        src = write(tmp_path, "copy.csv", "\n".join(",".join(repr(float(v)) for v in row) for row in z))
    cmd = f'"{CE_CHECK}" grad <(cat "{src}") "{lab}" --grad "{grad}" -q'
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=60, env=script_env())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""


@pytest.mark.parametrize("fd", ["off", "auto", "full", "sample"])
def test_neg_inf_logits_are_legal(tmp_path, invoke, fd):
    """-inf is a mask: probability 0, gradient 0, exit 0, at most warnings on stderr."""
    z, y, _, _, lab, _ = base(tmp_path)
    z[0, 3] = -np.inf  # not the target of row 0 (label 0)
    g = (softmax(z) - np.eye(5)[y]) / 4
    assert g[0, 3] == 0.0
    result = invoke(["grad", save(tmp_path, "masked.npy", z), lab, "--grad", save(tmp_path, "gm.npy", g),
                     "--fd", fd, "--samples", "1000"])
    assert result.exit_code == 0, result.output
    assert all(line.startswith("ce-check: warning:") for line in result.stderr.splitlines())


def test_neg_inf_logits_with_label_smoothing_are_legal(tmp_path, invoke):
    z, _, _, _, lab, _ = base(tmp_path)
    z[0, 3] = -np.inf
    result = invoke(["grad", save(tmp_path, "masked.npy", z), lab, "--label-smoothing", "0.1", "--json"])
    assert result.exit_code == 0, result.output


def test_typed_loss_with_huge_exponent(tmp_path, invoke):
    _, _, _, log, lab, _ = base(tmp_path)
    result = invoke(["grad", log, lab, "--loss", "1e999999999"])
    assert result.exit_code == 1, result.output  # an infinite loss is a failed check, not a crash


def test_out_grad_left_absent_when_input_is_bad(tmp_path, invoke):
    z, _, _, _, lab, _ = base(tmp_path)
    z[2, 3] = np.nan
    out = tmp_path / "partial.npy"
    result = invoke(["grad", save(tmp_path, "nan.npy", z), lab, "--out-grad", out])
    assert result.exit_code == 2, result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".partial*")) and not list(tmp_path.glob(".*.partial.npy"))


def test_csv_with_header_line_is_accepted(tmp_path, invoke):
    z, _, _, _, lab, grad = base(tmp_path)
    text = "c0,c1,c2,c3,c4\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in z) + "\n"
    result = invoke(["grad", write(tmp_path, "with_header.csv", text), lab, "--grad", grad])
    assert result.exit_code == 0, result.output


def test_npz_with_key_works(tmp_path, invoke):
    z, y, g, _, _, _ = base(tmp_path)
    np.savez(tmp_path / "all.npz", logits=z, labels=y, grad=g)
    npz = tmp_path / "all.npz"
    result = invoke(["grad", f"{npz}:logits", f"{npz}:labels", "--grad", f"{npz}:grad"])
    assert result.exit_code == 0, result.output


def test_weight_as_one_line_csv(tmp_path, invoke):
    z, y, _, log, lab, _ = base(tmp_path)
    w = np.array([1.0, 2.0, 0.5, 1.0, 3.0])
    q = w[y][:, None] * np.eye(5)[y]
    g = (w[y][:, None] * softmax(z) - q) / w[y].sum()
    for text in (",".join(map(str, w)) + "\n", "\n".join(map(str, w)) + "\n"):
        result = invoke(["grad", log, lab, "--weight", write(tmp_path, "w.csv", text),
                         "--grad", save(tmp_path, "gw.npy", g)])
        assert result.exit_code == 0, result.output


def test_labels_as_one_line_csv(tmp_path, invoke):
    _, y, _, log, _, grad = base(tmp_path)
    result = invoke(["grad", log, write(tmp_path, "y.csv", ",".join(map(str, y)) + "\n"), "--grad", grad])
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(not hasattr(os, "link"), reason="needs hard links")
def test_out_grad_never_overwrites_an_input(tmp_path, invoke):
    """Inputs are memory-mapped: writing --out-grad over one would compute on, and destroy, it."""
    z, _, _, log, lab, _ = base(tmp_path)
    before = Path(log).read_bytes()
    os.link(log, tmp_path / "alias.npy")
    result = invoke(["grad", log, lab, "--out-grad", tmp_path / "alias.npy"])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, ["--out-grad", "logits"])
    assert Path(log).read_bytes() == before
    np.savez(tmp_path / "in.npz", z=z)
    result = invoke(["grad", f"{tmp_path / 'in.npz'}:z", lab, "--out-grad", tmp_path / "in.npz"])
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, ["--out-grad", "logits"])
