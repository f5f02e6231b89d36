"""The modules of gpubackprop/ import one way: no module imports one that imports it back,
directly or through others.  Imports inside functions count (they are where circles hide).

An import of a package (``from . import x`` where x is no submodule, ``import gpubackprop``)
is an edge to the package's __init__; Python's implicit import of a module's parent package
is not counted (it is what every submodule does).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpubackprop"


def _module_names(package: Path) -> dict[str, Path]:
    names = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package modules one import statement brings in."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    submodules = [f"{source}.{alias.name}" for alias in node.names]
    found = [name for name in submodules if name in known]
    if len(found) < len(submodules) and source in known:
        found.append(source)  # a name defined in the package's (or module's) own code
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its code}."""
    names = _module_names(package)
    known = set(names)
    graph = {}
    for module, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in ast.walk(tree):
            edges.update(_imported(node, module, path.name == "__init__.py", known))
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                found = visit(target)
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


def test_the_package_import_graph_has_no_circle():
    graph = import_graph()
    assert "gpubackprop.model" in graph and "gpubackprop.training" in graph["gpubackprop.model"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_function_level_imports_are_seen():
    """The graph sees an import inside a function: model.py imports torch_interop only in
    to_torch (PyTorch is optional), and that edge is in the graph."""
    assert "gpubackprop.torch_interop" in import_graph()["gpubackprop.model"]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_find_cycle(graph, expected):
    assert find_cycle(graph) == expected


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    """The circle this test was written for: callbacks -> checkpoint -> model -> training ->
    callbacks, with the first import inside a method."""
    package = tmp_path / "gpubackprop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "callbacks.py").write_text("def f():\n    from .checkpoint import save\n")
    (package / "checkpoint.py").write_text("from .model import Sequential\n")
    (package / "model.py").write_text("from . import training\n")
    (package / "training.py").write_text("from .callbacks import Callback\n")
    cycle = find_cycle(import_graph(package))
    assert cycle is not None and set(cycle) == {
        "gpubackprop.callbacks",
        "gpubackprop.checkpoint",
        "gpubackprop.model",
        "gpubackprop.training",
    }
