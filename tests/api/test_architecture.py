"""The rules of docs/architecture.md: which of dq's layers may import which.

Every import counts (module level and function level, not ``TYPE_CHECKING``), read from
the source's AST by tests/support/import_graph.py. A failure names the importing module,
the line and the rule it breaks.
"""

from __future__ import annotations

import pytest

from tests.support.import_graph import direct_imports, source_modules

#: The layers, lowest first. A module may import its own layer and those below it.
#: The root package ``dq`` is not in a layer: it is lazy (PEP 562) and already running
#: whenever any dq module runs, so importing a helper from it costs nothing.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("dq.core",)),
    (
        "foundation",
        (
            "dq.errors",
            "dq.encoder",
            "dq.wire",
            "dq.logging",
            "dq._sources",
            "dq.common",
            "dq.options",
            "dq.threading",
            "dq.async_actors",
            "dq.asyncio",
        ),
    ),
    (
        "api",
        (
            "dq.broker",
            "dq.message",
            "dq.actor",
            "dq.generic",
            "dq.middleware",
            "dq.results",
            "dq.rate_limits",
            "dq.group_wire",
            "dq.composition",
        ),
    ),
    ("interpreters", ("dq.brokers", "dq.worker", "dq.runtime")),
    ("edges", ("dq.cli", "dq.testing", "dq.__main__")),
]

#: Pairs inside one layer that must not meet: (importer prefix, imported prefix, why).
FORBIDDEN: list[tuple[str, str, str]] = [
    ("dq.brokers", "dq.worker", "a broker is driven by the worker, never the reverse"),
    ("dq.brokers", "dq.runtime", "brokers take time and ids from dq._sources, not the Runner"),
    ("dq.worker", "dq.brokers.", "the worker runs on any broker, so it names none"),
    ("dq.runtime", "dq.brokers.", "the Runner runs on any broker, so it names none"),
    ("dq.cli", "dq.testing", "the command never loads the test machinery"),
]

BROKERS = ("dq.brokers.stub", "dq.brokers.sqlite", "dq.brokers.redis", "dq.brokers.rabbitmq")


def _under(module: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(_under(module, prefix) for prefix in prefixes):
            return index
    return None


def test_every_module_has_a_layer() -> None:
    homeless = [name for name in source_modules() if name != "dq" and layer_of(name) is None]
    assert homeless == [], f"add these modules to a layer in LAYERS: {homeless}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    wrong = []
    for importer, imported, line in direct_imports():
        if imported == "dq":
            continue
        low, high = layer_of(importer), layer_of(imported)
        assert low is not None and high is not None
        if high > low:
            wrong.append(
                f"{importer}:{line} ({LAYERS[low][0]}) imports {imported} ({LAYERS[high][0]})"
            )
    assert wrong == [], "imports of a higher layer:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_forbidden_pairs_inside_a_layer(importer: str, imported: str, why: str) -> None:
    wrong = [
        f"{a}:{line} imports {b}"
        for a, b, line in direct_imports()
        if _under(a, importer) and _under(b, imported)
    ]
    assert wrong == [], f"{why}:\n" + "\n".join(wrong)


def test_a_broker_never_imports_another_broker() -> None:
    wrong = [
        f"{a}:{line} imports {b}"
        for a, b, line in direct_imports()
        for mine in BROKERS
        if _under(a, mine) and any(_under(b, other) for other in BROKERS if other != mine)
    ]
    assert wrong == [], "brokers share code through dq.brokers._* only:\n" + "\n".join(wrong)


def test_the_rules_see_real_imports() -> None:
    """The graph is not empty and the rules match it: a guard against a test that
    passes because it reads nothing."""
    edges = direct_imports()
    assert ("dq.worker.processing", "dq.broker") in {(a, b) for a, b, _ in edges}
    assert any(_under(a, "dq.brokers.redis") and b == "dq.core" for a, b, _ in edges) or any(
        _under(a, "dq.brokers.redis") and _under(b, "dq.core") for a, b, _ in edges
    )
    assert layer_of("dq.core.machine") == 0
    assert layer_of("dq.cli.supervisor") == len(LAYERS) - 1
