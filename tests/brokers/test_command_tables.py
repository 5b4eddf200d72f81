"""Every broker states how it carries out every core command: its ``COMMANDS`` table
has a row for each command type, a named atomic server step or a reason it cannot."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from dq.brokers import steps
from dq.core.commands import COMMAND_TYPES

BROKER_MODULES = (
    "dq.brokers.stub",
    "dq.brokers.sqlite",
    "dq.brokers.redis",
    "dq.brokers.rabbitmq",
)


def _table(module: str) -> steps.CommandTable:
    table: steps.CommandTable = importlib.import_module(module).COMMANDS
    return table


@pytest.mark.parametrize("module", BROKER_MODULES)
def test_every_command_has_a_row(module: str) -> None:
    table = _table(module)
    assert steps.uncovered(table) == (), f"{module}.COMMANDS lacks rows"
    assert set(table) == set(COMMAND_TYPES), "rows for types that are not core commands"


@pytest.mark.parametrize("module", BROKER_MODULES)
def test_every_row_names_its_step_or_says_why_not(module: str) -> None:
    for kind, row in _table(module).items():
        assert isinstance(row, steps.ServerStep | steps.Cannot), (kind, row)
        if isinstance(row, steps.Cannot):
            assert len(row.reason) > 20, f"{kind.__name__}: say why, and what happens instead"
        else:
            assert row.name and row.atomic, (kind, row)


def test_every_redis_step_is_a_script_that_exists() -> None:
    lua = Path(importlib.import_module("dq.brokers.redis").__file__ or "").parent / "lua"
    for kind, row in _table("dq.brokers.redis").items():
        if isinstance(row, steps.ServerStep) and "Lua" in row.atomic:
            assert (lua / f"{row.name}.lua").is_file(), (kind.__name__, row.name)


def test_uncovered_names_what_is_missing() -> None:
    first, *rest = COMMAND_TYPES
    table = dict.fromkeys(rest, steps.Cannot("a test table: it carries nothing out at all"))
    assert steps.uncovered(table) == (first,)
