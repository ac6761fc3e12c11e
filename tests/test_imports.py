"""No import circle anywhere in the ``ptoc`` package.

Every module of ``ptoc/`` is parsed with :mod:`ast` (nothing is imported) and its
imports become edges of a module graph, which must be acyclic:

* ``import ptoc.a.b`` is an edge to ``ptoc.a.b``;
* ``from ptoc.pkg import name`` and its relative forms (``from .pkg import name``,
  ``from .. import name``, resolved against the importing module's package) are an
  edge to ``ptoc.pkg.name`` when that is a module of the package, else to ``ptoc.pkg``;
* imports of other packages are ignored, and so is the implicit import of the parent
  packages (``import ptoc.a.b`` also runs ``ptoc/__init__.py``, which imports most of
  the package: counting that would make every module part of a circle).

Imports inside functions and methods **are** counted, although they only run when
the function is called: a circle through a deferred import is still two modules that
need each other (the command line's modules once did, through its error class).
Imports under ``if TYPE_CHECKING:`` are not counted, since they never run. Imports
by name at run time (``importlib.import_module``) are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ptoc"


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package in ``root``, by dotted name (``ptoc.cli.train``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(nodes):
    """The import statements among ``nodes`` and inside them, except under
    ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """The modules of the package in ``root`` that each of its modules imports."""
    top = root.name
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == top)
                continue
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1]
                                + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != top:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges.add(sub if sub in modules else base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_ptoc_has_no_import_circle():
    graph = import_graph(PACKAGE)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_graph_sees_the_imports():
    """The parser resolves absolute, relative, package and deferred imports of ptoc."""
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "ptoc.cli.train" in graph
    assert "ptoc.cli.errors" in graph["ptoc.cli.train"]          # from .errors import ...
    assert "ptoc.cli.train" in graph["ptoc.cli"]                   # from . import train
    assert "ptoc.model" in graph["ptoc.parallel.driver"]          # from ..model import ...
    assert {"ptoc", "ptoc.training"} <= graph["ptoc.cli.train"]    # imports in a function


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


@pytest.mark.parametrize("files, cycle", [
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "from .a import x\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    ({"__init__.py": "", "a.py": "def f():\n    from .sub import c\n",
      "sub/__init__.py": "", "sub/c.py": "import pkg.a\n"},
     ["pkg.a", "pkg.sub.c", "pkg.a"]),
    ({"__init__.py": "", "a.py": "from typing import TYPE_CHECKING\n"
      "if TYPE_CHECKING:\n    from .b import B\n", "b.py": "from .a import A\n"}, None),
    ({"__init__.py": "from . import a\n", "a.py": "import os\nimport pkg.b\n",
      "b.py": "x = 1\n"}, None),
])
def test_circles_are_found_and_only_circles(tmp_path, files, cycle):
    assert find_cycle(import_graph(_write(tmp_path, files))) == cycle
