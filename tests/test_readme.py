"""The README's examples are real: the quick start's two commands (and `.ci/run`), every console
transcript of "## Worked examples" (run through the installed `ce-check`, in a temp copy of
`examples/`, output compared line by line), the batch manifest and its statuses, the JSON sample
(a subset of the real `--json` object), the Python API blocks, the exit-code table, and links that
stay inside the repository. Content moved to docs/ is checked to be there.

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

from tests.conftest import CE_CHECK, FIXTURES, ROOT, script_env

README = ROOT / "README.md"
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
FENCE = re.compile(r"^(<!-- no-test -->\s*\n)?```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
COMMANDS = ("grad", "binary", "linear", "explain", "stress", "batch")


def section(title: str, text: str | None = None, level: int = 2) -> str:
    """The body of the heading `title` at `level`, up to the next heading of that level or above."""
    text = README.read_text(encoding="utf-8") if text is None else text
    hashes = "#" * level
    # a heading starts with a word or a backtick (a table row in a code block may start with "# ")
    match = re.search(rf"^{hashes} {re.escape(title)}\s*$(.*?)(?=^#{{1,{level}}} [\w`]|\Z)", text, re.M | re.S)
    assert match, f"no '{hashes} {title}' section"
    return match.group(1)


def blocks(body: str, lang: str) -> list[str]:
    return [code for skip, kind, code in FENCE.findall(body) if kind == lang and not skip]


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


def worked_examples() -> list[tuple[str, str]]:
    """(subsection title, console block) for every transcript of "## Worked examples"."""
    body = section("Worked examples")
    titles = re.findall(r"^### (.+?)\s*$", body, re.M)
    return [(t, code) for t in titles for code in blocks(section(t, body, level=3), "console")]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A temp copy of examples/, with the repository's fixtures beside it (the quick start's paths)."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    (tmp_path / "fixtures").symlink_to(FIXTURES, target_is_directory=True)
    return tmp_path


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`command` through bash, as a user types it: the installed ce-check first on PATH, 80 columns."""
    if not CE_CHECK.exists():
        pytest.skip(f"console script not installed at {CE_CHECK}")
    env = script_env(COLUMNS="80", NO_COLOR="1")
    env["PATH"] = f"{CE_CHECK.parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def subset(shown, real, where: str = "$") -> None:
    """`shown` is `real` abridged: dicts with fewer keys, lists cut (a prefix), equal values."""
    if isinstance(shown, dict):
        assert isinstance(real, dict), where
        for key, value in shown.items():
            assert key in real, f"{where}.{key} is not in the real output"
            subset(value, real[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(real, list) and len(shown) <= len(real), where
        for i, (a, b) in enumerate(zip(shown, real)):
            subset(a, b, f"{where}[{i}]")
    else:
        assert shown == real, f"{where}: README shows {shown!r}, the output is {real!r}"


# --- length, contents, links ----------------------------------------------------------------------

def test_readme_is_short_with_a_table_of_contents():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 330
    contents = re.search(r"^\*\*Contents:\*\*(.*?)^$", text, re.M | re.S)
    assert contents, "README.md has no table of contents"
    anchors = set(re.findall(r"\]\(#([^)]+)\)", contents.group(1)))
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    assert anchors and anchors <= headings, anchors - headings


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_links_stay_in_the_repository(path):
    """Every relative link resolves to a file of the repository; none is absolute or leaves it."""
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("#", "https://", "http://")):
            assert not target.startswith("http"), f"{path.name}: {target} leaves the repository"
            continue
        file = target.split("#")[0]
        assert not file.startswith("/"), f"{path.name}: absolute link {target}"
        resolved = (path.parent / file).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name}: {target} leaves the repository"
        assert resolved.exists(), f"{path.name}: {target} does not exist"
    assert not any(marker in text for marker in OUTSIDE)


