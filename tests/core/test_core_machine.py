"""The pure core: unit tests, the exhaustive (status x command) square, and a model test."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dq import core
from dq.core import (
    Ack,
    AckMany,
    BrokerState,
    Command,
    DeclareQueue,
    Enqueue,
    ExpireDeadLetters,
    ExpireLeases,
    Flush,
    FlushAll,
    InvalidTransition,
    Nack,
    Promote,
    Recover,
    Release,
    Renew,
    Replace,
    Requeue,
    Reserve,
    Start,
    Status,
    apply,
    initial_state,
    policy,
)
from dq.core import effects as fx
from dq.core import events as ev
from dq.core.commands import COMMAND_TYPES
from dq.core.machine import TRANSITIONS, dead_letters, held_by, pending, status_of, waiting
from dq.core.records import Message

QUEUES = ("a", "b")


def message(queue_name: str = "a", n: int = 0, eta: int | None = None) -> Message[Any]:
    options: core.FrozenDict[str, Any] = (
        core.EMPTY if eta is None else core.FrozenDict({"eta": eta})
    )
    return Message(queue_name, "f", (n,), core.EMPTY, options, f"id-{n}", 1000 + n)


def enqueue(name: str = "a", n: int = 0, eta: int | None = None) -> Enqueue:
    return Enqueue(message(name, n, eta), b"payload-%d" % n)


def run(*commands: Command, state: BrokerState | None = None) -> core.Step:
    step = core.Step(initial_state() if state is None else state)
    for command in commands:
        step = apply(step.state, command)
    return step


# -- unit tests -------------------------------------------------------------------------


def test_declare_emits_queue_and_delay_queue_events() -> None:
    step = run(DeclareQueue("a"))
    assert step.events == (ev.QueueDeclared("a"), ev.DelayQueueDeclared("a.DQ"))
    assert step.effects == ()
    assert set(step.state.queues.keys()) == {"a"}


def test_redeclare_is_an_explicit_no_op() -> None:
    first = run(DeclareQueue("a"))
    again = apply(first.state, DeclareQueue("a"))
    assert again.state is first.state
    assert again.events == () and again.effects == ()


def test_declaring_a_delay_queue_name_declares_its_canonical_queue() -> None:
    step = run(DeclareQueue("a.DQ"))
    assert set(step.state.queues.keys()) == {"a"}


@pytest.mark.parametrize("command", [enqueue(), Reserve("a", "c"), Flush("a")])
def test_commands_on_an_undeclared_queue_are_invalid(command: Command) -> None:
    with pytest.raises(InvalidTransition) as info:
        apply(initial_state(), command)
    assert info.value.status is Status.UNDECLARED
    assert info.value.command is command


@pytest.mark.parametrize(
    "command", [DeclareQueue("a.XQ"), enqueue("a.XQ"), Reserve("a.XQ", "c"), Flush("a.XQ")]
)
def test_nothing_addresses_a_dead_letter_queue(command: Command) -> None:
    state = run(DeclareQueue("a")).state
    with pytest.raises(InvalidTransition) as info:
        apply(state, command)
    assert info.value.status is Status.DEAD_LETTER_QUEUE


def test_enqueue_stores_a_row_and_says_push_ready() -> None:
    step = run(DeclareQueue("a"), enqueue("a", 1))
    (effect,) = step.effects
    assert isinstance(effect, fx.PushReady)
    assert effect.entry == core.Entry(1, "a", "id-1", None, b"payload-1")
    assert step.events == (ev.Enqueued(effect.row),)
    assert waiting(step.state, "a") == (effect.entry,)
    assert step.state.next_seq == 2


def test_delayed_enqueue_goes_to_the_delay_queue_with_its_eta() -> None:
    stored = policy.delayed(message("a", 1), delay_ms=500, now_ms=10_000)
    assert stored.queue_name == "a.DQ" and stored.options["eta"] == 10_500
    step = run(DeclareQueue("a"), Enqueue(stored, b"p"))
    (effect,) = step.effects
    assert isinstance(effect, fx.PushDelayed)
    assert effect.entry.eta_ms == 10_500 and effect.entry.queue_name == "a.DQ"
    assert waiting(step.state, "a") == ()
    assert [e.message_id for e in waiting(step.state, "a.DQ")] == ["id-1"]


def test_reserve_is_fifo_and_bounded_by_limit() -> None:
    step = run(DeclareQueue("a"), *(enqueue("a", n) for n in range(5)), Reserve("a", "c", 3))
    (event,) = step.events
    assert isinstance(event, ev.Reserved)
    assert [e.message_id for e in event.entries] == ["id-0", "id-1", "id-2"]
    assert step.effects == (fx.Deliver("c", event.entries),)
    assert [e.message_id for e in waiting(step.state, "a")] == ["id-3", "id-4"]
    assert step.state.queues["a"].in_flight == 3
    assert pending(step.state, "a") == 5


def test_reserve_with_nothing_waiting_changes_nothing() -> None:
    state = run(DeclareQueue("a")).state
    step = apply(state, Reserve("a", "c", 5))
    assert step.state is state and step.events == () and step.effects == ()


def test_ack_forgets_nack_dead_letters_requeue_goes_to_the_tail() -> None:
    state = run(DeclareQueue("a"), *(enqueue("a", n) for n in range(3))).state
    state = apply(state, Reserve("a", "c", 3)).state
    acked = apply(state, Ack(1))
    assert acked.events == (ev.Acked(core.Entry(1, "a", "id-0", None, b"payload-0")),)
    nacked = apply(acked.state, Nack(2, now_ms=77))
    (effect,) = nacked.effects
    assert isinstance(effect, fx.DeadLetter) and effect.xq_name == "a.XQ"
    assert effect.dead_at_ms == 77
    assert [d.entry.message_id for d in dead_letters(nacked.state, "a")] == ["id-1"]
    requeued = apply(nacked.state, Requeue(3))
    assert [e.message_id for e in waiting(requeued.state, "a")] == ["id-2"]
    assert requeued.state.queues["a"].in_flight == 0
    assert pending(requeued.state, "a") == 1


def test_settling_twice_is_invalid() -> None:
    state = run(DeclareQueue("a"), enqueue(), Reserve("a", "c")).state
    state = apply(state, Ack(1)).state
    for command in (Ack(1), Nack(1, 0), Requeue(1), Promote(1, message(), b"")):
        with pytest.raises(InvalidTransition) as info:
            apply(state, command)
        assert info.value.status is Status.UNRESERVED


def test_promote_replaces_the_held_copy_in_one_step() -> None:
    delayed = policy.delayed(message("a", 7), delay_ms=10, now_ms=0)
    state = run(DeclareQueue("a"), Enqueue(delayed, b"old"), Reserve("a.DQ", "c")).state
    assert status_of(state, Ack(1)) is Status.HELD
    promoted = policy.promoted(delayed)
    assert promoted.queue_name == "a" and "eta" not in promoted.options
    step = apply(state, Promote(1, promoted, b"new"))
    new = core.Entry(2, "a", "id-7", None, b"new")
    old = core.Entry(1, "a.DQ", "id-7", 10, b"old")
    # The replacement is stored before the held copy is forgotten.
    assert step.effects == (fx.PushReady(new.row), fx.Forget(old))
    assert step.events == (ev.Promoted(old, new),)
    assert waiting(step.state, "a") == (new,)
    assert step.state.reserved.get(1) is None
    assert pending(step.state, "a") == 1


def test_promote_refuses_a_copy_that_is_not_the_held_message_promoted() -> None:
    delayed = policy.delayed(message("a", 7), delay_ms=10, now_ms=0)
    state = run(DeclareQueue("a"), Enqueue(delayed, b"old"), Reserve("a.DQ", "c")).state
    for wrong in (delayed, message("a", 8), policy.promoted(delayed).copy(queue_name="b")):
        with pytest.raises(InvalidTransition):
            apply(state, Promote(1, wrong, b"new"))


def test_promote_only_applies_to_held_entries() -> None:
    state = run(DeclareQueue("a"), enqueue("a", 1), Reserve("a", "c")).state
    with pytest.raises(InvalidTransition) as info:
        apply(state, Promote(1, message("a", 1), b""))
    assert info.value.status is Status.RESERVED


def test_flush_drops_waiting_delayed_and_dead_but_keeps_reserved() -> None:
    delayed = policy.delayed(message("a", 9), delay_ms=10, now_ms=0)
    state = run(
        DeclareQueue("a"),
        *(enqueue("a", n) for n in range(3)),
        Enqueue(delayed, b"d"),
        Reserve("a", "c", 2),
    ).state
    state = apply(state, Nack(1, 0)).state
    step = apply(state, Flush("a"))
    assert step.events == (ev.Flushed("a", 3),)  # 1 ready, 1 delayed, 1 dead
    assert step.effects == (fx.Purge("a"),)
    assert pending(step.state, "a") == 1  # the one still reserved
    assert dead_letters(step.state, "a") == ()
    assert apply(step.state, Ack(2)).state.queues["a"].in_flight == 0


def test_flush_all_flushes_every_queue() -> None:
    state = run(DeclareQueue("a"), DeclareQueue("b"), enqueue("a", 1), enqueue("b", 2)).state
    step = apply(state, FlushAll())
    assert step.events == (ev.Flushed("a", 1), ev.Flushed("b", 1))
    assert pending(step.state, "a") == pending(step.state, "b") == 0


def test_release_returns_what_a_consumer_holds_in_order() -> None:
    delayed = policy.delayed(message("a", 5), delay_ms=10, now_ms=0)
    state = run(
        DeclareQueue("a"),
        *(enqueue("a", n) for n in range(3)),
        Enqueue(delayed, b"d"),
        Reserve("a", "c1", 2),
        Reserve("a", "c2", 1),
        Reserve("a.DQ", "c1", 1),
    ).state
    assert [r.entry.seq for r in held_by(state, "c1")] == [1, 2, 4]
    step = apply(state, Release("c1"))
    assert [e.entry.seq for e in step.events if isinstance(e, ev.Requeued)] == [1, 2, 4]
    assert held_by(step.state, "c1") == ()
    assert [r.entry.seq for r in held_by(step.state, "c2")] == [3]
    assert [e.seq for e in waiting(step.state, "a")] == [1, 2]
    assert [e.seq for e in waiting(step.state, "a.DQ")] == [4]
    assert step.state.queues["a"].in_flight == 1


def test_apply_never_changes_its_input() -> None:
    state = run(DeclareQueue("a"), enqueue("a", 1), enqueue("a", 2)).state
    snapshot = repr(state)
    apply(state, Reserve("a", "c", 2))
    apply(state, Flush("a"))
    assert repr(state) == snapshot


def test_records_are_frozen() -> None:
    m = message()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        m.queue_name = "b"  # type: ignore[misc]  # the point: frozen records refuse this
    with pytest.raises(TypeError):
        m.options["x"] = 1  # type: ignore[index, assignment]  # mypy refuses it too: the point
    state = initial_state()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.next_seq = 5  # type: ignore[misc]  # the point


def test_a_large_queue_is_not_copied_per_step() -> None:
    # Structure sharing: enqueueing onto 100,000 waiting rows keeps every older row
    # object in place (the new state shares them) instead of copying the queue.
    state = run(DeclareQueue("a")).state
    for n in range(100_000):
        state = apply(state, Enqueue(message("a", n), b"")).state
    before = state.queues["a"].ready
    after = apply(state, Enqueue(message("a", -1), b"")).state.queues["a"].ready
    assert after._back is not None and after._back[1] is before._back
    assert after._front is before._front
    assert len(after) == 100_001


# -- the exhaustive (status x command) square --------------------------------------------

QUEUE_COMMANDS = (DeclareQueue, Enqueue, Reserve, Flush, ExpireDeadLetters)
ENTRY_COMMANDS = (Ack, AckMany, Nack, Requeue, Promote, Replace, Start)
BROKER_COMMANDS = (FlushAll, Release, Recover, Renew, ExpireLeases)
QUEUE_STATUSES = (Status.UNDECLARED, Status.DECLARED, Status.DEAD_LETTER_QUEUE)
ENTRY_STATUSES = (Status.RESERVED, Status.HELD, Status.UNRESERVED)


def test_the_table_only_pairs_statuses_with_commands_that_can_observe_them() -> None:
    assert set(COMMAND_TYPES) == set(QUEUE_COMMANDS + ENTRY_COMMANDS + BROKER_COMMANDS)
    for status, command_type in TRANSITIONS:
        if command_type in QUEUE_COMMANDS:
            assert status in QUEUE_STATUSES
        elif command_type in ENTRY_COMMANDS:
            assert status in ENTRY_STATUSES
        else:
            assert status is Status.OPEN


@st.composite
def reachable_states(draw: st.DrawFn) -> BrokerState:
    """A state reached by a random walk of valid commands."""
    state = initial_state()
    n = 0
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.integers(0, 12))
        name = draw(st.sampled_from(QUEUES))
        command: Command
        if kind == 0:
            command = DeclareQueue(name)
        elif kind in (1, 2):
            n += 1
            m = message(name, n)
            if draw(st.booleans()):
                m = policy.delayed(m, delay_ms=draw(st.integers(0, 100)), now_ms=0)
            command = Enqueue(m, b"%d" % n, draw(st.sampled_from([0, 0, 1, -2])))
        elif kind == 3:
            target = name + (".DQ" if draw(st.booleans()) else "")
            command = Reserve(target, draw(st.sampled_from(["c1", "c2"])), draw(st.integers(1, 3)))
        elif kind in (4, 5, 6) and len(state.reserved):
            seq = draw(st.sampled_from(sorted(state.reserved.keys())))
            command = (Ack(seq), Nack(seq, 0), Requeue(seq))[kind - 4]
        elif kind == 7:
            command = Flush(name)
        elif kind == 8:
            command = Release(draw(st.sampled_from(["c1", "c2"])))
        elif kind == 9 and len(state.reserved):
            command = Start(
                draw(st.sampled_from(sorted(state.reserved.keys()))), draw(st.booleans())
            )
        elif kind == 10:
            command = Recover(
                draw(st.sampled_from(["c1", "c2"])), 0, draw(st.sampled_from([0, 2, 3]))
            )
        elif kind == 11 and len(state.reserved):
            seq = draw(st.sampled_from(sorted(state.reserved.keys())))
            entry = state.reserved[seq].entry
            n += 1
            retry = policy.delayed(
                message(policy.q_name(entry.queue_name), n), delay_ms=10, now_ms=0
            )
            command = Replace(seq, retry, b"%d" % n)
        else:
            command = Renew(draw(st.sampled_from(["c1", "c2"])), draw(st.integers(0, 10)))
        with contextlib.suppress(InvalidTransition):
            state = apply(state, command).state
    return state


def check_invariants(state: BrokerState) -> None:
    """What every reachable state satisfies."""
    seqs: list[int] = []
    for name, queue in state.queues.items():
        assert name == queue.name == policy.q_name(name)
        for row in queue.ready:
            assert row[1] == name and row[3] is None
            seqs.append(row[0])
        for row in queue.delayed:
            assert row[1] == name + ".DQ"
            seqs.append(row[0])
        in_flight = [
            r for r in state.reserved.values() if policy.q_name(r.entry.queue_name) == name
        ]
        assert queue.in_flight == len(in_flight) >= 0
        for dead in queue.dead:
            seqs.append(dead.entry.seq)
    for seq, reservation in state.reserved.items():
        assert reservation.entry.seq == seq
        seqs.append(seq)
    assert len(seqs) == len(set(seqs)), "an entry is in two places at once"
    assert all(0 < seq < state.next_seq for seq in seqs)
    # Delivery counts exist only for stored, unsettled entries of canonical queues.
    live = {row[0] for queue in state.queues.values() for row in queue.ready} | set(
        state.reserved.keys()
    )
    for seq, count in state.deliveries.items():
        assert seq in live and count >= 1, (seq, count)


def command_for(
    draw: Callable[[st.SearchStrategy[Any]], Any], state: BrokerState, status: Status, kind: type
) -> Command:
    """A command of type ``kind`` whose subject has ``status`` in ``state``."""
    if kind in QUEUE_COMMANDS:
        declared = sorted(state.queues.keys())
        if status is Status.DECLARED:
            name = draw(st.sampled_from(declared)) if declared else "nope"
        elif status is Status.UNDECLARED:
            name = draw(st.sampled_from(["x", "y.DQ"]))
        else:
            name = draw(st.sampled_from(QUEUES)) + ".XQ"
        if kind is DeclareQueue:
            return DeclareQueue(name)
        if kind is Enqueue:
            return Enqueue(message(name, 999), b"")
        if kind is Reserve:
            return Reserve(name, "c", 1)
        if kind is ExpireDeadLetters:
            return ExpireDeadLetters(name, draw(st.integers(-1, 10)))
        return Flush(name)
    if kind in ENTRY_COMMANDS:
        wanted = [
            seq
            for seq, r in state.reserved.items()
            if (status is Status.HELD) == r.entry.queue_name.endswith(".DQ")
        ]
        if status is Status.UNRESERVED or not wanted:
            seq = draw(st.sampled_from([0, state.next_seq, state.next_seq + 5]))
        else:
            seq = draw(st.sampled_from(sorted(wanted)))
        if kind is Ack:
            return Ack(seq)
        if kind is AckMany:
            return AckMany((seq,))
        if kind is Nack:
            return Nack(seq, 5)
        if kind is Requeue:
            return Requeue(seq)
        if kind is Start:
            return Start(seq, draw(st.booleans()))
        reservation = state.reserved.get(seq)
        if kind is Replace:
            name = policy.q_name(reservation.entry.queue_name) if reservation else "a"
            retry = message(name, 998)
            if draw(st.booleans()):
                retry = policy.delayed(retry, delay_ms=5, now_ms=0)
            return Replace(seq, retry, b"retry")
        mid = reservation.entry.message_id if reservation else "none"
        name = policy.q_name(reservation.entry.queue_name) if reservation else "a"
        return Promote(seq, Message(name, "f", (), core.EMPTY, core.EMPTY, mid, 0), b"")
    if kind is FlushAll:
        return FlushAll()
    consumer = draw(st.sampled_from(["c1", "c2", "c3"]))
    if kind is Recover:
        return Recover(consumer, 7, draw(st.sampled_from([0, 2, 3])))
    if kind is Renew:
        return Renew(consumer, draw(st.integers(0, 10)))
    if kind is ExpireLeases:
        return ExpireLeases(draw(st.integers(0, 10)), draw(st.sampled_from([0, 2])))
    return Release(consumer)


SQUARE = [
    (status, kind)
    for status in Status
    for kind in COMMAND_TYPES
    if (kind in QUEUE_COMMANDS and status in QUEUE_STATUSES)
    or (kind in ENTRY_COMMANDS and status in ENTRY_STATUSES)
    or (kind in BROKER_COMMANDS and status is Status.OPEN)
]


@settings(max_examples=600)
@given(pair=st.sampled_from(SQUARE), state=reachable_states(), data=st.data())
def test_every_status_command_pair(
    pair: tuple[Status, type], state: BrokerState, data: st.DataObject
) -> None:
    status, kind = pair
    command = command_for(data.draw, state, status, kind)
    actual = status_of(state, command)
    if actual is not status:
        # The drawn state has no subject in that status (e.g. nothing held yet).
        assert status in (Status.RESERVED, Status.HELD, Status.DECLARED)
        return
    snapshot = repr(state)
    if (status, kind) not in TRANSITIONS:
        with pytest.raises(InvalidTransition) as info:
            apply(state, command)
        assert info.value.status is status
    else:
        step = apply(state, command)
        check_invariants(step.state)
        total_before = sum(q.pending + len(q.dead) for q in state.queues.values())
        total_after = sum(q.pending + len(q.dead) for q in step.state.queues.values())
        if kind is Enqueue:
            assert total_after == total_before + 1
        elif kind in (Ack, AckMany):
            assert total_after == total_before - 1
        elif kind in (Flush, FlushAll, ExpireDeadLetters):
            assert total_after <= total_before
        else:
            assert total_after == total_before
    assert repr(state) == snapshot, "apply changed its input"


@settings(max_examples=300)
@given(state=reachable_states(), data=st.data())
def test_ack_many_is_an_ack_of_each_in_order(state: BrokerState, data: st.DataObject) -> None:
    seqs = data.draw(st.lists(st.sampled_from([*sorted(state.reserved.keys()), 0]), max_size=6))
    command = AckMany(tuple(seqs))
    snapshot = repr(state)
    try:
        expected = run(*(Ack(seq) for seq in seqs), state=state)
    except InvalidTransition:
        with pytest.raises(InvalidTransition) as info:
            apply(state, command)
        assert info.value.status is Status.UNRESERVED
    else:
        if not seqs:
            with pytest.raises(InvalidTransition):
                apply(state, command)
            return
        step = apply(state, command)
        assert step.state == expected.state
        effects = [e for s in seqs for e in apply(state, Ack(s)).effects]
        events = [e for s in seqs for e in apply(state, Ack(s)).events]
        assert list(step.effects) == effects and list(step.events) == events
        check_invariants(step.state)
    assert repr(state) == snapshot, "apply changed its input"


def test_ack_is_valid_exactly_for_a_reserved_or_held_entry() -> None:
    # StubBroker records an ack without applying it when the entry has a reservation
    # (dq.brokers.stub.StubBroker._record_ack): that must be what the table says.
    acking = {status for status, kind in TRANSITIONS if kind is Ack}
    assert acking == {Status.RESERVED, Status.HELD}
    assert {status for status, kind in TRANSITIONS if kind is AckMany} == acking


def test_ack_many_refuses_a_batch_naming_an_entry_twice() -> None:
    state = run(DeclareQueue("a"), enqueue("a", 0), enqueue("a", 1), Reserve("a", "c", 2)).state
    assert apply(state, AckMany((1, 2))).state.queues["a"].in_flight == 0
    with pytest.raises(InvalidTransition):
        apply(state, AckMany((1, 2, 1)))


def test_the_square_covers_every_row_of_the_table() -> None:
    assert set(TRANSITIONS) <= set(SQUARE)


@settings(max_examples=300)
@given(state=reachable_states())
def test_reachable_states_satisfy_the_invariants(state: BrokerState) -> None:
    check_invariants(state)


# -- a plain mutable model agrees with the core --------------------------------------------


@settings(max_examples=300)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(QUEUES), st.integers(1, 3))))
def test_core_agrees_with_a_plain_fifo_model(ops: list[tuple[int, str, int]]) -> None:
    state = run(*(DeclareQueue(q) for q in QUEUES)).state
    ready: dict[str, deque[int]] = {q: deque() for q in QUEUES}
    held: dict[int, str] = {}
    dead: dict[str, list[int]] = {q: [] for q in QUEUES}
    n = 0
    for op, name, k in ops:
        if op == 0:
            n += 1
            step = apply(state, Enqueue(message(name, n), b""))
            (event,) = step.events
            assert isinstance(event, ev.Enqueued)
            ready[name].append(event.entry.seq)
        elif op == 1:
            step = apply(state, Reserve(name, "c", k))
            got = [e.seq for e in step.events[0].entries] if step.events else []  # type: ignore[union-attr]  # a Reserved event
            expected = [ready[name].popleft() for _ in range(min(k, len(ready[name])))]
            assert got == expected
            held.update(dict.fromkeys(got, name))
        elif op in (2, 3, 4) and held:
            seq = min(held)
            queue_name = held.pop(seq)
            if op == 2:
                step = apply(state, Ack(seq))
            elif op == 3:
                step = apply(state, Nack(seq, 0))
                dead[queue_name].append(seq)
            else:
                step = apply(state, Requeue(seq))
                ready[queue_name].append(seq)
        elif op == 5:
            step = apply(state, Flush(name))
            ready[name].clear()
            dead[name].clear()
        else:
            continue
        state = step.state
        for q in QUEUES:
            assert [e.seq for e in waiting(state, q)] == list(ready[q])
            assert [d.entry.seq for d in dead_letters(state, q)] == dead[q]
            assert state.queues[q].in_flight == sum(1 for v in held.values() if v == q)
