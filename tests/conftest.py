"""Shared test set-up: plain (non-terminal) Rich output everywhere, helpers for arrays and the CLI."""

import io
import json
import os
import subprocess
import sys

os.environ.setdefault("TERMINAL_WIDTH", "3000")
os.environ.setdefault("_TYPER_FORCE_DISABLE_TERMINAL", "1")
for var in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS"):
    os.environ.pop(var, None)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ce_cli.cli.app import app  # noqa: E402
from ce_cli.cli.main import register_commands  # noqa: E402
from ce_cli.kernels.compiled import kernel  # noqa: E402

register_commands()

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CE_CHECK = Path(sys.executable).parent / "ce-check"  # the console script of this environment


@pytest.fixture(scope="module", params=["fused", "numpy"])
def both_kernels(request):
    """Run a module's tests through the compiled kernel and again through the numpy kernel
    (module-scoped: hypothesis tests cannot take function-scoped fixtures)."""
    if request.param == "fused" and kernel() is None:
        pytest.skip("the compiled kernel is not built here (no C compiler or no AVX-512)")
    old = os.environ.get("CE_CHECK_FUSED")
    os.environ["CE_CHECK_FUSED"] = "1" if request.param == "fused" else "0"
    yield request.param
    if old is None:
        os.environ.pop("CE_CHECK_FUSED", None)
    else:
        os.environ["CE_CHECK_FUSED"] = old


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner):
    """invoke(args, input=None, env=None) -> Result, with COLUMNS wide enough for whole tables."""

    def _invoke(args, input=None, env=None):
        full_env = {"COLUMNS": "200", "NO_COLOR": "1"}
        full_env.update(env or {})
        return runner.invoke(app, [str(a) for a in args], input=input, env=full_env)

    return _invoke


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def save(tmp_path: Path, name: str, arr) -> str:
    path = tmp_path / name
    np.save(path, np.asarray(arr))
    return str(path)


def sigmoid(x) -> np.ndarray:
    """1 / (1 + e^-x) in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def npy_bytes(arr) -> bytes:
    """The bytes of `np.save(arr)`: a .npy file in memory (no pickled objects)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def strict_json(text: str) -> dict:
    """json.loads that refuses NaN/Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def script_env(**extra) -> dict:
    """The environment of a real run: no forced colour, no debug tracebacks, no test-only
    terminal settings; COLUMNS=200."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "PY_COLORS", "NO_COLOR", "CE_CHECK_DEBUG", "TERMINAL_WIDTH",
                        "_TYPER_FORCE_DISABLE_TERMINAL")}
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def run_script(args, input=None, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed console script with `args` (skip when it is not installed)."""
    if not CE_CHECK.exists():
        pytest.skip(f"console script not installed at {CE_CHECK}")
    return subprocess.run([str(CE_CHECK), *map(str, args)], input=input, capture_output=True,
                          timeout=60, env=env if env is not None else script_env(), **kwargs)
