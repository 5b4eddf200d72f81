"""dq's pure core: immutable records, and every broker transition as a function.

Nothing here does I/O, reads a clock, makes an id, draws a random number, starts a
thread or logs: time, ids and random draws come in as arguments. A test walks the
AST of this package and fails on any other import than the standard library's pure
modules, ``attrs``, ``rpds`` and ``dq.core`` itself.
"""

from dq.core import commands, effects, events, policy
from dq.core._frozendict import EMPTY, FrozenDict, freeze
from dq.core.commands import (
    Ack,
    AckMany,
    Command,
    DeclareQueue,
    Enqueue,
    ExpireDeadLetters,
    ExpireLeases,
    Flush,
    FlushAll,
    Nack,
    Promote,
    Recover,
    Release,
    Renew,
    Replace,
    Requeue,
    Reserve,
    Start,
)
from dq.core.errors import CoreError, InvalidTransition, InvalidValue
from dq.core.machine import TRANSITIONS, Step, apply
from dq.core.persistent import PQueue, empty_queue
from dq.core.records import (
    JSON,
    BrokerState,
    DeadLetter,
    DeathReason,
    Entry,
    Message,
    QueueState,
    Reservation,
    Row,
    Run,
    initial_state,
)
from dq.core.subjects import Status, status_of

__all__ = [
    "EMPTY",
    "JSON",
    "TRANSITIONS",
    "Ack",
    "AckMany",
    "BrokerState",
    "Command",
    "CoreError",
    "DeadLetter",
    "DeathReason",
    "DeclareQueue",
    "Enqueue",
    "Entry",
    "ExpireDeadLetters",
    "ExpireLeases",
    "Flush",
    "FlushAll",
    "FrozenDict",
    "InvalidTransition",
    "InvalidValue",
    "Message",
    "Nack",
    "PQueue",
    "Promote",
    "QueueState",
    "Recover",
    "Release",
    "Renew",
    "Replace",
    "Requeue",
    "Reservation",
    "Reserve",
    "Row",
    "Run",
    "Start",
    "Status",
    "Step",
    "apply",
    "commands",
    "effects",
    "empty_queue",
    "events",
    "freeze",
    "initial_state",
    "policy",
    "status_of",
]
