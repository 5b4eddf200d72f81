"""dq.core stays pure: it imports nothing that does I/O, reads clocks, makes ids, etc."""

from __future__ import annotations

import ast
import pathlib

import pytest

CORE = pathlib.Path(__file__).resolve().parents[2] / "src" / "dq" / "core"

#: Standard-library modules the core may import: none of them does I/O, reads a clock,
#: draws random numbers, makes ids, starts threads or logs.
PURE_STDLIB = {
    "__future__",
    "abc",
    "collections",
    "collections.abc",
    "copy",
    "dataclasses",
    "datetime",  # only for the pure conversion of a given timestamp
    "enum",
    "functools",
    "itertools",
    "math",
    "operator",
    "re",
    "types",
    "typing",
}
#: Third-party libraries the design allows in the core: records and persistent maps.
ALLOWED_LIBRARIES = {"attrs", "rpds"}
FORBIDDEN_NAMES = {"datetime.now", "now", "utcnow", "today", "fromtimestamp_now"}


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}:{node.lineno}: use absolute imports"
            assert node.module is not None
            found.append((node.lineno, node.module))
    return found


def is_allowed(module: str) -> bool:
    top = module.split(".", maxsplit=1)[0]
    return (
        module in PURE_STDLIB
        or top in ALLOWED_LIBRARIES
        or module == "dq.core"
        or module.startswith("dq.core.")
    )


CORE_FILES = sorted(CORE.rglob("*.py"))


def test_the_core_has_modules() -> None:
    assert len(CORE_FILES) >= 8


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_imports_only_pure_modules(path: pathlib.Path) -> None:
    bad = [(line, module) for line, module in imported_modules(path) if not is_allowed(module)]
    assert not bad, f"{path.name} imports impure modules: {bad}"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_reads_no_clock(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text())
    calls = [
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    ]
    assert not set(calls) & FORBIDDEN_NAMES


def test_the_checker_catches_an_impure_import(tmp_path: pathlib.Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import time\nfrom uuid import uuid4\nimport dq.broker\nimport attrs\n")
    bad = [m for _, m in imported_modules(sample) if not is_allowed(m)]
    assert bad == ["time", "uuid", "dq.broker"]
