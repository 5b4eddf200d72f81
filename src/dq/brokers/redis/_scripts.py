"""RedisBroker's Lua scripts, and `COMMANDS`: which script carries out each core command.

The core decides, the Lua moves: `dq.core.apply` and `dq.core.policy` make every
decision (who is dead, each recovered message's outcome, the delivery cap, queue
names), and each core command is carried out by exactly one script named after it,
which only moves data, guarded so that it is a no-op when the world changed since the
decision. Scripts that only free memory or move what is stored carry the shebang flag
``allow-oom`` (Redis >= 7), so a Redis at ``maxmemory`` can still be drained.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Final, NamedTuple

from dq.brokers.steps import Cannot, CommandTable, ServerStep
from dq.core import commands as c

__all__ = ["COMMANDS", "SCRIPT_NAMES", "Script", "load_script"]

_ONE = "one Lua script (a script runs alone on the server)"
_NO_LEASES = (
    "Redis has heartbeats, not leases: a worker refreshes its heartbeat "
    "(heartbeat.lua, every heartbeat_timeout / 4 at most 5 s) instead of renewing "
    "leases, and Recover returns what a worker held once its heartbeat is older than "
    "heartbeat_timeout"
)

#: Each core command and the script that carries it out (or why none does).
COMMANDS: Final[CommandTable] = {
    c.DeclareQueue: Cannot(
        "nothing is written to Redis: declarations live in the declaring process "
        "(a core state of this broker) and drive its hooks; any process may enqueue "
        "on any valid queue name"
    ),
    c.Enqueue: ServerStep("enqueue", _ONE + "; enqueue_many sends one per queue and 500"),
    c.Reserve: ServerStep("reserve", _ONE),
    c.Ack: ServerStep("ack", _ONE),
    c.AckMany: ServerStep("ack", _ONE + ": ack.lua settles a batch, so AckMany shares Ack's"),
    c.Nack: ServerStep("nack", _ONE),
    c.Requeue: ServerStep("requeue", _ONE),
    c.Promote: ServerStep("promote", _ONE),
    c.Replace: ServerStep("replace", _ONE),
    c.Start: ServerStep("start", _ONE + "; sent for suspects only, nothing for others"),
    c.Recover: ServerStep(
        "recover",
        _ONE + " per dead worker's ack set and batch of ids, after the core decided "
        "each id's outcome; forget.lua then drops the heartbeat of a worker left "
        "holding nothing",
    ),
    c.Renew: Cannot(_NO_LEASES),
    c.ExpireLeases: Cannot(_NO_LEASES),
    c.ExpireDeadLetters: ServerStep("expire_dead_letters", _ONE + " per batch of 1000"),
    c.Flush: ServerStep("flush", _ONE + " per queue (flush runs it on q and q.DQ)"),
    c.FlushAll: Cannot(
        "no one step covers every queue: flush_all runs flush.lua on each queue declared "
        "in this process (Redis has no list of queues, and Dramatiq's keys none either)"
    ),
    c.Release: ServerStep(
        "requeue", _ONE + ": a closing consumer returns all it holds with requeue.lua"
    ),
}

#: Every script: the table's, plus heartbeat (what Recover reads), forget (part of
#: Recover) and maxstack (probes Lua's unpack limit).
SCRIPT_NAMES: Final = (
    "enqueue",
    "reserve",
    "ack",
    "nack",
    "requeue",
    "promote",
    "replace",
    "start",
    "recover",
    "expire_dead_letters",
    "flush",
    "heartbeat",
    "forget",
    "maxstack",
)


class Script(NamedTuple):
    """One of the broker's Lua scripts (`RedisBroker.scripts` maps names to them).

    Attributes:
        name: its name (``enqueue``, ``reserve``...), its file's without ``.lua``.
        source: its Lua source.
        sha: the SHA1 hex digest of ``source`` (what ``EVALSHA`` names).
    """

    name: str
    source: str
    sha: str


def _sha1_hex(data: bytes) -> str:
    try:
        # CPython's built-in SHA1: hashlib would load OpenSSL (~3.5 MB per process).
        sha1: Any = importlib.import_module("_sha1").sha1
    except ImportError:  # pragma: no cover - other interpreters
        sha1 = importlib.import_module("hashlib").sha1
    return str(sha1(data).hexdigest())


LUA_DIR: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lua")


def load_script(name: str) -> Script:
    """Read ``lua/<name>.lua``.

    Raises:
        OSError: there is no such script.
    """
    # A plain read (not importlib.resources, which costs ~1 MB of imports per process).
    with open(os.path.join(LUA_DIR, f"{name}.lua"), encoding="utf-8") as file:
        source = file.read()
    return Script(name, source, _sha1_hex(source.encode()))
