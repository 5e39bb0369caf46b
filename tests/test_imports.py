"""The package's modules import each other without a cycle.

The test reads every module's imports with `ast` (nothing but the top package is imported, so optional
dependencies do not matter), resolves relative imports against the module's package, and looks for a cycle among the
`internvl_edge` modules. An import of `a.b.c` also runs the `__init__` of `a.b`, so it counts as an
edge to that package too, except for the importer's own packages (Python has started them before the
importer, so a package's `__init__` importing its submodules is no cycle); a name taken from a package
itself (`from . import open_backend`) is an edge to that package, its own included.

Imports inside functions count as much as those at module level: a lazy import only postpones the
dependency to the first call, and a cycle through one still means that two modules each need the other
(the backend contract importing a backend that imports the contract back), which is the layering this
test guards. Only imports under `if TYPE_CHECKING:` are left out, because they never run.
"""

from __future__ import annotations

import ast
import os
import pkgutil

import internvl_edge

ROOT = "internvl_edge"


def package_modules() -> dict[str, str]:
    """{dotted module name: source path} for the package and every module below it (pkgutil over the
    folders, so that no subpackage is imported to be listed)."""
    found = {}

    def walk(name: str, folder: str) -> None:
        found[name] = os.path.join(folder, "__init__.py")
        for info in pkgutil.iter_modules([folder]):
            path = os.path.join(folder, info.name)
            if info.ispkg:
                walk(f"{name}.{info.name}", path)
            else:
                found[f"{name}.{info.name}"] = path + ".py"

    walk(ROOT, os.path.dirname(internvl_edge.__file__))
    return {name: path for name, path in found.items() if os.path.isfile(path)}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node that can run (those under `if TYPE_CHECKING:` cannot)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that `module` imports, resolved to dotted names."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    named: set[str] = set()  # what the import statements name
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        for alias in node.names:  # `from pkg import submodule`, or a name defined by pkg itself
            named.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin)
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}  # itself and its packages
    edges = {name for name in named if name in modules and name != module}
    for name in named:  # the packages whose __init__ an import runs, but not the importer's own
        parts = name.split(".")
        edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules and p not in own)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_names(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_walk_sees_the_package():
    graph = import_graph()
    assert "internvl_edge.api" in graph and "internvl_edge.checkpoint.config" in graph
    assert "internvl_edge.bundle" in graph["internvl_edge.api"]  # relative imports resolved


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
