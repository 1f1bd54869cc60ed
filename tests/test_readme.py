"""The README's examples run: the ```python blocks of "## API" (and the pytest tests they define),
the batch manifest of "## In CI" with the statuses and exit code its transcript shows, and the
console transcripts themselves (through the installed `ce-check` and `jq`).

A block preceded by a line `<!-- no-test -->` is not run."""

import json
import os
import re
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import CE_CHECK, FIXTURES, ROOT

README = ROOT / "README.md"
FENCE = re.compile(r"^(<!-- no-test -->\s*\n)?```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def blocks(title: str, lang: str) -> list[str]:
    return [body for skip, kind, body in FENCE.findall(section(title)) if kind == lang and not skip]


def transcript(body: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines (a trailing backslash continues them) and the output lines after each."""
    steps: list[tuple[str, list[str]]] = []
    lines = iter(body.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + next(lines).strip()
            steps.append((command, []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def batch_example() -> tuple[str, list[tuple[str, list[str]]]]:
    """The manifest (the ```jsonl block) and the transcript that runs `ce-check batch` on it."""
    (manifest,) = blocks("In CI", "jsonl")
    runs = [transcript(b) for b in blocks("In CI", "console")]
    (steps,) = [s for s in runs if any(" batch " in cmd for cmd, _out in s)]
    return manifest, steps


def workdir(tmp_path: Path, manifest: str, steps) -> Path:
    """tmp_path with the repository's fixtures and the manifest where the batch command expects it."""
    (tmp_path / "fixtures").symlink_to(FIXTURES, target_is_directory=True)
    for cmd, _out in steps:
        words = shlex.split(cmd)
        if words[:2] == ["ce-check", "batch"]:
            path = tmp_path / words[2]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(manifest, encoding="utf-8")
    return tmp_path


# --- ## API --------------------------------------------------------------------------------------

def test_api_python_blocks_run(monkeypatch, capsys):
    code = blocks("API", "python")
    assert len(code) >= 2, "the API section has its examples"
    monkeypatch.chdir(ROOT)  # the examples use fixtures/example/*.npy
    ran_tests = 0
    for i, body in enumerate(code):
        namespace = {"__name__": f"readme_api_block_{i}"}
        exec(compile(body, f"README.md (API, python block {i + 1})", "exec"), namespace)
        for name, fn in namespace.items():
            if name.startswith("test_") and callable(fn):
                fn()  # the pytest example: its tests pass
                ran_tests += 1
    assert ran_tests >= 2


def test_api_failure_message_is_the_real_one(monkeypatch):
    """The ```text block shows the start of the assertion message for grad_bad.npy."""
    import numpy as np

    from ce_cli.testing import assert_ce_grad

    (shown,) = blocks("API", "text")
    monkeypatch.chdir(ROOT)
    with pytest.raises(AssertionError) as info:
        assert_ce_grad(np.load("fixtures/example/logits.npy"), np.load("fixtures/example/labels.npy"),
                       np.load("fixtures/example/grad_bad.npy"))
    assert f"AssertionError: {info.value}".startswith(shown.rstrip("\n"))


# --- ## In CI ------------------------------------------------------------------------------------

def test_batch_manifest_example(invoke, tmp_path, monkeypatch):
    """The manifest runs with the exit code, statuses and error the transcript shows (no jq needed)."""
    manifest, steps = batch_example()
    work = workdir(tmp_path, manifest, steps)
    monkeypatch.chdir(work)
    (command, output), *rest = steps
    words = shlex.split(command)
    args = words[1:words.index(">")] if ">" in words else words[1:]
    result = invoke(args)
    shown_exit = int(next(line for line in output if line.startswith("exit ")).split()[1])
    assert result.exit_code == shown_exit, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    shown = [json.loads(line) for _cmd, out in rest for line in out if line.startswith('{"name"')]
    assert [{"name": r["name"], "status": r["status"]} for r in lines] == shown
    errors = [r["error"] for r in lines if r["status"] == "error"]
    shown_errors = [out for cmd, out in rest if '"error"' in cmd]
    assert shown_errors and errors == shown_errors[0]
    junit = words[words.index("--junit-xml") + 1]
    cases = ET.parse(work / junit).getroot().iter("testcase")
    assert [c.get("name") for c in cases] == [r["name"] for r in lines]


def test_in_ci_transcripts(tmp_path):
    """Every `$ command` of the In CI section, through a shell, prints what the README shows."""
    ce_check = CE_CHECK
    if not ce_check.exists():
        pytest.skip(f"console script not installed at {ce_check}")
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    manifest, steps = batch_example()
    work = workdir(tmp_path, manifest, steps)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CE_CHECK_DEBUG")}
    env["PATH"] = f"{ce_check.parent}{os.pathsep}{env.get('PATH', '')}"
    runs = [transcript(b) for b in blocks("In CI", "console")]
    assert sum(len(s) for s in runs) >= 3
    for steps in runs:
        for command, output in steps:
            done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.stdout.splitlines() == output, f"$ {command}\n{done.stderr}"


def test_in_ci_exit_code_table_matches_the_cli():
    """The table's codes are the ones `ce_cli.exitcodes` defines."""
    from ce_cli.exitcodes import ExitCode

    rows = re.findall(r"^\| (\d) \|", section("In CI"), re.M)
    assert sorted(map(int, rows)) == sorted(int(c) for c in ExitCode)
