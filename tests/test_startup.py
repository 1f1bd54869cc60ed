"""Start-up: `ce-check --help` and every command's `--help` load neither numpy nor Rich's tables,
and a small `grad --json` loads only what it uses (issue #15). Each case runs in a fresh
interpreter: what a process imports is visible only there. No timing here (bench/startup.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ce_cli.cli.main import BLAS_THREAD_VARS, COMMANDS

# Runs the console script's entry point with argv, then reports on stderr which of the watched
# modules the process imported (after the help or the report on stdout).
PROBE = """
import json, sys
watched = json.loads(sys.argv[1])
sys.argv = ["ce-check", *sys.argv[2:]]
from ce_cli.cli.main import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
print("LOADED=" + json.dumps(sorted(m for m in watched if m in sys.modules)), file=sys.stderr)
import gc
print("FROZEN=%d" % gc.get_freeze_count(), file=sys.stderr)
sys.exit(code)
"""

# pydantic: Typer >= 0.29 validates every option with it (~60 ms); pyproject.toml keeps Typer < 0.29
HEAVY = ["numpy", "rich.table", "rich.progress", "rich.console", "pydantic"]
# what a multiclass `grad` has no use for: the sigmoid model and the two-class bridge are
# check_binary's, the safetensors and .pt readers load for those files only, the diagnosis for
# a failed gradient check only
UNUSED_BY_GRAD = ["rich.table", "rich.progress", "rich.console", "ce_cli.stress",
                  "ce_cli.explain", "ce_cli.batch", "ce_cli.verify.linear", "ce_cli.verify.shards",
                  "ce_cli.distributed", "pydantic", "ce_cli.models.sigmoid", "ce_cli.verify.bridge",
                  "ce_cli.kernels.numpy_sigmoid", "ce_cli.io.safetensors", "ce_cli.io.torch_pt",
                  "ce_cli.verify.diagnosis"]


@pytest.fixture
def small(tmp_path):
    """A folder holding z.npy (4 x 5 logits) and y.npy (their labels)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "z.npy", rng.standard_normal((4, 5)))
    np.save(tmp_path / "y.npy", rng.integers(0, 5, 4))
    return tmp_path


def loaded(args: list[str], watched: list[str], cwd=None) -> tuple[int, str, list[str]]:
    """Exit code, stdout, and which of `watched` a fresh `ce-check ARGS` process imported."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(watched), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED=")]
    assert line, proc.stderr
    return proc.returncode, proc.stdout, json.loads(line[-1][len("LOADED="):])


def pydantic_hint(mods: list[str]) -> str:
    """Why pydantic may show up: a Typer >= 0.29 left in the environment."""
    import typer

    return (f"typer {typer.__version__} validates options with pydantic; pyproject.toml asks for "
            "typer<0.29: reinstall (pip install -e .)") if "pydantic" in mods else ""


def test_probe_sees_imports():
    """The probe itself can fail: a command that does load numpy is reported."""
    code, _, mods = loaded(["--version"], ["numpy", "ce_cli.cli.app"])
    assert code == 0 and mods == ["ce_cli.cli.app"]
    proc = subprocess.run([sys.executable, "-c", PROBE.replace("from ce_cli", "import numpy\nfrom ce_cli"),
                           json.dumps(["numpy"]), "--help"], capture_output=True, text=True, timeout=120)
    assert 'LOADED=["numpy"]' in proc.stderr


# the command modules: each builds its command on import (cli/app.py LazyCommands)
COMMAND_MODULES = [f"ce_cli.cli.{name}" for name in COMMANDS]


@pytest.mark.parametrize("args", [["--help"], ["-h"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_loads_no_numpy_nor_rich(args):
    """... and builds no command other than the one asked for (none for `ce-check --help`)."""
    code, out, mods = loaded(args, HEAVY + COMMAND_MODULES)
    assert code == 0 and "Usage:" in out
    assert mods == [f"ce_cli.cli.{name}" for name in args[:1] if name in COMMANDS], pydantic_hint(mods)


@pytest.mark.parametrize("args, code", [([], 2), (["--version"], 0), (["gard"], 2)],
                         ids=["no arguments", "--version", "a mistyped command"])
def test_no_command_builds_none(args, code):
    """`ce-check` alone (its help, exit 2), `--version`, an unknown command (with its "did you
    mean"): no command module, no numpy, no Rich."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY + COMMAND_MODULES), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    assert 'LOADED=[]' in proc.stderr, proc.stderr
    assert {(): "Commands:", ("--version",): "ce-check 0.1", ("gard",): "Did you mean 'grad'?"}[
        tuple(args)] in proc.stdout + proc.stderr


