"""Conformance testing: check a broker against the pure core.

`BrokerConformance` is a Hypothesis rule-based state machine. It drives a broker
through its public API (declare, enqueue with and without delay, consume, ack,
nack, requeue, close, flush, join) and applies the same operations to `dq.core`,
the oracle; after every step it checks that the broker delivered what the core
says it must (the same messages, in FIFO order, nothing when nothing is due to be
delivered), raised where the core refuses, and drains when the core says it is
empty. Every broker dq ships runs it; so can yours::

    from dq.testing import conformance_test

    TestMyBroker = conformance_test(lambda: MyBroker(...), max_examples=200)

The broker factory is called once per example and must return a broker with no
queues declared (a fresh namespace on a shared server).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dq import core
from dq.broker import Broker, Consumer, MessageProxy
from dq.core import policy
from dq.core.machine import pending
from dq.errors import QueueJoinTimeout, QueueNotFound
from dq.message import Message

__all__ = ["BrokerConformance", "conformance_test"]

#: Reads a broker's dead letters of a canonical queue (message ids, oldest first).
DeadLetterReader = Callable[[Broker, str], Sequence[str]]


@attrs.define
class _Held:
    proxy: MessageProxy
    seq: int


@attrs.define
class _ConsumerRecord:
    consumer: Consumer
    consumer_id: str
    queue_name: str
    prefetch: int
    held: list[_Held] = attrs.field(factory=list)
    # Reserved by the consumer's last batch and not handed out yet.
    buffer: deque[core.Entry] = attrs.field(factory=deque)


_JSONish = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


class _Fixed:
    """Stands in for ``st.data()`` when one rule reuses another with a known choice."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, strategy: Any) -> Any:
        return self.value


