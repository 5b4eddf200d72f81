"""How an interpreter carries out the core's commands: one visible table per broker.

The core decides, the server moves. `dq.core.apply` decides every transition (and the
functions of `dq.core.policy` every decision: eta validity, queue names, the delivery
cap, who counts as dead); a broker whose state lives in a server carries each command
out as exactly one atomic server step (a Lua script, a SQL transaction, an AMQP
sequence), named after the command, that only moves data. Each broker module states
its table as ``COMMANDS``; ``tests/brokers/test_command_tables.py`` checks that every command
type of `dq.core.commands.COMMAND_TYPES` has a row in every broker's table, either a
`ServerStep` or an explicit `Cannot` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import attrs

from dq.core.commands import COMMAND_TYPES, Command

__all__ = ["Cannot", "CommandTable", "ServerStep", "uncovered"]


@attrs.frozen
class ServerStep:
    """One atomic server step that carries out one core command.

    Attributes:
        name: the step's name, after its command (a Lua script's file name without
            ``.lua``, a method that runs one SQL transaction, an AMQP sequence).
        atomic: what makes it one step (``"one Lua script"``, ``"one BEGIN IMMEDIATE
            transaction"``, ``"publish confirmed, then ack"``...).
    """

    name: str
    atomic: str


@attrs.frozen
class Cannot:
    """This transport cannot carry the command out, and why (what happens instead)."""

    reason: str


CommandTable: TypeAlias = Mapping[type[Command], ServerStep | Cannot]


def uncovered(table: CommandTable) -> tuple[type[Command], ...]:
    """Return the command types ``table`` has no row for, in `COMMAND_TYPES` order."""
    return tuple(kind for kind in COMMAND_TYPES if kind not in table)