@pytest.mark.parametrize("doc, phrases", [
    ("inputs.md", ["allow_pickle=False", "Security stance", "safetensors", "CVE-2025-32434", "2 GiB"]),
    ("frameworks.md", ["From your framework", "vocab_parallel_cross_entropy", "--shift-labels",
                       "deliberate difference"]),
    ("tolerance.md", ["floor = k·eps", "Flush-to-zero", "Diagnosis", "Calibrated on real frameworks"]),
    ("finite-differences.md", ["h = eps^(1/3)", "--fd directional", "bisected"]),
    ("performance.md", ["AVX-512", "glibc", "bench/run.py", "gradcheck"]),
    ("explain.md", ["jacobian_symmetric", "--compare-mse", "--plot", "C ≤ 12"]),
    ("stress.md", ["breaking points", "--save-failures", "--impl-cmd", "command.sh"]),
    ("ci.md", ["--junit-xml", "--fail-fast", "GitHub Actions", "examples/cases.jsonl"]),
    ("shards.md", ["--shards vocab", "math.fsum", "bench/shards.py"]),
    ("linear.md", ["Freivalds", "--exact", "bench/linear.py"]),
    ("binary.md", ["two-class bridge", "--pos-weight"]),
    ("api.md", ["check_binary", "assert_ce_grad", "CeCheckError"]),
])
def test_moved_content_is_in_docs(doc, phrases):
    text = (DOCS / doc).read_text(encoding="utf-8")
    for phrase in phrases:
        assert phrase in text, f"docs/{doc} lost {phrase!r}"


# --- ## Quick start -------------------------------------------------------------------------------

