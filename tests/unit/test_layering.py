"""The package's import structure, read from the source with ``ast`` (no
module is imported, so this holds for code paths no other test reaches).

Every ``import`` statement counts: at module top, inside a function (a lazy
import is still a dependency) and under ``TYPE_CHECKING`` (a type from the
control plane in a library signature still ties the library to it).

Layers, by the first name under ``vlcluster``:

- bottom: ``errors`` (imports nothing from vlcluster), ``extras``,
  ``suggest``, ``sizes``, ``ports``, ``hub``, ``plotting``: small modules
  every layer may use; they import only each other.
- library: ``data``, ``model``, ``train``, ``merge``, ``tasks``, ``storage``,
  ``metrics``: take plain arguments; import only the library and the bottom.
- control plane: everything else, ``stages`` (runners and the run-directory
  contract), ``jobspec``, ``graph``, ``plan``, ``run``, ``launch``, ``cli``,
  ``clirecord``, ``backends``, ``schedule``, ``estimate``, ``preflight``,
  ``profiles``, ``watch``, ``tracking``, ``failure``, ``study``, ``report``,
  ``importers`` and the package root; it may import anything. A new
  top-level module is control plane until it is named here as bottom or
  library.

The checks: no import cycle between modules; no import from the library or
the bottom into a layer above it; every ``vlcluster`` import names a module
that exists.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(importlib.util.find_spec("vlcluster").origin).parent  # the package the other tests import; found, not imported
BOTTOM = {"errors", "extras", "suggest", "sizes", "ports", "hub", "plotting"}
LIBRARY = {"data", "model", "train", "merge", "tasks", "storage", "metrics"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.Module, module: str, is_package: bool) -> Iterable[tuple[str, list[str]]]:
    """(module named by the statement, names it takes from it) for every import, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                yield ".".join(base + ([node.module] if node.module else [])), [alias.name for alias in node.names]
            else:
                yield node.module or "", [alias.name for alias in node.names]


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package's modules it imports; and the imports of the package that name no module."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    unresolved = []
    for module, path in files.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, taken in imported_names(tree, module, path.name == "__init__.py"):
            if name != root.name and not name.startswith(root.name + "."):
                continue
            submodules = [f"{name}.{item}" for item in taken if f"{name}.{item}" in files]
            if submodules:  # `from pkg import module`
                targets.update(submodules)
            if name in files:
                if len(submodules) < len(taken) or not taken:  # names defined in `name` itself
                    targets.add(name)
            elif not submodules:
                unresolved.append(f"{module} imports {name}")
        edges[module] = targets - {module}
    return edges, unresolved


def layer(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return "bottom" if top in BOTTOM else "library" if top in LIBRARY else "control"


RANK = {"bottom": 0, "library": 1, "control": 2}


def layering_violations(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports from a lower layer into a higher one; and any import of vlcluster by ``errors``."""
    found = {(a, b) for a, targets in edges.items() for b in targets if RANK[layer(b)] > RANK[layer(a)]}
    errors = next((m for m in edges if m.split(".")[1:] == ["errors"]), None)
    return found | {(errors, b) for b in edges.get(errors, ())}


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def cycle_path(edges: dict[str, set[str]], component: frozenset[str]) -> str:
    """One closed path through the cycle's modules, for the failure message (a -> b -> a)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & component):
                if child == start:
                    return " -> ".join(paths[node] + [start])
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a cycle")


def problems(graph: tuple[dict[str, set[str]], list[str]]) -> list[str]:
    edges, unresolved = graph
    found = [f"import cycle: {cycle_path(edges, c)}" for c in cycles(edges)]
    found += [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in sorted(layering_violations(edges))]
    return found + [f"{line}, which is no module of the package" for line in unresolved]


@functools.cache
def package_graph() -> tuple[dict[str, set[str]], list[str]]:
    return import_graph(PACKAGE)  # read once for the tests below


def test_no_import_cycles_and_no_library_module_reaches_into_the_control_plane():
    found = problems(package_graph())
    assert not found, "\n".join(found)


def test_errors_imports_nothing_from_the_package():
    edges, _ = package_graph()
    assert edges["vlcluster.errors"] == set()


@pytest.fixture
def fake_package(tmp_path) -> Path:
    """A package laid out like vlcluster, clean: a library module, a control module and the bottom."""
    root = tmp_path / "vlcluster"
    files = {
        "__init__.py": "",
        "errors.py": "class SpecError(Exception): ...\n",
        "data/__init__.py": "",
        "data/shards.py": "from vlcluster.errors import SpecError\n",
        "data/loader.py": "from .shards import SpecError\nfrom . import shards\n",
        "stages/__init__.py": "",
        "stages/data.py": "def run(ctx):\n    from ..data.loader import SpecError\n",
        "graph.py": "import vlcluster.stages.data\n",
        "report.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_walker_resolves_relative_lazy_and_package_imports(fake_package):
    edges, unresolved = import_graph(fake_package)
    assert edges == {
        "vlcluster": set(),
        "vlcluster.errors": set(),
        "vlcluster.data": set(),
        "vlcluster.data.shards": {"vlcluster.errors"},
        "vlcluster.data.loader": {"vlcluster.data.shards"},
        "vlcluster.stages": set(),
        "vlcluster.stages.data": {"vlcluster.data.loader"},
        "vlcluster.graph": {"vlcluster.stages.data"},
        "vlcluster.report": set(),
    }
    assert unresolved == [] and problems(import_graph(fake_package)) == []


def test_a_planted_cycle_is_found_and_named(fake_package):
    (fake_package / "data" / "shards.py").write_text("def later():\n    from vlcluster.data import loader\n")
    assert problems(import_graph(fake_package)) == [
        "import cycle: vlcluster.data.loader -> vlcluster.data.shards -> vlcluster.data.loader"]


def test_a_planted_violation_is_found(fake_package):
    (fake_package / "data" / "shards.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlcluster.report import Report\n")
    (fake_package / "errors.py").write_text("from . import data\n")
    assert problems(import_graph(fake_package)) == [
        "vlcluster.data.shards (library) imports vlcluster.report (control)",
        "vlcluster.errors (bottom) imports vlcluster.data (library)",
    ]


def test_an_import_of_a_module_that_is_gone_is_found(fake_package):
    (fake_package / "graph.py").write_text("from vlcluster.stages.kinds import runner\n")
    assert problems(import_graph(fake_package)) == ["vlcluster.graph imports vlcluster.stages.kinds, which is no module of the package"]
