"""The pika seam (`dq.brokers.rabbitmq._pika`): every private name of pika it uses is
still there in the installed pika, and no other module of the package touches one."""

from __future__ import annotations

import ast
import importlib
import inspect
import tomllib
from pathlib import Path
from typing import Any

import pika
import pytest
from packaging.requirements import Requirement

import dq.brokers.rabbitmq
from dq.brokers.rabbitmq import _pika
from dq.brokers.rabbitmq._pika import PRIVATE_NAMES, PrivateName

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PACKAGE = Path(dq.brokers.rabbitmq.__file__).parent


def resolve(path: str) -> Any:
    """The module, class or function at dotted ``path``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ImportError(path)


@pytest.mark.parametrize(
    "private",
    [p for p in PRIVATE_NAMES if p.where != "instance"],
    ids=lambda p: f"{p.owner}.{p.name}",
)
def test_each_private_name_of_a_module_class_or_signature_is_in_pika(
    private: PrivateName,
) -> None:
    owner = resolve(private.owner)
    if private.where == "parameter":
        assert private.name in inspect.signature(owner).parameters
    else:
        assert hasattr(owner, private.name)


@pytest.mark.rabbitmq
def test_each_private_name_of_an_instance_is_set_on_a_live_connection() -> None:
    connection = _pika.connect([pika.URLParameters(RABBITMQ_URL)], reading=True)
    try:
        channel = connection.channel()
        impl_connection = _pika.connection_of(connection)
        impl_channel = _pika.impl_of(channel)
        live: list[object] = [
            connection,
            channel,
            impl_connection,
            impl_channel,
            getattr(impl_channel, "_content_assembler"),  # noqa: B009
            getattr(impl_connection, "_transport"),  # noqa: B009
        ]
        for private in (p for p in PRIVATE_NAMES if p.where == "instance"):
            owner = resolve(private.owner)
            holders = [o for o in live if isinstance(o, owner)]
            assert holders, f"no live {private.owner}"
            assert hasattr(holders[0], private.name), private
    finally:
        connection.close()


def test_only_the_seam_names_a_private_name_of_pika() -> None:
    # An attribute or import of pika whose name starts with one underscore, anywhere
    # in the package but the seam, is a private name used outside it.
    names = {p.name for p in PRIVATE_NAMES}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_pika.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pika"):
                assert not any(a.name.startswith("_") for a in node.names), (path, node.lineno)
            if isinstance(node, ast.Attribute | ast.Constant):
                name = node.attr if isinstance(node, ast.Attribute) else node.value
                assert name not in names, (path.name, node.lineno, name)


def test_the_rabbitmq_extra_pins_the_installed_pika() -> None:
    pyproject = tomllib.loads((PACKAGE.parents[3] / "pyproject.toml").read_text())
    (spec,) = pyproject["project"]["optional-dependencies"]["rabbitmq"]
    requirement = Requirement(spec)
    assert requirement.name == "pika"
    assert pika.__version__ in requirement.specifier