def quick_start() -> list[str]:
    (code,) = blocks(section("Quick start"), "sh")
    return [line for line in code.splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_them():
    commands = quick_start()
    assert len(commands) == 2
    assert all(c.startswith("pip install ") and " && " in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[0] in ci.splitlines()
    install, test = commands[1].split(" && ")
    assert f"{install} \\" in ci and f"&& {test}" in ci


def test_quick_start_check_runs(work):
    """The first command's check (after the install) passes on the shipped fixture."""
    _install, check = quick_start()[0].split(" && ")
    assert check.startswith("ce-check grad ")
    done = shell(check, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("verdict: PASS")


# --- ## Worked examples ---------------------------------------------------------------------------

def test_every_command_has_a_worked_example():
    shown = " ".join(cmd for _title, code in worked_examples() for cmd, _out in transcript(code))
    for command in COMMANDS:
        assert f"ce-check {command} " in shown, command
    assert "--shards " in shown


@pytest.mark.parametrize("title, code", worked_examples(), ids=[t for t, _c in worked_examples()])
def test_worked_example_transcript(title, code, work):
    """Each `$ command` prints what the README shows (trailing spaces aside), in order."""
    steps = transcript(code)
    assert steps
    if any(re.search(r"(^|\| )jq ", cmd) for cmd, _out in steps) and shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    for command, output in steps:
        done = shell(command, work / "examples")
        got = [line.rstrip() for line in done.stdout.splitlines()]
        assert got == [line.rstrip() for line in output], f"$ {command}\n{done.stderr}"


def test_batch_manifest_is_the_example_file():
    (shown,) = blocks(section("batch", section("Worked examples"), level=3), "jsonl")
    assert shown == (EXAMPLES / "cases.jsonl").read_text(encoding="utf-8")


def test_batch_manifest_example(invoke, work, monkeypatch):
    """The manifest runs with the exit code, statuses and error the transcript shows (no jq needed),
    and writes one JUnit testcase per case."""
    body = section("batch", section("Worked examples"), level=3)
    (code,) = blocks(body, "console")
    (command, output), *rest = transcript(code)
    monkeypatch.chdir(work / "examples")
    words = shlex.split(command)
    result = invoke(words[1:words.index(">")])
    shown_exit = int(next(line for line in output if line.startswith("exit ")).split()[1])
    assert result.exit_code == shown_exit, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    shown = [json.loads(line) for _cmd, out in rest for line in out if line.startswith('{"name"')]
    assert [{"name": r["name"], "status": r["status"]} for r in lines] == shown
    errors = [r["error"] for r in lines if r["status"] == "error"]
    shown_errors = [out for cmd, out in rest if '"error"' in cmd]
    assert shown_errors and errors == shown_errors[0]
    junit = words[words.index("--junit-xml") + 1]
    cases = ET.parse(work / "examples" / junit).getroot().iter("testcase")
    assert [c.get("name") for c in cases] == [r["name"] for r in lines]


# --- ## JSON output -------------------------------------------------------------------------------

def test_json_sample_is_the_real_output(invoke, work, monkeypatch):
    (sample,) = blocks(section("JSON output"), "json")
    monkeypatch.chdir(work / "examples")
    result = invoke(["grad", "logits.npy", "labels.npy", "--grad", "grad_bad.npy", "--json"])
    assert result.exit_code == 1
    subset(json.loads(sample), json.loads(result.stdout))


# --- ## Exit codes, help --------------------------------------------------------------------------

def test_exit_code_table_matches_the_cli():
    """The table's codes are the ones `ce_cli.exitcodes` defines."""
    from ce_cli.exitcodes import ExitCode

    rows = re.findall(r"^\| (\d) \|", section("Exit codes"), re.M)
    assert sorted(map(int, rows)) == sorted(int(c) for c in ExitCode)


def test_every_command_in_the_table_has_help(invoke):
    listed = re.findall(r"^\| `ce-check (\w+)` \|", README.read_text(encoding="utf-8"), re.M)
    assert sorted(listed) == sorted(COMMANDS)
    top = invoke(["--help"])
    for command in listed:
        assert command in top.stdout
        result = invoke([command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.stdout, command


# --- ## API (README) and docs/api.md --------------------------------------------------------------

def run_python_blocks(code: list[str], origin: str) -> int:
    ran_tests = 0
    for i, body in enumerate(code):
        namespace = {"__name__": f"readme_block_{i}"}
        exec(compile(body, f"{origin}, python block {i + 1}", "exec"), namespace)
        for name, fn in namespace.items():
            if name.startswith("test_") and callable(fn):
                fn()  # the pytest example: its tests pass
                ran_tests += 1
    return ran_tests


def test_api_python_blocks_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the examples use examples/*.npy and fixtures/example/*.npy
    readme = blocks(section("API"), "python")
    assert readme and run_python_blocks(readme, "README.md (API)") >= 1
    docs = blocks((DOCS / "api.md").read_text(encoding="utf-8"), "python")
    assert len(docs) >= 2 and run_python_blocks(docs, "docs/api.md") >= 2


def test_api_failure_message_is_the_real_one(monkeypatch):
    """docs/api.md's ```text block shows the start of the assertion message for grad_bad.npy."""
    import numpy as np

    from ce_cli.testing import assert_ce_grad

    (shown,) = blocks((DOCS / "api.md").read_text(encoding="utf-8"), "text")
    monkeypatch.chdir(ROOT)
    with pytest.raises(AssertionError) as info:
        assert_ce_grad(np.load("examples/logits.npy"), np.load("examples/labels.npy"),
                       np.load("examples/grad_bad.npy"))
    assert f"AssertionError: {info.value}".startswith(shown.rstrip("\n"))


OUTSIDE = ("/" + "work/", ".." + "/shared")  # spelt apart so this file does not match itself


def test_no_committed_file_points_outside_the_repository():
    """No tracked text file names a machine path or a sibling folder outside the checkout."""
    import subprocess
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    bad = []
    for name in listed.stdout.splitlines():
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".txt", ".cfg", ".jsonl", ".json", ".sh", ".yml", ""}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if any(marker in text for marker in OUTSIDE):
            bad.append(name)
    assert not bad, f"paths outside the repository in: {bad}"
