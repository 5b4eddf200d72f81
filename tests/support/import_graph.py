"""dq's import graph, read from the source's AST (nothing is imported).

Every ``import`` and ``from … import`` counts, at module level and inside functions,
except those under ``if TYPE_CHECKING:``. Used by the import-cycle test
(tests/core/test_imports.py) and the layer rules (tests/api/test_architecture.py).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

SRC = pathlib.Path(__file__).resolve().parents[2] / "src"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted((SRC / "dq").rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(
    tree: ast.AST, *, in_function: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Yield each import that runs, and whether it sits inside a function."""
    if isinstance(tree, ast.If) and is_type_checking(tree.test):
        for statement in tree.orelse:
            yield from runtime_imports(statement, in_function=in_function)
        return
    if isinstance(tree, ast.Import | ast.ImportFrom):
        yield tree, in_function
        return
    inner = in_function or isinstance(tree, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    for child in ast.iter_child_nodes(tree):
        yield from runtime_imports(child, in_function=inner)


def absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


Edge = tuple[str, str, int]  # importer, imported, line


def import_graph() -> dict[str, dict[str, int]]:
    """Map each dq module to the dq modules its import runs, with one line each."""
    modules = source_modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        own = set(ancestors(importer)) | ({importer} if is_package else set())
        for node, _ in runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = absolute(importer, is_package, node)
                targets = [base]
                targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            for target in targets:
                for name in [*ancestors(target), target]:
                    if name in modules and name not in own and name != importer:
                        graph[importer].setdefault(name, node.lineno)
    return graph


def direct_imports() -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` for each dq module a dq module names in an import
    (the packages above the imported one are left out: they are not what it asked for)."""
    modules = source_modules()
    found: list[tuple[str, str, int]] = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, _ in runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = absolute(importer, is_package, node)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            found += [(importer, t, node.lineno) for t in targets if t in modules and t != importer]
    return found
