"""`BrokerConformance`, the Hypothesis rule-based state machine of `dq.testing`: its
rules drive a broker through its public API and apply the same commands to the
model (`dq.core`, the oracle), and the checks of `dq.testing.contract` judge what
the broker did. See `dq.testing` for what it accepts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dq import core
from dq.broker import Broker, MessageProxy
from dq.core import policy
from dq.core.machine import deliveries_of, pending, waiting
from dq.errors import QueueJoinTimeout, QueueNotFound
from dq.message import Message
from dq.middleware import Middleware
from dq.testing.contract import (
    ConsumerRecord,
    Held,
    check_delivered,
    check_order,
    check_stored,
    check_suspect,
    must_deliver,
    now_ms,
    others_room,
)
from dq.testing.crashes import Crashes

__all__ = ["BrokerConformance", "DeadLetterReader"]

#: Reads a broker's dead letters of a canonical queue (message ids, oldest first).
DeadLetterReader = Callable[[Broker, str], Sequence[str]]


class _Hooks(Middleware):
    """Records the queue names the declare hooks get."""

    def __init__(self) -> None:
        self.before: list[str] = []
        self.after: list[str] = []

    def before_declare_queue(self, broker: Broker, queue_name: str) -> None:
        self.before.append(queue_name)

    def after_declare_queue(self, broker: Broker, queue_name: str) -> None:
        self.after.append(queue_name)


_JSONish = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)

#: Queue names no message may be stored on (each collides with a broker's own keys).
_RESERVED_NAMES = ("__heartbeats__", "__dq__.deliveries.{q}", "__acks__.x.{q}", "{q}.msgs")


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
            ``redis_message_id``), ignored when comparing a stored copy.
        crashes: makes the example's `Crashes`, or None: no crash steps.
        delivery_patience_ms: how long a consumer may take, over several ``next()``
            calls, to deliver a message the model proves is there for it.
        check_queue_names: the broker must refuse names no message may be stored on
            (``.XQ`` names, to declare or enqueue to, and names of broker keys).
        check_declare_hooks: the declare hooks must get the canonical queue name.
    """

    broker_factory: ClassVar[Callable[[], Broker]]
    queue_names: ClassVar[tuple[str, ...]] = ("conformance_a", "conformance_b")
    consumer_timeout_ms: ClassVar[int] = 5
    dead_letters: ClassVar[DeadLetterReader | None] = None
    strict_queues: ClassVar[bool] = True
    broker_options: ClassVar[tuple[str, ...]] = ()
    crashes: ClassVar[Callable[[Broker], Crashes] | None] = None
    delivery_patience_ms: ClassVar[int] = 2000
    check_queue_names: ClassVar[bool] = True
    check_declare_hooks: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.broker = type(self).broker_factory()
        self.hooks = _Hooks()
        self.broker.add_middleware(self.hooks)
        make_crashes = type(self).crashes
        self.crash_hooks: Crashes | None = (
            None if make_crashes is None else make_crashes(self.broker)
        )
        self.model = core.initial_state()
        self.consumers: list[ConsumerRecord] = []
        self.dead: list[ConsumerRecord] = []  # died, not recovered yet
        self.ordered: set[int] = set()  # seqs never returned to a queue since stored
        self.next_consumer = 0
        # Model time of leases: each recovery round renews the live consumers' leases
        # to the new round and expires every lease of an earlier one.
        self.lease_round = 0

    def teardown(self) -> None:
        for record in self.consumers:
            record.consumer.close()
        if self.crash_hooks is not None:
            if self.dead:
                self.crash_hooks.recover()
            self.crash_hooks.close()
        self.broker.flush_all()
        self.broker.close()

    # -- the model ------------------------------------------------------------------------

    def _apply(self, command: core.Command) -> core.Step:
        step = core.apply(self.model, command)
        self.model = step.state
        for event in step.events:
            if isinstance(event, core.events.Enqueued):
                self.ordered.add(event.row[0])
            elif isinstance(event, core.events.Replaced | core.events.Promoted):
                self.ordered.add(event.new.seq)
            elif isinstance(event, core.events.Requeued | core.events.Recovered):
                self.ordered.discard(event.entry.seq)
        return step

    def _declared(self, queue_name: str) -> bool:
        return policy.q_name(queue_name) in self.model.queues

    def _lease(self) -> int | None:
        hooks = self.crash_hooks
        return self.lease_round if hooks is not None and hooks.expires_leases else None

    def _forget_order(self, queue_name: str) -> None:
        """A consumer with room closed or died: what it held unseen went back to the
        queue, in an order nobody knows."""
        for entry in waiting(self.model, queue_name):
            self.ordered.discard(entry.seq)

    def _reserve(self, record: ConsumerRecord, seq: int) -> None:
        """Record that ``record``'s consumer reserved entry ``seq`` (waiting on its
        queue), leaving the others waiting."""
        rows = waiting(self.model, record.queue_name)
        index = next(i for i, entry in enumerate(rows) if entry.seq == seq)
        step = self._apply(
            core.Reserve(record.queue_name, record.consumer_id, index + 1, self._lease())
        )
        (event,) = step.events
        assert isinstance(event, core.events.Reserved)
        ordered = set(self.ordered)
        for skipped in event.entries[:-1]:  # the model's order only: they stay waiting
            self._apply(core.Requeue(skipped.seq))
        self.ordered = ordered

    # -- rules ------------------------------------------------------------------------

    @initialize()
    def declare_first_queue(self) -> None:
        # The second queue starts undeclared, so QueueNotFound paths are exercised too.
        self.declare_queue(0, False)
        self.open_consumer(0, False, 2, True)

    @rule(index=st.integers(0, 1), delay_name=st.booleans())
    def declare_queue(self, index: int, delay_name: bool) -> None:
        name = self.queue_names[index]
        new = not self._declared(name)
        before = len(self.hooks.before)
        self.broker.declare_queue(policy.dq_name(name) if delay_name else name)
        self._apply(core.DeclareQueue(name))
        assert name in self.broker.get_declared_queues()
        if self.check_declare_hooks and new:
            assert self.hooks.before[before:] == [name], ("before_declare_queue", name)
            assert self.hooks.after[-1:] == [name], ("after_declare_queue", name)

    @rule(index=st.integers(0, 1), kind=st.integers(0, len(_RESERVED_NAMES)))
    def refuse_bad_name(self, index: int, kind: int) -> None:
        """A dead-letter queue or a broker's own key is never a place to store on."""
        if not self.check_queue_names:
            return
        name = self.queue_names[index]
        declared = set(self.broker.get_declared_queues())
        if kind == len(_RESERVED_NAMES):
            try:
                self.broker.declare_queue(policy.xq_name(name))
            except QueueNotFound:
                pass
            else:
                raise AssertionError(f"declare_queue({policy.xq_name(name)!r}) did not raise")
            bad = policy.xq_name(name)
        else:
            bad = _RESERVED_NAMES[kind].format(q=name)
        assert set(self.broker.get_declared_queues()) == declared
        message: Message[Any] = Message(bad, "conformance_actor", (), {}, {})
        try:
            self.broker.enqueue(message)
        except (QueueNotFound, ValueError):
            return
        raise AssertionError(f"enqueue on {bad!r} did not raise")

    @rule(
        index=st.integers(0, 1),
        batch=st.lists(
            st.tuples(
                st.lists(st.integers(0, 9), max_size=2) | st.lists(_JSONish, max_size=3),
                st.none() | st.none() | st.none() | st.integers(0, 50) | st.integers(0, 10**7),
            ),
            min_size=1,
            max_size=4,
        ),
    )
    def enqueue(self, index: int, batch: list[tuple[list[Any], int | None]]) -> None:
        name = self.queue_names[index]
        for args, delay in batch:
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
            before = now_ms()
            stored = self.broker.enqueue(message, delay=delay)
            check_stored(message, stored, delay, before, self.broker_options)
            self._apply(core.Enqueue(stored, stored.encode()))

    @rule(
        index=st.integers(0, 1),
        delay_queue=st.booleans(),
        prefetch=st.integers(1, 3),
        crashable=st.booleans(),
    )
    def open_consumer(self, index: int, delay_queue: bool, prefetch: int, crashable: bool) -> None:
        name = self.queue_names[index]
        if delay_queue:
            name = policy.dq_name(name)
        timeout = self.consumer_timeout_ms
        if not self._declared(name):
            if not self.strict_queues:
                return
            try:
                self.broker.consume(name, prefetch=prefetch, timeout=timeout)
            except QueueNotFound:
                return
            raise AssertionError(f"consume on undeclared {name!r} did not raise QueueNotFound")
        self._open(name, prefetch, crashable=crashable)

    def _open(self, name: str, prefetch: int, *, crashable: bool) -> None:
        timeout = self.consumer_timeout_ms
        crashable = crashable and self.crash_hooks is not None
        if crashable:
            assert self.crash_hooks is not None
            consumer = self.crash_hooks.consume(name, prefetch, timeout)
        else:
            consumer = self.broker.consume(name, prefetch=prefetch, timeout=timeout)
        self.next_consumer += 1
        self.consumers.append(
            ConsumerRecord(
                consumer, f"model-consumer-{self.next_consumer}", name, prefetch, crashable
            )
        )

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def next_message(self, data: st.DataObject | _Fixed) -> None:
        record: ConsumerRecord = data.draw(st.sampled_from(self.consumers))
        must = must_deliver(self.model, self.consumers, record)
        deadline = time.monotonic() + self.delivery_patience_ms / 1000
        proxy: MessageProxy | None = None
        while proxy is None:
            try:
                proxy = next(record.consumer)
            except StopIteration:
                if not must:
                    return
                assert time.monotonic() < deadline, (
                    f"{record.consumer_id} holds nothing and delivered nothing in "
                    f"{self.delivery_patience_ms} ms, but "
                    f"{len(waiting(self.model, record.queue_name))} messages wait on "
                    f"{record.queue_name!r} and its other consumers may hold at most "
                    f"{others_room(self.consumers, record)}"
                )
        entry = check_delivered(self.model, (*self.consumers, *self.dead), record, proxy)
        check_order(self.model, self.ordered, self.consumers, record, entry)
        self._reserve(record, entry.seq)
        record.held.append(Held(proxy, entry.seq))
        self._check_suspect(record, record.held[-1])

    def _check_suspect(self, record: ConsumerRecord, held: Held) -> None:
        hooks = self.crash_hooks
        if hooks is None or not hooks.max_deliveries:
            return
        check_suspect(self.model, record, held)

    @precondition(lambda self: self.consumers)
    @rule(
        data=st.data(),
        outcome=st.sampled_from([core.Ack, core.Nack, core.Requeue, core.Replace]),
    )
    def process(self, data: st.DataObject, outcome: type[core.Command]) -> None:
        """Take the next message of a consumer and settle it at once (a worker's cycle)."""
        record = data.draw(st.sampled_from(self.consumers))
        self.next_message(_Fixed(record))
        if not record.held:
            return
        self._settle(record, record.held.pop(), outcome, data)

    def _settle(
        self,
        record: ConsumerRecord,
        held: Held,
        outcome: type[core.Command],
        data: st.DataObject,
    ) -> None:
        if outcome is core.Ack:
            record.consumer.ack(held.proxy)
            self._apply(core.Ack(held.seq))
        elif outcome is core.Nack:
            reason = data.draw(st.sampled_from(core.DeathReason))
            held.proxy.death_reason = reason
            record.consumer.nack(held.proxy)
            self._apply(core.Nack(held.seq, now_ms(), reason))
        elif outcome is core.Requeue:
            record.consumer.requeue([held.proxy])
            self._apply(core.Requeue(held.seq))
        else:
            replace = getattr(record.consumer, "replace", None)
            if replace is None:  # no atomic replace: settle it as done instead
                record.consumer.ack(held.proxy)
                self._apply(core.Ack(held.seq))
                return
            message = held.proxy.message
            retries = int(message.options.get("retries") or 0) + 1
            new = policy.promoted(message).copy(options={"retries": retries})
            delay = data.draw(st.none() | st.integers(0, 50) | st.integers(0, 10_000_000))
            before = now_ms()
            stored = replace(held.proxy, new, delay)
            check_stored(new, stored, delay, before, self.broker_options)
            self._apply(core.Replace(held.seq, stored, stored.encode()))

    @precondition(lambda self: self.consumers)
    @rule(data=st.data(), times=st.integers(2, 4))
    def take_several(self, data: st.DataObject, times: int) -> None:
        """Take several messages without settling any (runs into the prefetch limit)."""
        record = data.draw(st.sampled_from(self.consumers))
        for _ in range(times):
            self.next_message(_Fixed(record))

    def _pick_held(self, data: st.DataObject) -> tuple[ConsumerRecord, Held]:
        record = data.draw(st.sampled_from([r for r in self.consumers if r.held]))
        held = record.held.pop(data.draw(st.integers(0, len(record.held) - 1)))
        return record, held

    def _any_held(self) -> bool:
        return any(r.held for r in self.consumers)

    @precondition(_any_held)
    @rule(
        data=st.data(),
        outcome=st.sampled_from([core.Ack, core.Nack, core.Requeue, core.Replace]),
    )
    def settle(self, data: st.DataObject, outcome: type[core.Command]) -> None:
        record, held = self._pick_held(data)
        self._settle(record, held, outcome, data)

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
        self._apply(core.Promote(held.seq, stored, stored.encode()))

    @precondition(
        lambda self: any(
            not h.started and not policy.is_delay_queue(r.queue_name)
            for r in self.consumers
            for h in r.held
        )
    )
    @rule(data=st.data(), alone=st.booleans())
    def start(self, data: st.DataObject, alone: bool) -> None:
        """Report that a held message starts running (`dq.core.Start`)."""
        record = data.draw(
            st.sampled_from(
                [
                    r
                    for r in self.consumers
                    if not policy.is_delay_queue(r.queue_name)
                    and any(not h.started for h in r.held)
                ]
            )
        )
        held = data.draw(st.sampled_from([h for h in record.held if not h.started]))
        record.consumer.started(held.proxy, alone=alone)
        held.started = True
        self._apply(core.Start(held.seq, alone))

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def close_consumer(self, data: st.DataObject) -> None:
        record = self.consumers.pop(data.draw(st.integers(0, len(self.consumers) - 1)))
        record.consumer.close()
        self._apply(core.Release(record.consumer_id))
        if record.room:
            self._forget_order(record.queue_name)

    def _can_crash(self, record: ConsumerRecord) -> bool:
        # Only a consumer known to hold nothing unseen: the model then knows exactly
        # what it held, and so every delivery count.
        return not record.room or not waiting(self.model, record.queue_name)

    @precondition(lambda self: any(r.crashable for r in self.consumers))
    @rule(data=st.data(), poison=st.booleans())
    def crash(self, data: st.DataObject, poison: bool) -> None:
        """A consumer takes what it can, maybe starts one message alone (``poison``),
        and dies holding it all (it is never closed)."""
        hooks = self.crash_hooks
        assert hooks is not None
        record: ConsumerRecord = data.draw(
            st.sampled_from([r for r in self.consumers if r.crashable])
        )
        while not self._can_crash(record):
            count = len(record.held)
            self.next_message(_Fixed(record))
            if len(record.held) == count:
                return  # it may hold messages unseen: the model could not follow
        if poison and not policy.is_delay_queue(record.queue_name):
            fresh = [h for h in record.held if not h.started]
            # A worker runs suspects alone: the poison is most likely one of them.
            suspects = [h for h in fresh if deliveries_of(self.model, h.seq)]
            fresh = suspects or fresh
            if fresh:
                held = data.draw(st.sampled_from(fresh))
                record.consumer.started(held.proxy, alone=True)
                held.started = True
                self._apply(core.Start(held.seq, True))
        self.consumers.remove(record)
        hooks.crash(record.consumer)
        self.dead.append(record)
        if hooks.recovers_at_once:
            self._recover_model()
        # A supervisor starts a new process in its place.
        self._open(record.queue_name, record.prefetch, crashable=True)

    @precondition(lambda self: self.dead)
    @rule()
    def recover(self) -> None:
        """The broker gives back what the dead consumers held."""
        assert self.crash_hooks is not None
        self.crash_hooks.recover()
        self._recover_model()

    def _recover_model(self) -> None:
        hooks = self.crash_hooks
        assert hooks is not None
        now = now_ms()
        if hooks.expires_leases:
            self.lease_round += 1
            for record in self.consumers:  # the live consumers' keepers renew them
                self._apply(core.Renew(record.consumer_id, self.lease_round))
            self._apply(core.ExpireLeases(self.lease_round, hooks.max_deliveries))
        else:
            for record in self.dead:
                self._apply(core.Recover(record.consumer_id, now, hooks.max_deliveries))
        self.dead.clear()

    @rule(index=st.integers(0, 2), draw=st.integers(0, 3))
    def flush(self, index: int, draw: int) -> None:
        if draw:  # one draw in four: a flush drops everything the other steps built
            return
        names = self.queue_names if index == 2 else (self.queue_names[index],)
        names = tuple(name for name in names if self._declared(name))
        if not names:
            return
        # Messages a consumer holds unseen would survive the flush, and the model
        # cannot know which: such consumers close first (what they hold goes back).
        for record in list(self.consumers):
            if (
                record.room
                and policy.q_name(record.queue_name) in names
                and waiting(self.model, record.queue_name)
            ):
                self.consumers.remove(record)
                record.consumer.close()
                self._apply(core.Release(record.consumer_id))
                self._forget_order(record.queue_name)
        if index == 2:
            self.broker.flush_all()
            self._apply(core.FlushAll())
        else:
            self.broker.flush(names[0])
            self._apply(core.Flush(names[0]))

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
