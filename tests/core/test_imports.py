"""dq's modules import each other without a cycle, and ``import dq.core`` loads only the core.

The graph is built from the source's AST: every ``import`` and ``from … import`` at
module level *and* inside functions (a function-local import runs too, only later),
except those under ``if TYPE_CHECKING:``. Importing ``a.b.c`` also runs the packages
``a`` and ``a.b``, so an edge to a module is an edge to each package above it as well
(except the importer's own packages, which are already running when it runs).

Run as a module to print the graph's cycles: ``python -m tests.core.test_imports``.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys

from tests.support.import_graph import (
    absolute,
    import_graph,
    runtime_imports,
    source_modules,
)

#: Function-local imports are allowed only for these optional or costly-to-load
#: dependencies, and fewer than `LOCAL_IMPORT_BUDGET` in all.
OPTIONAL_DEPENDENCIES = {
    "prometheus_client",
    "gevent",
    "watchdog",
    "redis",
    "ssl",
    "pika",
    "cattrs",
}
LOCAL_IMPORT_BUDGET = 10


def components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Return the graph's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm; the graph is small
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Return one shortest cycle through each module caught in a cycle."""
    found: list[list[str]] = []
    for component in components(graph):
        for member in component:
            cycle = _shortest_cycle(graph, set(component), member)
            if not any(set(cycle) <= set(seen) for seen in found):
                found.append(cycle)
    return found


def _shortest_cycle(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    return [*paths[node], start]
                if succ in members and succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} imports {b} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def test_the_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "dq.core.machine" in graph
    assert "dq.core.records" in graph["dq.core.machine"]


def test_no_import_cycle() -> None:
    graph = import_graph()
    tangled = components(graph)
    assert not tangled, (
        "modules caught in import cycles: "
        + "; ".join(", ".join(component) for component in tangled)
        + "\nfor example:\n"
        + "\n".join(describe(graph, cycle) for cycle in cycles(graph))
    )


def _local_imports() -> list[tuple[str, str]]:
    """Return ``(where, module)`` for each function-local import in dq."""
    local: list[tuple[str, str]] = []
    for name, path in source_modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in runtime_imports(tree):
            if not in_function:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = absolute(name, path.name == "__init__.py", node)
                modules = source_modules()
                # ``from dq.cli import watch`` imports the submodule dq.cli.watch.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            local += [(f"{name}:{node.lineno}", target) for target in targets]
    return local


def _optional(module: str) -> bool:
    """Whether importing ``module`` needs an optional dependency: it is one, or it is a
    dq module that imports one at module level (a seam such as the redis-py client)."""
    if module.partition(".")[0] in OPTIONAL_DEPENDENCIES:
        return True
    path = source_modules().get(module)
    if path is None:
        return False
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(
        not in_function
        and any(
            target.partition(".")[0] in OPTIONAL_DEPENDENCIES
            for target in (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
        )
        for node, in_function in runtime_imports(tree)
    )


def test_local_imports_only_for_optional_dependencies() -> None:
    local = _local_imports()
    required = [f"{where} imports {module}" for where, module in local if not _optional(module)]
    assert required == [], "function-local imports of required modules:\n" + "\n".join(required)
    statements = sorted({where for where, _ in local})  # one statement may import many names
    assert len(statements) < LOCAL_IMPORT_BUDGET, (
        f"{len(statements)} function-local import statements:\n"
        + "\n".join(f"{where} imports {module}" for where, module in local)
    )


def loaded_by(statement: str) -> list[str]:
    code = f"{statement}; import sys; print(*sorted(m for m in sys.modules if m.startswith('dq')))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()


def test_importing_the_core_loads_only_the_core() -> None:
    loaded = loaded_by("import dq.core")
    assert [m for m in loaded if m != "dq" and not m.startswith("dq.core")] == []


def test_importing_dq_loads_no_broker() -> None:
    assert loaded_by("import dq") == ["dq"]


if __name__ == "__main__":
    graph = import_graph()
    for cycle in cycles(graph):
        print(describe(graph, cycle))


_FACADES = """
import dq, dq.middleware, dq.results
import dq.generic  # imports the submodule dq.actor
assert callable(dq.actor) and dq.actor.__module__ == "dq.actor", dq.actor
for package in (dq, dq.middleware, dq.results):
    names = {}
    exec(f"from {package.__name__} import *", names)
    missing = [n for n in package.__all__ if n not in names]
    assert not missing, (package.__name__, missing)
    assert set(package.__all__) <= set(dir(package)), package.__name__
    try:
        package.no_such_name
    except AttributeError as error:
        assert str(error) == f"module {package.__name__!r} has no attribute 'no_such_name'"
    else:
        raise AssertionError(package.__name__)
assert dq.middleware.Prometheus.__module__ == "dq.middleware.prometheus"
assert dq.middleware.AsyncIO.__module__ == "dq.middleware.asyncio"
print("ok")
"""


def test_the_packages_load_their_names_on_first_use() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FACADES], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr
