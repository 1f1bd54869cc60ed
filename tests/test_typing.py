"""Typing of the public API: the package ships `py.typed`, default-mode mypy finds no error in the
API's modules, and every public function annotates every parameter and its return.

mypy is in the `test` extra. Where it is not installed the mypy test skips, except under CI
(`CI` set), where a missing mypy is a failure.
"""

import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

import ce_cli
import ce_cli.testing
from tests.conftest import ROOT

# the modules of the public API (`ce_cli.check_grad`, `check_binary`, `reference`, `ce_cli.testing`)
TYPED = ["ce_cli/__init__.py", "ce_cli/testing.py", "ce_cli/verify/checks.py",
         "ce_cli/verify/options.py", "ce_cli/verify/reference.py"]

PUBLIC = [ce_cli.check_grad, ce_cli.check_binary, ce_cli.check_linear, ce_cli.reference,
          ce_cli.testing.assert_ce_grad, ce_cli.testing.assert_ce_binary]


def test_py_typed_ships():
    assert (ROOT / "ce_cli" / "py.typed").is_file()
    assert (ROOT / "ce_cli" / "py.typed").read_bytes() == b""  # a marker, not a partial-stub list
    assert 'ce_cli = ["py.typed"]' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_mypy_finds_no_error_in_the_public_api(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        if os.environ.get("CI"):
            pytest.fail("mypy is not installed: `pip install -e '.[test]'` installs it")
        pytest.skip("mypy is not installed")
    # --follow-imports=silent: the modules these import are read for their types, and their own
    # errors are not reported here
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path),
         "--no-error-summary", "--hide-error-context", *TYPED],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("func", PUBLIC, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_public_functions_are_fully_annotated(func):
    sig = inspect.signature(func)
    missing = [name for name, p in sig.parameters.items() if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{func.__name__}: parameters without a type: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{func.__name__}: no return type"
