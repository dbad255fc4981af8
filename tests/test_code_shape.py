"""The shape of the source: no function in ``src/`` longer than 80 lines (docstring and decorators included),
and every imported package declared."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80

#: Functions allowed over the limit, with their length today: none of them may grow, and an entry goes once its
#: function fits.  Empty: every function fits.
ALLOWED: dict[str, int] = {}


def function_lengths(root: Path = SRC) -> dict[str, int]:
    """``{"path::qualified.name": lines}`` of every function and method under ``root``."""
    out: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()

        def visit(node: ast.AST, prefix: str, rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    out[f"{rel}::{prefix}{child.name}"] = child.end_lineno - first + 1
                    visit(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:  # inside if/try/with blocks too
                    visit(child, prefix)

        visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return out


def test_no_function_is_longer_than_80_lines():
    lengths = function_lengths()
    too_long = {k: v for k, v in lengths.items() if v > ALLOWED.get(k, MAX_LINES)}
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named steps): {too_long}"
    fitted = [k for k in ALLOWED if lengths.get(k, 0) <= MAX_LINES]
    assert not fitted, f"these now fit in {MAX_LINES} lines or are gone: drop them from ALLOWED: {fitted}"


def test_the_length_check_sees_functions_and_methods(tmp_path):
    (tmp_path / "m.py").write_text(
        "@decorator\ndef f():\n    pass\n\n\nif True:\n    def h():\n        pass\n\n\n"
        "class C:\n    def g(self):\n        def inner():\n" + "            x = 1\n" * 90
    )
    lengths = function_lengths(tmp_path)
    assert lengths["m.py::f"] == 3 and lengths["m.py::h"] == 2
    assert lengths["m.py::C.g"] == 92 and lengths["m.py::C.g.inner"] == 91


#: Third-party modules imported without their own requirement, and the declared one that installs them.
PROVIDED_BY = {"llvmlite": "numba"}


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared():
    """Each third-party module that ``src/`` imports is a requirement of pyproject.toml (core or an extra)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    imported: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "armor"}
    assert {"torch", "yaml", "datasets"} <= third_party
    dists = packages_distributions()
    undeclared = []
    for module in sorted(third_party):
        provided = [PROVIDED_BY[module]] if module in PROVIDED_BY else dists.get(module, [module])
        names = {_requirement_name(d) for d in provided}
        if not names & declared:
            undeclared.append(module)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
