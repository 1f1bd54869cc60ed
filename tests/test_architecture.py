"""The house plan, checked from the source with `ast` (docs/architecture.md draws it).

- No import cycles between modules of `ce_cli`.
- Arrows point down only: a module imports only from its own layer or the layers below.
- No function over MAX_LINES lines or with a cyclomatic complexity over MAX_COMPLEXITY, except
  the few listed in EXCEPTIONS with the reason they stay whole.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ce_cli"
MAX_LINES = 60
MAX_COMPLEXITY = 15

# top to bottom; a module may import from its own layer and any layer below it
LAYERS = [
    {"cli"},
    {"batch", "distributed"},
    {"explain", "stress"},
    {"report", "testing"},
    {"verify"},
    {"models"},
    {"kernels", "io"},
    {"enums", "errors", "exitcodes", "__init__", "__main__"},
]
# `ce_cli/__init__.py` is the public face: it re-exports the API from the layers below
FACES = {"ce_cli", "ce_cli.__main__"}

# "module:function" -> why it stays one function
EXCEPTIONS: dict[str, str] = {}
# being split in the reorganisation: this list must end empty
PENDING = {
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every ce_cli module `path` imports, anywhere in the file (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in MODULES}


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of the plan (add it to LAYERS)")


def test_no_import_cycles():
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if MODULES[nxt].name == "__init__.py":
                continue  # a package's face only hands names on
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_arrows_point_down():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m in sorted(GRAPH) if m not in FACES
              for d in sorted(GRAPH[m]) if _layer(d) < _layer(m)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _complexity(fn: ast.AST) -> int:
    """McCabe's number: 1 + branches (if/for/while/except/with-less boolean operators...)."""
    n = 1
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.IfExp,
                             ast.ExceptHandler, ast.Assert)):
            n += 1
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
        elif isinstance(node, ast.match_case):
            n += 1
    return n


def _functions():
    for module, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{module}:{node.name}", node


@pytest.mark.parametrize("limit", ["lines", "complexity"])
def test_functions_stay_small(limit):
    too_big = []
    for name, node in _functions():
        size = node.end_lineno - node.lineno + 1 if limit == "lines" else _complexity(node)
        cap = MAX_LINES if limit == "lines" else MAX_COMPLEXITY
        if size > cap and name not in EXCEPTIONS and name not in PENDING:
            too_big.append(f"{name}: {size} {limit}")
    assert not too_big, f"over {MAX_LINES} lines / complexity {MAX_COMPLEXITY}:\n" + "\n".join(too_big)


def test_exceptions_are_still_needed():
    names = {name for name, _ in _functions()}
    stale = [name for name in (*EXCEPTIONS, *PENDING) if name not in names]
    assert not stale, f"EXCEPTIONS lists functions that no longer exist: {stale}"


def test_every_package_is_in_pyproject():
    """pyproject.toml names its packages one by one: a package missing there is missing from
    the built wheel (an editable install still finds it)."""
    text = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", text, re.M | re.S)[1]))
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
