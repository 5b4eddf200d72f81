"""The consumer contract `dq.testing.BrokerConformance` holds a broker to, as checks:
each function compares what the broker did with the model (a `dq.core.BrokerState`
and the machine's records of its consumers) and raises ``AssertionError`` naming the
breach; none of them changes anything.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import attrs

from dq import core
from dq.broker import Consumer, MessageProxy
from dq.core import policy
from dq.core.machine import deliveries_of, waiting
from dq.message import Message

__all__ = [
    "ConsumerRecord",
    "Held",
    "check_delivered",
    "check_order",
    "check_stored",
    "check_suspect",
    "must_deliver",
    "now_ms",
    "others_room",
]


def now_ms() -> int:
    """Wall-clock ms: the brokers compute etas from the same clock."""
    return int(time.time() * 1000)


@attrs.define
class Held:
    """A message a consumer handed out and the machine has not settled yet."""

    proxy: MessageProxy
    seq: int
    started: bool = False


@attrs.define(eq=False)
class ConsumerRecord:
    """The machine's record of one open (or dead) consumer."""

    consumer: Consumer
    consumer_id: str
    queue_name: str
    prefetch: int
    crashable: bool = False  # opened by `Crashes.consume`
    held: list[Held] = attrs.field(factory=list)

    @property
    def room(self) -> bool:
        """Whether it may hold messages it has not handed out yet."""
        return len(self.held) < self.prefetch


def others_room(consumers: Iterable[ConsumerRecord], record: ConsumerRecord) -> int:
    """How many messages the other open consumers of its queue may hold unseen."""
    return sum(
        r.prefetch - len(r.held)
        for r in consumers
        if r is not record and r.queue_name == record.queue_name
    )


def must_deliver(
    state: core.BrokerState, consumers: Iterable[ConsumerRecord], record: ConsumerRecord
) -> bool:
    """Whether the model proves a message is there for ``record``'s consumer."""
    if record.held:
        return False  # it may wait for room for a batch
    now = now_ms()
    entries = waiting(state, record.queue_name)
    due = [e for e in entries if e.eta_ms is None or e.eta_ms <= now]
    if len(entries) - len(due) >= record.prefetch:
        return False  # it may hold back that many messages that are not due
    return len(due) > others_room(consumers, record)


def check_delivered(
    state: core.BrokerState,
    records: Iterable[ConsumerRecord],
    record: ConsumerRecord,
    proxy: MessageProxy,
) -> core.Entry:
    """Check that ``record``'s consumer may hand out ``proxy`` now (within its
    prefetch, waiting on its queue, with the bytes it was stored with) and return
    the model's entry of it. ``records``: every consumer, open or dead."""
    assert len(record.held) < record.prefetch, (
        f"{record.consumer_id} delivered {proxy.message_id} while holding "
        f"{len(record.held)} unsettled messages (prefetch {record.prefetch})"
    )
    assert proxy.queue_name == record.queue_name, (proxy.queue_name, record.queue_name)
    entry = next(
        (e for e in waiting(state, record.queue_name) if e.message_id == proxy.message_id),
        None,
    )
    if entry is None:
        holder = [
            r.consumer_id for r in records for h in r.held if h.proxy.message_id == proxy.message_id
        ]
        raise AssertionError(
            f"{record.consumer_id} delivered {proxy.message_id}, which is not waiting on "
            f"{record.queue_name!r}: "
            + (f"held by {holder}" if holder else "settled, flushed or never stored")
        )
    assert proxy.message.encode() == entry.payload, (proxy.message, entry)
    return entry


def check_order(
    state: core.BrokerState,
    ordered: Collection[int],
    consumers: Iterable[ConsumerRecord],
    record: ConsumerRecord,
    entry: core.Entry,
) -> None:
    """Check FIFO where it is certain: among the ``ordered`` seqs (never returned to
    a queue), nothing due waits in front of ``entry`` that no other consumer may
    hold unseen."""
    if entry.seq not in ordered:
        return
    if others_room(consumers, record):
        return  # another consumer may hold what comes first
    now = now_ms()
    for earlier in waiting(state, record.queue_name):
        if earlier.seq < entry.seq and earlier.seq in ordered:
            assert earlier.eta_ms is not None and earlier.eta_ms > now, (
                f"{record.consumer_id} delivered {entry.message_id} (stored #{entry.seq}) "
                f"before {earlier.message_id} (stored #{earlier.seq}), which waits in "
                f"front of it on {record.queue_name!r} and no other consumer may hold"
            )


def check_suspect(state: core.BrokerState, record: ConsumerRecord, held: Held) -> None:
    """Check ``suspect`` against the model's delivery count, if the consumer offers it."""
    if type(record.consumer).suspect is Consumer.suspect:
        return  # it offers no delivery count
    expected = deliveries_of(state, held.seq) > 0
    assert record.consumer.suspect(held.proxy) == expected, (
        f"suspect({held.proxy.message_id}) should be {expected}: its consumers died "
        f"holding it {deliveries_of(state, held.seq)} times"
    )


def check_stored(
    message: Message[Any],
    stored: Message[Any],
    delay: int | None,
    before: int,
    broker_options: Sequence[str],
) -> None:
    """Check ``stored``, what the broker says it stored for ``message`` (enqueued, or
    as a replacement, with ``delay``; ``before``: the time before it was asked)."""
    after = now_ms() + 1
    assert stored.message_id == message.message_id
    assert stored.args == message.args
    assert stored.actor_name == message.actor_name
    name = policy.q_name(message.queue_name)
    if delay is None:
        assert stored.queue_name == message.queue_name
        assert stored.options.get("eta") == message.options.get("eta")
    else:
        assert stored.queue_name == policy.dq_name(name)
        eta = stored.options["eta"]
        assert before + delay <= eta <= after + delay, (before, delay, eta, after)
    for option in broker_options:
        assert option in stored.options, (option, stored)
