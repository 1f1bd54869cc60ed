"""Regression tests for the security holes of issue #17 (S1-S4, and D9 which S1 closes)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ce_cli.stress.runner import CommandTemplate

SECRET = "s3cr3tTOKEN"


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    z = tmp_path / "z.npy"
    y = tmp_path / "y.npy"
    np.save(z, rng.standard_normal((4, 5)))
    np.save(y, np.array([0, 1, 2, 3]))
    return z, y


def test_s1_out_grad_never_follows_a_planted_symlink(tmp_path, invoke):
    z, y = _inputs(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (".g.npy.partial.npy", ".g.npy.partial"):  # the names ce-check used to use
        (tmp_path / name).symlink_to(victim)
    result = invoke(["grad", z, y, "--out-grad", tmp_path / "g.npy", "-q"])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert np.load(tmp_path / "g.npy").shape == (4, 5)


def test_s1_junit_never_follows_a_planted_symlink(tmp_path, invoke):
    z, y = _inputs(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".r.xml.partial").symlink_to(victim)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"name": "a", "kind": "multiclass", "logits": "z.npy",
                                    "labels": "y.npy"}) + "\n")
    result = invoke(["batch", manifest, "--junit-xml", tmp_path / "r.xml", "-q"])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert (tmp_path / "r.xml").read_text().startswith("<?xml")


def test_d9_input_named_like_a_temporary_file_is_not_touched(tmp_path, invoke):
    z, y = _inputs(tmp_path)
    planted = tmp_path / ".g.npy.partial.npy"
    shutil.copy(z, planted)
    before = planted.read_bytes()
    result = invoke(["grad", planted, y, "--out-grad", tmp_path / "g.npy", "--json"])
    assert result.exit_code == 0, result.output
    ref = invoke(["grad", z, y, "--json"])
    assert json.loads(result.stdout)["loss"] == json.loads(ref.stdout)["loss"]
    assert planted.read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
@pytest.mark.parametrize("option", ["--out-grad", "--junit-xml"])
def test_s2_non_regular_targets_are_refused(tmp_path, invoke, kind, option):
    z, y = _inputs(tmp_path)
    target = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        target = Path(os.devnull)
    before = os.stat(target)
    if option == "--out-grad":
        args = ["grad", z, y, "--out-grad", target]
    else:
        manifest = tmp_path / "m.jsonl"
        manifest.write_text(json.dumps({"name": "a", "kind": "multiclass", "logits": "z.npy",
                                        "labels": "y.npy"}) + "\n")
        args = ["batch", manifest, "--junit-xml", target]
    result = invoke(args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and option in result.stderr
    after = os.stat(target)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode)
    assert after.st_ino == before.st_ino


@pytest.mark.parametrize("evil", ["a;touch PWNED;b", "$(touch PWNED)", "x'y\"z `touch PWNED`"])
def test_s3_placeholders_are_quoted_for_the_shell(tmp_path, evil, monkeypatch):
    monkeypatch.chdir(tmp_path)
    template = CommandTemplate.parse("sh -c 'cp {logits} {grad} && cat {labels} > /dev/null'")
    folder = tmp_path / evil
    folder.mkdir()
    (folder / "logits.npy").write_bytes(b"L")
    (folder / "labels.npy").write_bytes(b"Y")
    values = {r: str(folder / f"{r}.npy") for r in ("logits", "labels", "grad", "loss")}
    argv = template.render({**values, "dtype": "float32", "reduction": "mean"})
    subprocess.run(argv, check=True, cwd=tmp_path)
    assert not (tmp_path / "PWNED").exists()
    assert (folder / "grad.npy").read_bytes() == b"L"
    # the reproducer's command.sh runs the same line through sh once more
    script = tmp_path / "command.sh"
    script.write_text("#!/bin/sh\n" + " ".join(__import__("shlex").quote(a) for a in argv) + "\n")
    (folder / "grad.npy").unlink()
    subprocess.run(["sh", str(script)], check=True, cwd=tmp_path)
    assert not (tmp_path / "PWNED").exists() and (folder / "grad.npy").exists()


def test_s3_direct_argv_is_not_quoted():
    template = CommandTemplate.parse(f"{sys.executable} x.py {{logits}} {{labels}} {{grad}}")
    argv = template.render({"logits": "/t/a b/l.npy", "labels": "l", "grad": "g", "loss": "",
                            "dtype": "", "reduction": ""})
    assert argv[2] == "/t/a b/l.npy"


def test_s3_stress_with_hostile_tmpdir_runs_no_command(tmp_path, invoke, monkeypatch):
    tmp = tmp_path / "t;touch PWNED;"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.chdir(tmp_path)
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    script = tmp_path / "impl.py"
    script.write_text("import sys, numpy as np\nz = np.load(sys.argv[1]).astype(np.float64)\n"
                      "e = np.exp(z - z.max(-1, keepdims=True)); a = e / e.sum(-1, keepdims=True)\n"
                      "np.save(sys.argv[3], a)\n")
    result = invoke(["stress", "--impl-cmd", f"sh -c '{sys.executable} {script} {{logits}} "
                     "{labels} {grad}'", "--dtypes", "f32", "--scales", "1", "--scenarios",
                     "spread", "--json", "--save-failures", tmp_path / "saved;touch PWNED2;"])
    assert result.exit_code in (0, 1), result.output
    assert not (tmp_path / "PWNED").exists() and not (tmp / "PWNED").exists()
    for sh in (tmp_path / "saved;touch PWNED2;").rglob("command.sh"):
        subprocess.run(["sh", str(sh)], cwd=tmp_path, capture_output=True, timeout=120)
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("content", [
    f"root:{SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    f"{SECRET}\n",
    f"user {SECRET} 1\n2 3 4\n",
    f"PRIVATE KEY\n{SECRET}{SECRET}{SECRET}\n",
])
def test_s4_file_content_is_never_echoed(tmp_path, invoke, content):
    z, y = _inputs(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text(content)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"name": f"c{i}", "kind": "multiclass", **case})
                                  for i, case in enumerate([
                                      {"logits": "secret", "labels": "y.npy"},
                                      {"logits": "z.npy", "labels": "secret"},
                                      {"logits": "z.npy", "labels": "y.npy", "grad": "secret"},
                                      {"logits": "z.npy", "labels": "y.npy", "loss": "secret"}]))
                        + "\n")
    result = invoke(["batch", manifest, "--junit-xml", tmp_path / "r.xml"])
    assert result.exit_code == 2, result.output
    for text in (result.stdout, result.stderr, (tmp_path / "r.xml").read_text()):
        assert SECRET not in text
    single = invoke(["grad", secret, y])
    assert single.exit_code == 2 and SECRET not in single.stderr + single.stdout


def test_s4_bad_cell_of_a_numeric_csv_is_quoted_short(tmp_path, invoke):
    _, y = _inputs(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5," + "x" * 10_000 + "\n")
    result = invoke(["grad", bad, y])
    assert result.exit_code == 2
    assert "line 2, column 3: not a number: 'xxxx" in result.stderr
    assert len(result.stderr) < 400
