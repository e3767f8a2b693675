"""The import rule of the layering (../shared/DESIGN.md, "Layering and where things live"):
library code (diffattn/ outside its frontends and the testbed, pipelines/, kernels/) never
imports a frontend (the CLI, the app, the node pack) or the testbed, at module level or
inside a function, absolutely or relatively. Frontends, benchmarks and tests may import
everything."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each source folder is installed (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"diffattn": "diffattn", "pipelines": "diffattn.pipelines", "kernels": "diffattn.kernels"}
FRONTENDS = ("diffattn.cli", "diffattn.app", "diffattn.comfy")
FORBIDDEN = FRONTENDS + ("diffattn.generate", "diffattn.testbed")
EXEMPT = ("diffattn.cli", "diffattn.app", "diffattn.comfy", "diffattn.testbed")  # frontends and the testbed leaf


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> list[tuple[str, Path]]:
    out = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = _module_name(path)
            if not any(name == e or name.startswith(e + ".") for e in EXEMPT):
                out.append((name, path))
    return out


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` / ``from ... import`` names, resolved to absolute names
    (``from .. import testbed`` -> ``diffattn.testbed``), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.append((node.lineno, prefix))
            if not _forbidden(prefix):  # `from diffattn import cli`: the names may be modules
                found += [(node.lineno, f"{prefix}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))  # importlib.import_module("diffattn.cli")
    return found


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_the_scan_covers_the_library():
    names = {m for m, _ in library_modules()}
    assert {"diffattn", "diffattn.engine", "diffattn.methods.registry", "diffattn.pipelines.astar",
            "diffattn.pipelines.uam", "diffattn.kernels"} <= names
    assert not any(n.startswith(("diffattn.cli", "diffattn.testbed")) for n in names)


def test_the_scan_sees_every_form_of_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import diffattn.cli\nfrom diffattn import testbed\nfrom ..cli import main\n"
                   "def f():\n    from ...diffattn.generate import x\n    from .. import app\n"
                   "importlib.import_module('diffattn.comfy')\n")
    names = [n for _, n in imported_modules("diffattn.methods.m", src)]
    hits = [n for n in names if _forbidden(n)]
    assert {"diffattn.cli", "diffattn.testbed", "diffattn.generate", "diffattn.app", "diffattn.comfy"} <= set(hits)


LIBRARY = dict(library_modules())


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_library_imports_no_frontend_or_testbed(module):
    path = LIBRARY[module]
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {name}" for line, name in imported_modules(module, path)
           if _forbidden(name)]
    assert not bad, "library code must not import a frontend or the testbed; pass testbed defaults in from " \
                    "the frontend instead:\n" + "\n".join(bad)