def test_small_grad_json_loads_only_what_it_uses(small):
    code, out, mods = loaded(["grad", "z.npy", "y.npy", "--json"],
                             ["numpy", "ce_cli.verify.checks", *UNUSED_BY_GRAD], cwd=small)
    assert code == 0 and json.loads(out)["ok"] is True
    assert mods == ["ce_cli.verify.checks", "numpy"], pydantic_hint(mods)


def test_failed_grad_loads_the_diagnosis(small):
    """The probe sees the diagnosis when a gradient check fails (it names the likely cause)."""
    np.save(small / "g.npy", 2 * np.ones((4, 5)))
    code, out, mods = loaded(["grad", "z.npy", "y.npy", "--grad", "g.npy", "--json"],
                             ["ce_cli.verify.diagnosis"], cwd=small)
    assert code == 1 and json.loads(out)["ok"] is False
    assert mods == ["ce_cli.verify.diagnosis"]


# standard modules a `grad --json` run has no use for: tempfile is for --out-grad (io/output.py),
# zipfile for .npz inputs (io/loading.py)
UNUSED_STDLIB = ["tempfile", "zipfile"]


def test_small_grad_json_loads_no_unused_stdlib(small):
    """... unless numpy or Typer load it themselves (their versions differ)."""
    proc = subprocess.run([sys.executable, "-c", "import sys, json, numpy, typer; print(json.dumps("
                           f"[m for m in {UNUSED_STDLIB!r} if m in sys.modules]))"],
                          capture_output=True, text=True, timeout=120)
    theirs = json.loads(proc.stdout)
    code, out, mods = loaded(["grad", "z.npy", "y.npy", "--json"], UNUSED_STDLIB, cwd=small)
    assert code == 0 and json.loads(out)["ok"] is True
    assert mods == theirs
    code, _, mods = loaded(["grad", "z.npy", "y.npy", "--json", "--out-grad", "g.npy"],
                           UNUSED_STDLIB, cwd=small)
    assert code == 0 and (small / "g.npy").exists() and "tempfile" in mods  # the probe sees it
    np.savez(small / "y.npz", y=np.load(small / "y.npy"))
    code, out, mods = loaded(["grad", "z.npy", "y.npz", "--json"], UNUSED_STDLIB, cwd=small)
    assert code == 0 and json.loads(out)["ok"] is True and "zipfile" in mods


@pytest.mark.parametrize("args", [["--help"], ["grad", "z.npy", "y.npy"], ["grad", "z.npy", "missing.npy"]],
                         ids=["help", "grad", "error"])