class BrokerConformance(RuleBasedStateMachine):
    """The conformance machine. Use `conformance_test` to build a test case from it.

    Class attributes set by `conformance_test`:
        broker_factory: returns a fresh broker.
        queue_names: the canonical queue names the machine uses.
        consumer_timeout_ms: how long ``next()`` may wait for nothing.
        dead_letters: reads the broker's dead letters, or None to skip that check.
        strict_queues: the broker refuses to enqueue to, or consume from, a queue
            it has not declared (`QueueNotFound`). Server brokers that, like
            Dramatiq's Redis broker, let a producer send to queues declared by other
            processes set it to False; the machine then never uses undeclared queues.
        broker_options: options a broker adds to the messages it stores (such as
            ``redis_message_id``), ignored when comparing a promoted copy.
    """

    broker_factory: ClassVar[Callable[[], Broker]]
    queue_names: ClassVar[tuple[str, ...]] = ("conformance_a", "conformance_b")
    consumer_timeout_ms: ClassVar[int] = 5
    dead_letters: ClassVar[DeadLetterReader | None] = None
    strict_queues: ClassVar[bool] = True
    broker_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.broker = type(self).broker_factory()
        self.model = core.initial_state()
        self.consumers: list[_ConsumerRecord] = []
        self.stored: dict[str, bytes] = {}  # message_id -> the encoding enqueue returned
        self.next_consumer = 0

    def teardown(self) -> None:
        for record in self.consumers:
            record.consumer.close()
        self.broker.flush_all()
        self.broker.close()

    # -- helpers --------------------------------------------------------------------

    def _apply(self, command: core.Command) -> core.Step:
        step = core.apply(self.model, command)
        self.model = step.state
        return step

    def _declared(self, queue_name: str) -> bool:
        return policy.q_name(queue_name) in self.model.queues

    # -- rules ------------------------------------------------------------------------

    @initialize()
    def declare_first_queue(self) -> None:
        # The second queue starts undeclared, so QueueNotFound paths are exercised too.
        self.declare_queue(0)
        self.open_consumer(0, False, 2)

    @rule(index=st.integers(0, 1))
    def declare_queue(self, index: int) -> None:
        name = self.queue_names[index]
        self.broker.declare_queue(name)
        self._apply(core.DeclareQueue(name))
        assert name in self.broker.get_declared_queues()

    @rule(
        index=st.integers(0, 1),
        args=st.lists(st.integers(0, 9), max_size=2) | st.lists(_JSONish, max_size=3),
        delay=st.none() | st.none() | st.integers(0, 10_000_000),
    )
    def enqueue(self, index: int, args: list[Any], delay: int | None) -> None:
        name = self.queue_names[index]
        message: Message[Any] = Message(
            name, "conformance_actor", tuple(args), {"k": 1}, {"o": "x"}
        )
        if not self._declared(name):
            if not self.strict_queues:
                return
            try:
                self.broker.enqueue(message, delay=delay)
            except QueueNotFound:
                return
            raise AssertionError(f"enqueue on undeclared {name!r} did not raise QueueNotFound")
        before = int(time.time() * 1000)
        stored = self.broker.enqueue(message, delay=delay)
        after = int(time.time() * 1000) + 1
        assert stored.message_id == message.message_id
        assert stored.args == message.args
        if delay is None:
            assert stored.queue_name == name
            assert "eta" not in stored.options
        else:
            assert stored.queue_name == policy.dq_name(name)
            eta = stored.options["eta"]
            assert before + delay <= eta <= after + delay, (before, delay, eta, after)
        payload = stored.encode()
        self.stored[stored.message_id] = payload
        self._apply(core.Enqueue(stored, payload))

    @rule(index=st.integers(0, 1), delay_queue=st.booleans(), prefetch=st.integers(1, 3))
    def open_consumer(self, index: int, delay_queue: bool, prefetch: int) -> None:
        name = self.queue_names[index]
        if delay_queue:
            name = policy.dq_name(name)
        if not self._declared(name):
            if not self.strict_queues:
                return
            try:
                self.broker.consume(name, prefetch=prefetch, timeout=self.consumer_timeout_ms)
            except QueueNotFound:
                return
            raise AssertionError(f"consume on undeclared {name!r} did not raise QueueNotFound")
        consumer = self.broker.consume(name, prefetch=prefetch, timeout=self.consumer_timeout_ms)
        self.next_consumer += 1
        self.consumers.append(
            _ConsumerRecord(consumer, f"model-consumer-{self.next_consumer}", name, prefetch)
        )

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def next_message(self, data: st.DataObject | _Fixed) -> None:
        record = data.draw(st.sampled_from(self.consumers))
        # A consumer with nothing buffered reserves as much as its prefetch allows, in
        # one batch, then hands the batch out in order.
        # It reserves only when at least half its prefetch window (at least one) is free.
        room = record.prefetch - len(record.held)
        if not record.buffer and room >= max(1, record.prefetch // 2):
            step = self._apply(core.Reserve(record.queue_name, record.consumer_id, room))
            for event in step.events:
                assert isinstance(event, core.events.Reserved)
                record.buffer.extend(event.entries)
        expected = record.buffer.popleft() if record.buffer else None
        try:
            proxy = next(record.consumer)
        except StopIteration:
            assert expected is None, f"the core delivers {expected!r}; the broker delivered none"
            return
        assert expected is not None, f"the core delivers nothing; the broker delivered {proxy!r}"
        assert proxy.message_id == expected.message_id, (proxy, expected)
        assert proxy.queue_name == expected.queue_name
        assert proxy.message.encode() == self.stored[expected.message_id]
        record.held.append(_Held(proxy, expected.seq))

    @precondition(lambda self: self.consumers)
    @rule(data=st.data(), outcome=st.sampled_from(["ack", "nack", "requeue"]))
    def process(self, data: st.DataObject, outcome: str) -> None:
        """Take the next message of a consumer and settle it at once (a worker's cycle)."""
        record = data.draw(st.sampled_from(self.consumers))
        self.next_message(_Fixed(record))
        if not record.held:
            return
        held = record.held.pop()
        if outcome == "ack":
            record.consumer.ack(held.proxy)
            self._apply(core.Ack(held.seq))
        elif outcome == "nack":
            record.consumer.nack(held.proxy)
            self._apply(core.Nack(held.seq, int(time.time() * 1000)))
        else:
            record.consumer.requeue([held.proxy])
            self._apply(core.Requeue(held.seq))

    @precondition(lambda self: self.consumers)
    @rule(data=st.data(), times=st.integers(2, 4))
    def take_several(self, data: st.DataObject, times: int) -> None:
        """Take several messages without settling any (runs into the prefetch limit)."""
        record = data.draw(st.sampled_from(self.consumers))
        for _ in range(times):
            self.next_message(_Fixed(record))

    def _pick_held(self, data: st.DataObject) -> tuple[_ConsumerRecord, _Held]:
        record = data.draw(st.sampled_from([r for r in self.consumers if r.held]))
        held = record.held.pop(data.draw(st.integers(0, len(record.held) - 1)))
        return record, held

    def _any_held(self) -> bool:
        return any(r.held for r in self.consumers)

    @precondition(_any_held)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        record, held = self._pick_held(data)
        record.consumer.ack(held.proxy)
        self._apply(core.Ack(held.seq))

    @precondition(_any_held)
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        record, held = self._pick_held(data)
        record.consumer.nack(held.proxy)
        self._apply(core.Nack(held.seq, int(time.time() * 1000)))

    @precondition(_any_held)
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        record, held = self._pick_held(data)
        record.consumer.requeue([held.proxy])
        self._apply(core.Requeue(held.seq))

    @precondition(lambda self: any(r.held and r.queue_name.endswith(".DQ") for r in self.consumers))
    @rule(data=st.data())
    def promote(self, data: st.DataObject) -> None:
        """Promote a held delayed message, if the broker's consumers can (atomically)."""
        record = data.draw(
            st.sampled_from([r for r in self.consumers if r.held and r.queue_name.endswith(".DQ")])
        )
        promote = getattr(record.consumer, "promote", None)
        if promote is None:
            return
        held = record.held.pop(data.draw(st.integers(0, len(record.held) - 1)))
        stored = promote(held.proxy)
        expected = policy.promoted(held.proxy.message)
        for option in self.broker_options:
            assert option in stored.options, (option, stored)
            expected = expected.copy(options={option: stored.options[option]})
        assert stored == expected
        payload = stored.encode()
        self.stored[stored.message_id] = payload
        self._apply(core.Promote(held.seq, stored, payload))

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def close_consumer(self, data: st.DataObject) -> None:
        record = self.consumers.pop(data.draw(st.integers(0, len(self.consumers) - 1)))
        record.consumer.close()
        self._apply(core.Release(record.consumer_id))

    @rule(index=st.integers(0, 2))
    def flush(self, index: int) -> None:
        if index == 2:  # every queue
            self.broker.flush_all()
            self._apply(core.FlushAll())
            return
        name = self.queue_names[index]
        if not self._declared(name):
            return
        self.broker.flush(name)
        self._apply(core.Flush(name))

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def joins_agree(self) -> None:
        for name in self.queue_names:
            if not self._declared(name):
                continue
            if pending(self.model, name) == 0:
                self.broker.join(name, timeout=1000)
            else:
                try:
                    self.broker.join(name, timeout=1)
                except QueueJoinTimeout:
                    continue
                raise AssertionError(
                    f"join({name!r}) returned with {pending(self.model, name)} unfinished"
                )

    @invariant()
    def dead_letters_agree(self) -> None:
        reader = type(self).dead_letters
        if reader is None:
            return
        for name in self.queue_names:
            if not self._declared(name):
                continue
            # The same dead letters; their order is not part of the contract (a
            # server may order nacks made in the same millisecond arbitrarily).
            expected = [d.entry.message_id for d in core.machine.dead_letters(self.model, name)]
            assert sorted(reader(self.broker, name)) == sorted(expected)


def conformance_test(
    broker_factory: Callable[[], Broker],
    *,
    dead_letters: DeadLetterReader | None = None,
    queue_names: tuple[str, str] = ("conformance_a", "conformance_b"),
    consumer_timeout_ms: int = 5,
    strict_queues: bool = True,
    broker_options: tuple[str, ...] = (),
    max_examples: int = 200,
    stateful_step_count: int = 50,
) -> Any:
    """Return a ``unittest.TestCase`` class running `BrokerConformance` on a broker.

    Args:
        broker_factory: returns a fresh broker (no queues declared).
        dead_letters: reads the broker's dead-letter message ids of a canonical queue.
        queue_names: two canonical queue names the machine may use.
        consumer_timeout_ms: the consumers' timeout (time ``next()`` may wait).
        strict_queues: see `BrokerConformance`.
        broker_options: see `BrokerConformance`.
        max_examples: how many runs Hypothesis makes.
        stateful_step_count: the most steps in one run.
    """
    machine: Any = type(
        "BrokerConformanceMachine",
        (BrokerConformance,),
        {
            "broker_factory": staticmethod(broker_factory),
            "dead_letters": None if dead_letters is None else staticmethod(dead_letters),
            "queue_names": queue_names,
            "consumer_timeout_ms": consumer_timeout_ms,
            "strict_queues": strict_queues,
            "broker_options": broker_options,
        },
    )
    case = machine.TestCase
    case.settings = settings(
        max_examples=max_examples,
        stateful_step_count=stateful_step_count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return case
