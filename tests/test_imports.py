"""The package's modules import each other without a cycle.

The test reads every module's imports with `ast` (nothing is imported, so optional dependencies do not
matter), resolves relative imports against the module's package, and looks for a cycle among the
`internvl_edge` modules. An import of `a.b.c` also runs the `__init__` of `a.b`, so it counts as an
edge to that package too (but not to the importer's own packages, which Python has already started).

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
    """{dotted module name: source path} for the package and every module below it."""
    folder = os.path.dirname(internvl_edge.__file__)
    found = {ROOT: os.path.join(folder, "__init__.py")}
    for info in pkgutil.walk_packages([folder], prefix=f"{ROOT}."):
        spec = info.module_finder.find_spec(info.name.rsplit(".", 1)[-1], None)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            found[info.name] = spec.origin
    return found


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
    targets: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        targets.add(origin)
        targets.update(f"{origin}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    edges = set()
    for name in targets:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the module and the packages whose __init__ it runs
            candidate = ".".join(parts[:i])
            if candidate in modules and candidate not in own:
                edges.add(candidate)
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
