"""What each command addresses, and the `Status` of that subject in a state.

Rule 1 of `dq.core.machine`: every command addresses one subject, a queue, a stored
entry, or the broker; the subject's status and the command's type select the handler.
A queue is UNDECLARED or DECLARED (a ``q.XQ`` name is a DEAD_LETTER_QUEUE, which no
command addresses); an entry is RESERVED (taken from ``q``), HELD (taken from ``q.DQ``)
or UNRESERVED (waiting, settled, flushed or never stored); the broker is always OPEN.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from dq.core import commands as c
from dq.core.policy import DEAD_SUFFIX, DELAY_SUFFIX, q_name
from dq.core.records import BrokerState

__all__ = ["SUBJECT", "Status", "status_of"]


class Status(enum.Enum):
    """The state of a command's subject."""

    UNDECLARED = "undeclared"  # queue
    DECLARED = "declared"  # queue
    DEAD_LETTER_QUEUE = "dead-letter queue"  # a q.XQ name: nothing is done *on* it
    RESERVED = "reserved"  # entry taken from a canonical queue
    HELD = "held"  # entry taken from a delay queue
    UNRESERVED = "unreserved"  # entry nobody holds
    OPEN = "open"  # the broker

    # Members are singletons: identity hashing is correct and much cheaper than
    # Enum's name-based hash (every apply looks a (status, type) pair up).
    __hash__ = object.__hash__


def _queue_status(state: BrokerState, queue_name: str) -> Status:
    if queue_name in state.queues:  # a declared canonical name: the common case
        return Status.DECLARED
    if queue_name.endswith(DEAD_SUFFIX):
        return Status.DEAD_LETTER_QUEUE
    return Status.DECLARED if q_name(queue_name) in state.queues else Status.UNDECLARED


def _entry_status(state: BrokerState, command: Any) -> Status:
    """The status of the entry an entry command names (its ``seq``)."""
    reservation = state.reserved.get(command.seq)
    if reservation is None:
        return Status.UNRESERVED
    if reservation.entry.queue_name.endswith(DELAY_SUFFIX):
        return Status.HELD
    return Status.RESERVED


def _entries_status(state: BrokerState, command: c.AckMany) -> Status:
    """The status of a batch of entries: UNRESERVED if one is not reserved, is named
    twice, or there is none; else HELD if every one is held; else RESERVED."""
    seqs = command.seqs
    if not seqs or len(frozenset(seqs)) != len(seqs):
        return Status.UNRESERVED
    get = state.reserved.get
    held = True
    for seq in seqs:
        reservation = get(seq)
        if reservation is None:
            return Status.UNRESERVED
        if held and not reservation.entry.queue_name.endswith(DELAY_SUFFIX):
            held = False
    return Status.HELD if held else Status.RESERVED


#: Command type -> the status of the subject it addresses.
SUBJECT: dict[type[c.Command], Callable[[BrokerState, Any], Status]] = {
    c.DeclareQueue: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.Enqueue: lambda s, cmd: _queue_status(s, cmd.message.queue_name),
    c.Reserve: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.Flush: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.Ack: _entry_status,
    c.AckMany: _entries_status,
    c.Nack: _entry_status,
    c.Requeue: _entry_status,
    c.Promote: _entry_status,
    c.Replace: _entry_status,
    c.Start: _entry_status,
    c.ExpireDeadLetters: lambda s, cmd: _queue_status(s, cmd.queue_name),
    c.FlushAll: lambda s, cmd: Status.OPEN,
    c.Release: lambda s, cmd: Status.OPEN,
    c.Recover: lambda s, cmd: Status.OPEN,
    c.Renew: lambda s, cmd: Status.OPEN,
    c.ExpireLeases: lambda s, cmd: Status.OPEN,
}


def status_of(state: BrokerState, command: c.Command) -> Status:
    """Return the status of the subject ``command`` addresses in ``state``."""
    return SUBJECT[type(command)](state, command)