def test_exit_skips_collecting_startup_objects(small, args):
    """main() freezes the objects alive when the command ends (gc.freeze), so the interpreter's
    collections at exit do not scan what the imports made; on errors too."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "[]", *args], capture_output=True,
                          text=True, cwd=small, timeout=120)
    assert proc.returncode in (0, 2)
    assert int(proc.stderr.split("FROZEN=")[-1]) > 10_000, proc.stderr


@pytest.mark.parametrize("args", [["grad", "z.npy", "missing.npy"], ["grad", "z.npy", "y.npy", "--seed", "-1"],
                                  ["binary", "z.npy", "missing.npy"]], ids=["input", "usage", "binary"])
def test_json_errors_load_no_rich(small, args):
    """An error in a --json run: one stderr line and the JSON error object, without Rich."""
    code, out, mods = loaded([*args, "--json"], ["rich", *HEAVY], cwd=small)
    assert code == 2 and json.loads(out)["ok"] is False
    assert "rich" not in mods and "rich.console" not in mods


def test_tables_load_rich_when_drawn(small):
    """Without --json the report is drawn with Rich's tables, loaded then."""
    code, out, mods = loaded(["grad", "z.npy", "y.npy"], ["rich.table"], cwd=small)
    assert code == 0 and "verdict" in out and mods == ["rich.table"]


def test_stress_help_copies_agree():
    """cli/stress.py's help carries copies of ce_cli.stress's scenario names and timeout."""
    from ce_cli.cli import stress as cli_stress
    from ce_cli.stress.runner import DEFAULT_TIMEOUT
    from ce_cli.stress.scenarios import SCENARIOS

    assert cli_stress.SCENARIO_NAMES == {k: tuple(s.name for s in v) for k, v in SCENARIOS.items()}
    assert cli_stress.DEFAULT_TIMEOUT == DEFAULT_TIMEOUT


# Runs the entry point, then reports how many threads the process holds (Linux /proc).
TASKS_PROBE = """
import os, sys
sys.argv = ["ce-check", *sys.argv[1:]]
from ce_cli.cli.main import main
try:
    main()
except SystemExit:
    pass
print("TASKS=%d" % len(os.listdir("/proc/self/task")), file=sys.stderr)
"""


def _openblas() -> bool:
    deps = np.show_config(mode="dicts")["Build Dependencies"]
    return "openblas" in str(deps.get("blas", {}).get("name", "")).lower()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux /proc")
@pytest.mark.parametrize("blas_var", [None, "2"])
def test_grad_starts_no_blas_pool(small, blas_var):
    """`grad` keeps OpenBLAS from starting its (busy-waiting) pool, unless you set its size."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
    if blas_var:
        env["OPENBLAS_NUM_THREADS"] = blas_var
    proc = subprocess.run([sys.executable, "-c", TASKS_PROBE, "grad", "z.npy", "y.npy", "--json"],
                          capture_output=True, text=True, cwd=small, env=env, timeout=120)
    tasks = int(proc.stderr.split("TASKS=")[-1])
    if blas_var is None:
        assert tasks == 1, proc.stderr
    elif _openblas() and (os.cpu_count() or 1) >= 2:  # your setting wins: the process + 1 worker
        assert tasks == 2, proc.stderr


@pytest.mark.parametrize("name", ["ce_cli.kernels.base.ChunkEval", "ce_cli.kernels.numpy_softmax._Rows",
                                  "ce_cli.kernels.numpy_softmax._SemanticTerms",
                                  "ce_cli.verify.stages.Chunk", "ce_cli.verify.stages.UserGrad",
                                  "ce_cli.verify.compare.Measured", "ce_cli.verify.finite_diff.FDResult",
                                  "ce_cli.verify.finite_diff.Directional",
                                  "ce_cli.verify.diagnosis._Sample", "ce_cli.verify.pipeline.Inputs",
                                  "ce_cli.verify.pipeline.Evaluated", "ce_cli.models.softmax.SoftmaxCE",
                                  "ce_cli.models.sigmoid.SigmoidBCE"])
def test_array_dataclasses_generate_no_eq(name):
    """Dataclasses that hold arrays are declared eq=False: numpy's == is elementwise, so a
    generated __eq__ (and a frozen class's __hash__) could not answer, and generating them costs
    start-up time (each is compiled on its own in every run)."""
    import importlib

    module, _, cls_name = name.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    assert "__eq__" not in vars(cls) and "__hash__" not in vars(cls)
