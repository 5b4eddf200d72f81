"""StubBroker: the Broker API on the in-memory interpreter of the core."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import dq
from dq import Message, MessageProxy, QueueJoinTimeout, QueueNotFound
from dq.brokers.steps import uncovered
from dq.brokers.stub import COMMANDS, StubBroker
from dq.core import InvalidTransition
from dq.middleware import Middleware


def msg(queue_name: str = "default", *args: Any) -> Message[Any]:
    return Message(queue_name, "f", args, {}, {})


def test_declare_queue_declares_the_delay_queue_and_emits_hooks() -> None:
    calls: list[tuple[str, str]] = []

    class Recorder(Middleware):
        def before_declare_queue(self, broker: dq.Broker, queue_name: str) -> None:
            calls.append(("before", queue_name))

        def after_declare_queue(self, broker: dq.Broker, queue_name: str) -> None:
            calls.append(("after", queue_name))

        def after_declare_delay_queue(self, broker: dq.Broker, queue_name: str) -> None:
            calls.append(("delay", queue_name))

    broker = StubBroker(middleware=[Recorder()])
    broker.declare_queue("q")
    broker.declare_queue("q")  # idempotent: no hooks the second time
    assert calls == [("before", "q"), ("after", "q"), ("delay", "q.DQ")]
    assert broker.get_declared_queues() == {"q", "q.DQ"}
    assert broker.get_declared_delay_queues() == {"q.DQ"}
    assert broker.queues["q"].qsize() == 0


def test_enqueue_on_an_undeclared_queue_raises_queue_not_found() -> None:
    broker = StubBroker(middleware=[])
    with pytest.raises(QueueNotFound) as info:
        broker.enqueue(msg("nope"))
    assert str(info.value) == "nope"
    with pytest.raises(QueueNotFound):
        broker.consume("nope")
    with pytest.raises(QueueNotFound):
        broker.join("nope")
    with pytest.raises(QueueNotFound):
        broker.flush("nope")


def test_enqueue_returns_the_stored_message_and_consume_delivers_it() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    sent = broker.enqueue(msg("default", 1, [2, 3]))
    assert sent.queue_name == "default" and "eta" not in sent.options
    assert broker.queues["default"].qsize() == 1
    consumer = broker.consume("default", timeout=50)
    proxy = next(consumer)
    assert isinstance(proxy, MessageProxy)
    assert proxy == sent and proxy.message_id == sent.message_id
    assert proxy.args == (1, [2, 3])  # decoded from the snapshot taken at send time
    consumer.ack(proxy)
    broker.join("default", timeout=100)


def test_the_stored_message_is_a_snapshot_of_the_arguments() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    payload = [1, 2]
    broker.enqueue(msg("default", payload))
    payload.append(3)
    proxy = next(broker.consume("default", timeout=50))
    assert proxy.args == ([1, 2],)


def test_delayed_enqueue_goes_to_the_delay_queue() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    before = int(time.time() * 1000)
    sent = broker.enqueue(msg("default"), delay=5000)
    assert sent.queue_name == "default.DQ"
    assert before + 5000 <= sent.options["eta"] <= int(time.time() * 1000) + 5000
    with pytest.raises(StopIteration):
        next(broker.consume("default", timeout=10))
    proxy = next(broker.consume("default.DQ", timeout=10))
    assert proxy.options["eta"] == sent.options["eta"]


@pytest.mark.parametrize("delay", [-1, 1.5, "10", True])
def test_a_bad_delay_is_refused(delay: Any) -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    with pytest.raises(ValueError, match="delay"):
        broker.enqueue(msg(), delay=delay)


def test_unserialisable_arguments_fail_at_send_and_store_nothing() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    with pytest.raises(TypeError):
        broker.enqueue(msg("default", object()))
    assert broker.queues["default"].qsize() == 0


def test_consumer_stops_after_its_timeout_and_can_be_iterated_again() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    consumer = broker.consume("default", timeout=20)
    start = time.monotonic()
    assert list(consumer) == []
    assert time.monotonic() - start >= 0.015
    broker.enqueue(msg("default", 1))
    assert [p.args for p in consumer] == [(1,)]


def test_consumer_honours_prefetch() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    for n in range(5):
        broker.enqueue(msg("default", n))
    consumer = broker.consume("default", prefetch=2, timeout=10)
    first, second = next(consumer), next(consumer)
    with pytest.raises(StopIteration):
        next(consumer)  # two unsettled: no third until one is settled
    consumer.ack(first)
    third = next(consumer)
    assert [m.args for m in (first, second, third)] == [(0,), (1,), (2,)]


def test_consumer_wakes_up_when_a_message_arrives() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    consumer = broker.consume("default", timeout=5000)
    threading.Timer(0.05, lambda: broker.enqueue(msg("default", 1))).start()
    start = time.monotonic()
    assert next(consumer).args == (1,)
    assert time.monotonic() - start < 2


def test_nack_dead_letters_with_the_exception() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default", 1))
    consumer = broker.consume("default", timeout=10)
    proxy = next(consumer)
    error = RuntimeError("boom")
    proxy.stuff_exception(error)
    proxy.fail()
    consumer.nack(proxy)
    assert broker.dead_letters == [proxy]
    assert broker.dead_letters_by_queue["default"][0]._exception is error
    broker.join("default", fail_fast=False)


def test_settling_twice_raises() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default"))
    consumer = broker.consume("default", timeout=10)
    proxy = next(consumer)
    consumer.ack(proxy)
    with pytest.raises(InvalidTransition):
        consumer.ack(proxy)
    with pytest.raises(ValueError, match="delivery tag"):
        consumer.ack(MessageProxy(msg()))


def test_acks_are_committed_in_groups_and_nothing_can_tell() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    for n in range(4):
        broker.enqueue(msg("default", n))
    consumer = broker.consume("default", prefetch=4, timeout=10)
    held = [next(consumer) for _ in range(4)]
    consumer.ack(held[0])
    consumer.ack(held[1])
    # Recorded, not applied yet; every read applies them first.
    assert broker._acks == [held[0]._tag, held[1]._tag]
    queue = broker.state.queues["default"]
    assert broker._acks == []
    assert queue.in_flight == 2 and queue.pending == 2
    assert set(broker.state.reserved.keys()) == {p._tag for p in held[2:]}
    # An ack of an entry acked and not applied yet is refused at once, as before.
    consumer.ack(held[2])
    with pytest.raises(InvalidTransition):
        consumer.ack(held[2])
    # Other commands see the recorded acks first: a nack after an ack.
    consumer.nack(held[3])
    assert broker.state.queues["default"].pending == 0
    assert [d.args for d in broker.dead_letters] == [(3,)]
    broker.join("default", timeout=1000, fail_fast=False)


def test_the_ack_that_drains_a_joined_queue_wakes_the_join() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    for n in range(3):
        broker.enqueue(msg("default", n))
    consumer = broker.consume("default", prefetch=3, timeout=10)
    held = [next(consumer) for _ in range(3)]
    consumer.ack(held[0])

    def ack_the_rest() -> None:
        for proxy in held[1:]:
            consumer.ack(proxy)

    threading.Timer(0.05, ack_the_rest).start()
    started = time.monotonic()
    broker.join("default", timeout=5000)
    assert time.monotonic() - started < 2
    assert broker.state.queues["default"].pending == 0


def test_closing_a_consumer_applies_its_acks_first() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    for n in range(2):
        broker.enqueue(msg("default", n))
    consumer = broker.consume("default", prefetch=2, timeout=10)
    first, _ = next(consumer), next(consumer)
    consumer.ack(first)
    consumer.close()
    assert [p.args for p in broker.consume("default", timeout=10)] == [(1,)]


def test_requeue_returns_messages_to_the_tail() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    for n in range(3):
        broker.enqueue(msg("default", n))
    consumer = broker.consume("default", prefetch=3, timeout=10)
    held = [next(consumer) for _ in range(2)]
    consumer.requeue(held)
    assert [p.args for p in consumer] == [(2,), (0,), (1,)]


def test_closing_a_consumer_returns_what_it_held() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default", 1))
    consumer = broker.consume("default", timeout=10)
    next(consumer)
    consumer.close()
    with pytest.raises(StopIteration):
        next(consumer)
    assert next(broker.consume("default", timeout=10)).args == (1,)


def test_join_waits_for_unfinished_messages_and_times_out() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default"))
    with pytest.raises(QueueJoinTimeout):
        broker.join("default", timeout=30)
    consumer = broker.consume("default", timeout=10)
    proxy = next(consumer)
    with pytest.raises(QueueJoinTimeout):
        broker.join("default", timeout=30)  # reserved is still unfinished
    threading.Timer(0.05, lambda: consumer.ack(proxy)).start()
    broker.join("default", timeout=5000)


def test_join_counts_the_delay_queue_too() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default"), delay=10)
    with pytest.raises(QueueJoinTimeout):
        broker.join("default", timeout=20)


def _dead_letter(broker: StubBroker, exception: BaseException | None) -> None:
    consumer = broker.consume("default", timeout=1000)
    proxy = next(consumer)
    if exception is not None:
        proxy.stuff_exception(exception)
    consumer.nack(proxy)


def test_join_fails_fast_with_the_exception_of_a_dead_letter_once() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default"))
    threading.Timer(0.02, _dead_letter, (broker, KeyError("lost"))).start()
    with pytest.raises(KeyError, match="lost"):
        broker.join("default", timeout=5000)
    # An earlier join raised it already: a later join does not raise it again.
    broker.join("default", timeout=100)


def test_join_raises_a_dead_letter_made_before_it_started() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default"))
    _dead_letter(broker, KeyError("early"))
    with pytest.raises(KeyError, match="early"):
        broker.join("default", timeout=100)


def test_join_fail_fast_with_no_stored_exception_raises_a_generic_one() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    broker.enqueue(msg("default"))
    threading.Timer(0.02, _dead_letter, (broker, None)).start()
    with pytest.raises(Exception, match="unknown error"):
        broker.join("default", timeout=5000)


@pytest.mark.parametrize("broker_default", [True, False])
def test_fail_fast_false_and_the_broker_default(broker_default: bool) -> None:
    broker = StubBroker(middleware=[], fail_fast_default=broker_default)
    broker.declare_queue("default")
    broker.enqueue(msg("default"))
    threading.Timer(0.02, _dead_letter, (broker, KeyError("x"))).start()
    if broker_default:
        broker.join("default", timeout=5000, fail_fast=False)
    else:
        broker.join("default", timeout=5000)  # the default is not to fail fast
    assert len(broker.dead_letters) == 1


def test_flush_and_flush_all() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("a")
    broker.declare_queue("b")
    broker.enqueue(msg("a"))
    broker.enqueue(msg("a"), delay=100)
    broker.enqueue(msg("b"))
    broker.flush("a")
    assert broker.queues["a"].qsize() == broker.queues["a.DQ"].qsize() == 0
    assert broker.queues["b"].qsize() == 1
    broker.enqueue(msg("a"))
    consumer = broker.consume("a", timeout=10)
    consumer.nack(next(consumer))
    assert broker.dead_letters
    dead = broker.dead_letters_by_queue["a"]
    broker.flush_all()
    assert broker.queues["b"].qsize() == 0
    assert dead == [] and broker.dead_letters == []


def test_enqueue_hooks_see_the_stored_message_and_delay() -> None:
    seen: list[tuple[str, str, int | None]] = []

    class Recorder(Middleware):
        def before_enqueue(
            self, broker: dq.Broker, message: Message[Any], delay: int | None
        ) -> None:
            seen.append(("before", message.queue_name, delay))

        def after_enqueue(
            self, broker: dq.Broker, message: Message[Any], delay: int | None
        ) -> None:
            seen.append(("after", message.queue_name, delay))

    broker = StubBroker(middleware=[Recorder()])
    broker.declare_queue("default")
    broker.enqueue(msg("default"))
    broker.enqueue(msg("default"), delay=10)
    assert seen == [
        ("before", "default", None),
        ("after", "default", None),
        ("before", "default.DQ", 10),
        ("after", "default.DQ", 10),
    ]


def test_state_is_one_immutable_value() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    before = broker.state
    broker.enqueue(msg("default"))
    assert broker.state is not before
    assert before.queues["default"].pending == 0
    assert broker.state.queues["default"].pending == 1


def test_many_threads_each_message_delivered_exactly_once() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("default")
    total = 2000
    for n in range(total):
        broker.enqueue(msg("default", n))
    seen: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        consumer = broker.consume("default", prefetch=4, timeout=50)
        for proxy in consumer:
            with lock:
                seen.append(proxy.args[0])
            consumer.ack(proxy)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(total))
    broker.join("default", timeout=1000)


# -- issue 16: every core command, crashes, names and etas ---------------------------------


class _DeclareRecorder(Middleware):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def before_declare_queue(self, broker: dq.Broker, queue_name: str) -> None:
        self.calls.append(("before", queue_name))

    def after_declare_queue(self, broker: dq.Broker, queue_name: str) -> None:
        self.calls.append(("after", queue_name))


def test_the_command_table_covers_every_core_command() -> None:
    assert uncovered(COMMANDS) == ()


def test_declaring_through_the_delay_queue_gives_the_hooks_the_canonical_name() -> None:
    recorder = _DeclareRecorder()
    broker = StubBroker(middleware=[recorder])
    broker.declare_queue("q.DQ")
    assert recorder.calls == [("before", "q"), ("after", "q")]


def test_declaring_a_dead_letter_queue_raises_even_when_its_queue_is_declared() -> None:
    recorder = _DeclareRecorder()
    broker = StubBroker(middleware=[recorder])
    with pytest.raises(QueueNotFound):
        broker.declare_queue("q.XQ")
    broker.declare_queue("q")
    with pytest.raises(QueueNotFound):
        broker.declare_queue("q.XQ")
    assert recorder.calls == [("before", "q"), ("after", "q")]  # none for q.XQ


@pytest.mark.parametrize("name", ["__heartbeats__", "q.msgs", "__dq__.deliveries.q", "q.DQ.DQ"])
def test_names_of_broker_keys_are_refused_before_any_hook(name: str) -> None:
    seen: list[Message[Any]] = []

    class Hook(Middleware):
        def before_enqueue(self, broker: dq.Broker, message: Any, delay: Any) -> None:
            seen.append(message)

    broker = StubBroker(middleware=[Hook()])
    with pytest.raises(ValueError, match="invalid queue name"):
        broker.enqueue(msg(name))
    with pytest.raises(ValueError, match="invalid queue name"):
        broker.declare_queue(name)
    with pytest.raises(QueueNotFound):
        broker.enqueue(msg("q.XQ"))
    assert seen == []


@pytest.mark.parametrize("eta", [float("nan"), float("inf"), -1, "soon", 10**20])
def test_a_bad_eta_is_refused_with_the_message_named(eta: Any) -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("q")
    bad = Message("q.DQ", "f", (), {}, {"eta": eta})
    with pytest.raises(ValueError, match=bad.message_id):
        broker.enqueue(bad)
    assert len(broker.state.queues["q"].delayed) == 0


def test_a_delay_past_the_year_9999_is_refused() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("q")
    with pytest.raises(ValueError, match="too long"):
        broker.enqueue(msg("q"), delay=10**20)


def test_replace_stores_the_retry_and_forgets_the_original_in_one_step() -> None:
    events: list[str] = []

    class Hook(Middleware):
        def before_enqueue(self, broker: dq.Broker, message: Any, delay: Any) -> None:
            events.append(f"before {message.queue_name} {delay}")

        def after_enqueue(self, broker: dq.Broker, message: Any, delay: Any) -> None:
            events.append(f"after {message.queue_name} {delay}")

    broker = StubBroker(middleware=[Hook()])
    broker.declare_queue("q")
    broker.enqueue(msg("q", 1))
    consumer = broker.consume("q", timeout=0)
    proxy = next(consumer)
    retry = proxy.message.copy(options={"retries": 1})
    stored = consumer.replace(proxy, retry, 1000)  # type: ignore[attr-defined]
    assert stored.queue_name == "q.DQ" and stored.options["retries"] == 1
    assert events == ["before q None", "after q None", "before q.DQ 1000", "after q.DQ 1000"]
    queue = broker.state.queues["q"]
    assert (len(queue.ready), len(queue.delayed), queue.in_flight) == (0, 1, 0)
    with pytest.raises(InvalidTransition):
        consumer.ack(proxy)  # the original is gone


def test_nack_keeps_the_death_reason() -> None:
    from dq.core import DeathReason

    broker = StubBroker(middleware=[])
    broker.declare_queue("q")
    broker.enqueue(msg("q"))
    consumer = broker.consume("q", timeout=0)
    proxy = next(consumer)
    proxy.death_reason = DeathReason.BAD_OPTIONS
    consumer.nack(proxy)
    (dead,) = broker.state.queues["q"].dead
    assert dead.reason is DeathReason.BAD_OPTIONS


def test_an_undecodable_payload_is_dead_lettered_as_undecodable() -> None:
    from dq.core import DeathReason, Enqueue

    broker = StubBroker(middleware=[])
    broker.declare_queue("q")
    broker._apply(Enqueue(msg("q"), b"not json"))
    broker.enqueue(msg("q", 2))
    consumer = broker.consume("q", timeout=0)
    assert next(consumer).args == (2,)
    (dead,) = broker.state.queues["q"].dead
    assert dead.reason is DeathReason.UNDECODABLE


def test_an_abandoned_consumer_holds_its_messages_until_recovered() -> None:
    broker = StubBroker(middleware=[])
    broker.declare_queue("q")
    for i in range(3):
        broker.enqueue(msg("q", i))
    consumer = broker.consume("q", prefetch=2, timeout=0)
    first = next(consumer)
    assert not consumer.suspect(first)
    dead_id = broker.abandon(consumer)
    with pytest.raises(RuntimeError, match="abandoned"):
        consumer.ack(first)
    other = broker.consume("q", prefetch=5, timeout=0)
    assert [m.args for m in other] == [(2,)]  # the dead one still holds 0 and 1
    with pytest.raises(QueueJoinTimeout):
        broker.join("q", timeout=1)
    assert broker.recover() == 2
    assert broker.recover(dead_id) == 0  # nothing left to give back
    back = [next(other), next(other)]
    assert sorted(m.args for m in back) == [(0,), (1,)]
    assert all(other.suspect(m) for m in back)  # its consumer died holding each


def test_max_deliveries_dead_letters_the_poison_message_and_spares_bystanders() -> None:
    from dq.core import DeathReason

    broker = StubBroker(middleware=[], max_deliveries=2)
    broker.declare_queue("q")
    poison = broker.enqueue(msg("q", "poison"))
    broker.enqueue(msg("q", "bystander"))
    for _ in range(3):
        consumer = broker.consume("q", prefetch=2, timeout=0)
        held = {m.args[0]: m for m in consumer}
        if "poison" in held:
            consumer.started(held["poison"], alone=consumer.suspect(held["poison"]))
        broker.abandon(consumer)
        broker.recover()
    (dead,) = broker.state.queues["q"].dead
    assert dead.entry.message_id == poison.message_id
    assert dead.reason is DeathReason.MAX_DELIVERIES
    assert [m.message_id for m in broker.dead_letters_by_queue["q"]] == [poison.message_id]
    assert [m.args for m in broker.consume("q", timeout=0)] == [("bystander",)]


def test_max_deliveries_is_zero_or_at_least_two() -> None:
    with pytest.raises(ValueError, match="max_deliveries"):
        StubBroker(max_deliveries=1)
    assert StubBroker(max_deliveries=0).max_deliveries == 0
