"""RabbitmqBroker on the real RabbitMQ (its conformance run is in
test_conformance_rabbitmq.py): the constructor, queue
arguments shared with Dramatiq, confirms, a Worker, lost settlements and long delays."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dq
from dq import Message, Worker, runtime
from dq.broker import MessageProxy
from dq.brokers import from_url
from dq.brokers.rabbitmq import (
    MessageUnroutable,
    RabbitmqBroker,
    RabbitmqMessage,
)
from dq.brokers.rabbitmq._pika import ReadingConnection, connection_of
from dq.brokers.rabbitmq.consumer import RabbitmqConsumer
from dq.core import policy
from dq.errors import BrokerError, ConnectionClosed, QueueJoinTimeout, QueueNotFound
from dq.middleware import Retries
from tests.support.rabbitmq_helpers import (
    RABBITMQ_URL,
    BrokerFactory,
    broker_factory,
    close_server_side,
    confirm_modes,
    delete_queues,
    new_prefix,
    prefix,
    queue_exists,
    read_queue,
    wait_for_counts,
)

pytestmark = [pytest.mark.rabbitmq]

__all__ = ["broker_factory", "prefix"]  # fixtures

# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> RabbitmqBroker:
    b = broker_factory(confirm_delivery=True)
    b.join_min_successes = 1
    dq.set_broker(b)
    return b


def _counts(broker: RabbitmqBroker, queue_name: str) -> tuple[int, int, int]:
    return broker.get_queue_message_counts(queue_name)


# -- construction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_priority": 0}, ValueError, "max_priority must be a value between 0 and 255"),
        ({"max_priority": 256}, ValueError, "max_priority must be a value between 0 and 255"),
        ({"consumer_timeout": 1}, ValueError, "consumer_timeout must be an integer >= 2"),
        ({"hots": "x"}, TypeError, r"unexpected keyword argument\(s\) \['hots'\]"),
        (
            {"url": RABBITMQ_URL, "parameters": [{"host": "127.0.0.1"}]},
            RuntimeError,
            "takes 'url' or 'parameters', not both",
        ),
        (
            {"parameters": [{"host": "127.0.0.1"}], "port": 5672},
            RuntimeError,
            r"'parameters' or connection keywords, not both \(got \['port'\]\)",
        ),
        ({"url": [RABBITMQ_URL, 5]}, TypeError, "url must be a string or a list of strings"),
        ({"url": " ; "}, ValueError, "url names no address"),
    ],
)
def test_bad_arguments_are_refused_naming_them(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RabbitmqBroker(**kwargs)


def test_defaults_are_dramatiqs_address_and_keywords_refine_every_url() -> None:
    (default,) = RabbitmqBroker().parameters
    assert (default.host, default.port) == ("127.0.0.1", 5672)
    b = RabbitmqBroker(url="amqp://u:p@h1:5673/v;amqp://h2", connection_attempts=5, retry_delay=2.0)
    assert [(p.host, p.port, p.connection_attempts, p.retry_delay) for p in b.parameters] == [
        ("h1", 5673, 5, 2.0),
        ("h2", 5672, 5, 2.0),
    ]
    assert b.parameters[0].virtual_host == "v"
    with pytest.raises(TypeError):  # pika checks each value
        RabbitmqBroker(url=RABBITMQ_URL, connection_attempts="five")
    (from_dicts,) = RabbitmqBroker(parameters=[{"host": "h3", "port": 1}]).parameters
    assert (from_dicts.host, from_dicts.port) == ("h3", 1)


@pytest.mark.parametrize("as_list", [True, False])
def test_fail_over_reaches_the_live_server_after_a_dead_address(
    broker_factory: BrokerFactory, prefix: str, as_list: bool
) -> None:
    dead = "amqp://guest:guest@127.0.0.1:1/%2F"
    urls = [dead, RABBITMQ_URL]
    b = broker_factory(url=urls if as_list else ";".join(urls))
    b.declare_queue(prefix)
    b.enqueue(Message(prefix, "f", (), {}, {}))
    wait_for_counts(b, prefix, (1, 0, 0))


def test_an_unreachable_server_raises_connection_closed_after_bounded_attempts() -> None:
    b = RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:1/%2F", connection_attempts=1)
    with pytest.raises(ConnectionClosed) as caught:
        b.enqueue(Message("nowhere", "f", (), {}, {}))
    # Both dq's and pika's: code written for either catches it.
    assert isinstance(caught.value, pika.exceptions.AMQPConnectionError)
    with pytest.raises(ConnectionClosed):
        b.consume("nowhere")


def test_from_url_makes_a_rabbitmq_broker(broker_factory: BrokerFactory, prefix: str) -> None:
    b = from_url(RABBITMQ_URL, middleware=[])
    assert isinstance(b, RabbitmqBroker)
    broker_factory.brokers.append(b)
    assert [(p.host, p.port) for p in b.parameters] == [("127.0.0.1", 5672)]
    b.declare_queue(prefix, ensure=True)
    assert queue_exists(f"{prefix}.XQ")


# -- the wire ----------------------------------------------------------------------------------


def _declare_with_dramatiq(queue_name: str, **kwargs: Any) -> None:
    import dramatiq.brokers.rabbitmq  # interop tests only

    other = dramatiq.brokers.rabbitmq.RabbitmqBroker(url=RABBITMQ_URL, middleware=[], **kwargs)
    try:
        other.declare_queue(queue_name, ensure=True)
    finally:
        other.close()


@pytest.mark.parametrize("max_priority", [None, 10])
def test_queues_are_declared_with_dramatiqs_arguments_both_ways(
    broker_factory: BrokerFactory, prefix: str, max_priority: int | None
) -> None:
    first, second = f"{prefix}_dq_first", f"{prefix}_dramatiq_first"
    broker_factory.extra |= {first, second}
    b = broker_factory(max_priority=max_priority)
    b.declare_queue(first, ensure=True)
    _declare_with_dramatiq(first, max_priority=max_priority)  # a 406 would raise
    _declare_with_dramatiq(second, max_priority=max_priority)
    b.declare_queue(second, ensure=True)
    assert _counts(b, second) == (0, 0, 0)
    # A fleet that disagrees is refused by the server: the check above can fail.
    odd = broker_factory(max_priority=(max_priority or 0) + 1)
    with pytest.raises(ConnectionClosed, match="PRECONDITION_FAILED"):
        odd.declare_queue(first, ensure=True)


def test_messages_are_published_as_dramatiq_publishes_them(
    broker_factory: BrokerFactory, prefix: str
) -> None:
    b = broker_factory(max_priority=10, confirm_delivery=True)
    plain = b.enqueue(Message(prefix, "f", (1,), {}, {}))
    urgent = b.enqueue(Message(prefix, "f", (2,), {}, {"broker_priority": 7}))
    delayed = b.enqueue(Message(prefix, "f", (3,), {}, {}), delay=60_000)
    ready = read_queue(prefix)
    assert [body for body, _ in ready] == [urgent.encode(), plain.encode()]  # by priority
    (_, props), _ = ready
    assert (props.delivery_mode, props.priority, props.content_type, props.headers) == (
        2,
        7,
        None,
        None,
    )
    assert ready[1][1].priority is None
    assert delayed.queue_name == f"{prefix}.DQ" and "eta" in delayed.options
    assert [body for body, _ in read_queue(f"{prefix}.DQ")] == [delayed.encode()]


# -- confirms ------------------------------------------------------------------------------------


def test_a_confirmed_publish_to_a_deleted_queue_raises_and_the_next_one_redeclares(
    broker: RabbitmqBroker, prefix: str
) -> None:
    broker.enqueue(Message(prefix, "f", (), {}, {}))
    delete_queues([prefix])  # under the broker's feet: it cached the declaration
    lost = Message(prefix, "f", ("lost",), {}, {})
    with pytest.raises(MessageUnroutable) as caught:
        broker.enqueue(lost)
    assert isinstance(caught.value, BrokerError)
    assert caught.value.message_ids == (lost.message_id,)
    assert caught.value.queue_names == (prefix,)
    broker.enqueue(lost)  # declared again
    assert _counts(broker, prefix) == (1, 0, 0)


def test_enqueue_many_with_confirms_stores_the_whole_batch_in_order(
    broker: RabbitmqBroker, prefix: str
) -> None:
    other = f"{prefix}_other"
    messages = [Message(prefix if i % 3 else other, "f", (i,), {}, {}) for i in range(600)]
    stored = broker.enqueue_many(messages, delay=None)
    assert stored == messages
    assert _counts(broker, prefix) == (400, 0, 0)
    assert _counts(broker, other) == (200, 0, 0)
    assert [Message.decode(b).args for b, _ in read_queue(other)] == [
        (i,) for i in range(0, 600, 3)
    ]
    delayed = broker.enqueue_many(messages[:10], delay=50_000)
    assert all(m.queue_name.endswith(".DQ") for m in delayed)
    assert _counts(broker, prefix)[1] + _counts(broker, other)[1] == 10
    assert broker.enqueue_many([]) == []


def test_enqueue_many_without_confirms_publishes_too(
    broker_factory: BrokerFactory, prefix: str
) -> None:
    b = broker_factory()
    b.enqueue_many([Message(prefix, "f", (i,), {}, {}) for i in range(50)])
    wait_for_counts(b, prefix, (50, 0, 0))


@pytest.mark.parametrize("confirm_delivery", [False, True])
def test_the_publishing_channel_is_in_confirm_mode_only_with_confirm_delivery(
    broker_factory: BrokerFactory, prefix: str, confirm_delivery: bool
) -> None:
    # As Dramatiq's: confirm mode makes the server track and confirm every publish,
    # which delays deliveries (docs/rabbitmq.md); without it nothing waits for them.
    b = broker_factory(confirm_delivery=confirm_delivery)
    b.enqueue(Message(prefix, "f", (), {}, {}))
    assert confirm_modes(b.connection) == [confirm_delivery]
    wait_for_counts(b, prefix, (1, 0, 0))
    b.flush(prefix)  # a purge comes after the publishes of its channel
    assert _counts(b, prefix) == (0, 0, 0)


# -- consuming -------------------------------------------------------------------------------------


def test_settling_requeue_promote_and_nack_keep_each_message_once(
    broker_factory: BrokerFactory, prefix: str
) -> None:
    # Exact reservations: the promoted message stays on the queue (a subscribed
    # consumer with room would be sent it at once).
    broker = broker_factory(confirm_delivery=True, exact_reservations=True)
    broker.join_min_successes = 1
    broker.declare_queue(prefix)
    first = broker.enqueue(Message(prefix, "f", (1,), {}, {}))
    second = broker.enqueue(Message(prefix, "f", (2,), {}, {}))
    consumer = broker.consume(prefix, prefetch=2, timeout=50)
    got = next(consumer)
    assert isinstance(got, RabbitmqMessage) and got.redelivered is False
    assert got.message_id == first.message_id
    consumer.requeue([got])  # to the tail, confirmed, then acked
    assert next(consumer).message_id == second.message_id
    again = next(consumer)
    assert again.message_id == first.message_id
    consumer.nack(again)
    assert [Message.decode(b).message_id for b, _ in read_queue(f"{prefix}.XQ")] == [
        first.message_id
    ]
    delayed = broker.enqueue(Message(prefix, "f", (3,), {}, {}), delay=10)
    delay_consumer = broker.consume(f"{prefix}.DQ", prefetch=1, timeout=50)
    assert isinstance(delay_consumer, RabbitmqConsumer)
    held = next(delay_consumer)
    promoted = delay_consumer.promote(held)
    assert promoted == policy.promoted(delayed)
    assert _counts(broker, prefix) == (1, 0, 1)
    assert broker.unsettled(prefix) == 1  # `second`, still handed out
    consumer.close()  # returns `second`
    delay_consumer.close()
    assert _counts(broker, prefix) == (2, 0, 1)
    broker.flush(prefix)
    assert _counts(broker, prefix) == (0, 0, 0)


def test_undecodable_payloads_are_dead_lettered_naming_the_delivery(
    broker: RabbitmqBroker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker.declare_queue(prefix, ensure=True)
    broker.channel.basic_publish("", prefix, b"not json")
    good = broker.enqueue(Message(prefix, "f", (), {}, {}))
    consumer = broker.consume(prefix, prefetch=2, timeout=100)
    with caplog.at_level(logging.ERROR, logger="dq"):
        assert next(consumer).message_id == good.message_id
    assert f"Dead-lettering undecodable delivery 1 on '{prefix}'" in caplog.text
    consumer.close()
    assert [body for body, _ in read_queue(f"{prefix}.XQ")] == [b"not json"]


def test_deliveries_are_read_whole_whatever_their_size(broker: RabbitmqBroker, prefix: str) -> None:
    # Bodies of no frame, of one, and of several (frame_max is 128 KiB) take the
    # consumer's own reader, or pika's for what arrives in pieces: each arrives intact,
    # with its properties, in order.
    broker.declare_queue(prefix, ensure=True)
    broker.channel.basic_publish("", prefix, b"")
    sizes = [0, 10, 200_000, 1, 600_000, 5]
    sent = [broker.enqueue(Message(prefix, "f", ("x" * n,), {}, {})) for n in sizes]
    urgent = broker.enqueue(Message(prefix, "f", (), {}, {"broker_priority": 3}))
    consumer = broker.consume(prefix, prefetch=10, timeout=1000)
    got = [next(consumer) for _ in range(len(sent) + 1)]
    assert [m.message_id for m in got] == [m.message_id for m in [*sent, urgent]]
    assert [m.args for m in got[: len(sent)]] == [m.args for m in sent]
    assert isinstance(consumer, RabbitmqConsumer)
    bodies = consumer._bodies
    assert bodies[got[-1]._tag.tag].properties.priority == 3  # type: ignore[attr-defined]
    assert bodies[got[0]._tag.tag].properties.delivery_mode == 2  # type: ignore[attr-defined]
    assert reader_of(consumer).fast_reads >= 3
    for message in got:
        consumer.ack(message)
    consumer.close()
    assert [body for body, _ in read_queue(f"{prefix}.XQ")] == [b""]  # undecodable


def reader_of(consumer: RabbitmqConsumer) -> ReadingConnection:
    reader = connection_of(consumer.connection)
    assert isinstance(reader, ReadingConnection)
    return reader


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 100, 5000, 140_000, 300_000]), min_size=1, max_size=6),
    st.lists(st.integers(1, 700_000), max_size=8),
    st.sampled_from(["none", "between", "inside"]),
)
def test_the_consumer_reads_deliveries_across_any_read_boundaries(
    sizes: list[int], cuts: list[int], heartbeats: str
) -> None:
    # Deliveries (some too big to hold back, which pika may assemble), with heartbeats
    # between them or inside them (after the content header), cut into arbitrary
    # reads: each reaches its consumer's callback once, whole, in order, and pika's
    # reader is never left holding part of a frame.
    broker = RabbitmqBroker(url=RABBITMQ_URL, middleware=[])
    queue = new_prefix("reads")
    try:
        consumer = broker.consume(queue, prefetch=1, timeout=10)
        assert isinstance(consumer, RabbitmqConsumer)
        impl = consumer._async_channel
        reader = reader_of(consumer)
        number = impl.channel_number
        got: list[tuple[int, bytes]] = []
        impl.consumers["test-tag"] = lambda _c, m, _p, body: got.append((m.delivery_tag, body))
        frames: list[Any] = []
        for i, size in enumerate(sizes, 1):
            body = bytes([i]) * size
            frames.append(
                pika.frame.Method(number, pika.spec.Basic.Deliver("test-tag", i, False, "", queue))
            )
            frames.append(pika.frame.Header(number, size, pika.spec.BasicProperties()))
            if heartbeats == "inside":
                frames.append(pika.frame.Heartbeat())
            frame_max = 131_072 - 8
            frames += [
                pika.frame.Body(number, body[k : k + frame_max]) for k in range(0, size, frame_max)
            ]
            if heartbeats == "between":
                frames.append(pika.frame.Heartbeat())
        data = b"".join(f.marshal() for f in frames)
        bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
        before = reader.bytes_received
        for start, stop in itertools.pairwise(bounds):
            reader._on_data_available(data[start:stop])
        assert got == [(i, bytes([i]) * size) for i, size in enumerate(sizes, 1)]
        assert reader.bytes_received - before == len(data)
        # Deliveries under the hold-back size are all decoded by the consumer itself.
        small = sum(1 for size in sizes if size <= 140_000) if heartbeats != "inside" else 0
        assert small <= reader.fast_reads <= len(sizes)
        assert not getattr(reader, "_frame_buffer") and not reader.partial  # noqa: B009
        del impl.consumers["test-tag"]
        consumer.close()
    finally:
        broker.close()
        delete_queues([queue])


def test_join_counts_held_messages_and_times_out(broker: RabbitmqBroker, prefix: str) -> None:
    broker.declare_queue(prefix)
    broker.enqueue(Message(prefix, "f", (), {}, {}))
    with pytest.raises(QueueJoinTimeout):
        broker.join(prefix, timeout=50)
    consumer = broker.consume(prefix, prefetch=1, timeout=50)
    message = next(consumer)
    assert _counts(broker, prefix) == (0, 0, 0)
    with pytest.raises(QueueJoinTimeout):  # handed out, not acked yet
        broker.join(prefix, timeout=50)
    consumer.ack(message)
    broker.join(prefix, min_successes=3, idle_time=5, timeout=2000)
    consumer.close()


def test_consume_refuses_dead_letter_queues_and_bad_arguments(broker: RabbitmqBroker) -> None:
    with pytest.raises(QueueNotFound):
        broker.consume("q.XQ")
    with pytest.raises(ValueError, match="prefetch must be an integer >= 1"):
        broker.consume("q", prefetch=0)


def test_each_thread_publishes_on_its_own_connection_until_close(
    broker: RabbitmqBroker, prefix: str
) -> None:
    mine = broker.connection
    assert broker.connection is mine and broker.channel is broker.channel
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(broker.connection))
    thread.start()
    thread.join()
    assert seen[0] is not mine
    assert set(broker.publishers) == {threading.get_ident(), thread.ident}
    mine.close()  # broken under the broker: replaced at the next use
    broker.enqueue(Message(prefix, "f", (), {}, {}))
    assert broker.connection is not mine and broker.connection.is_open
    assert thread.ident not in broker.publishers  # a dead thread's publisher was closed
    assert not seen[0].is_open
    last = broker.connection
    broker.close()
    assert broker.publishers == {} and not last.is_open


# -- lost settlements -------------------------------------------------------------------------


def test_an_ack_after_the_server_closed_the_channel_is_logged_counted_and_redelivered(
    broker: RabbitmqBroker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker.declare_queue(prefix)
    sent = broker.enqueue(Message(prefix, "f", (), {}, {}))
    consumer = broker.consume(prefix, prefetch=1, timeout=50)
    assert isinstance(consumer, RabbitmqConsumer)
    message = next(consumer)
    close_server_side(consumer.connection)
    with pytest.raises(ConnectionClosed):  # the consumer notices (within 100 timeouts)
        for _ in range(100):
            next(consumer, None)
    with caplog.at_level(logging.WARNING, logger="dq"):
        consumer.ack(message)  # not raised
        consumer.nack(message)
    lost = [r for r in caplog.records if "its channel is closed" in r.getMessage()]
    assert len(lost) == 2 and {r.levelno for r in lost} == {logging.WARNING}
    assert broker.lost_settlements == 2
    consumer.close()
    again = broker.consume(prefix, prefetch=1, timeout=1000)
    redelivered = next(again)
    assert redelivered.message_id == sent.message_id
    assert isinstance(redelivered, RabbitmqMessage) and redelivered.redelivered
    again.ack(redelivered)
    again.close()
    assert _counts(broker, prefix) == (0, 0, 0)


def test_acks_from_worker_threads_reach_a_waiting_consumer(
    broker: RabbitmqBroker, prefix: str
) -> None:
    broker.declare_queue(prefix)
    broker.enqueue_many([Message(prefix, "f", (i,), {}, {}) for i in range(64)])
    consumer = broker.consume(prefix, prefetch=64, timeout=200)
    delivered = [next(consumer) for _ in range(64)]
    threads = [
        threading.Thread(target=lambda ms=delivered[i::8]: [consumer.ack(m) for m in ms])
        for i in range(8)
    ]
    waiting = threading.Thread(target=lambda: next(consumer, None))  # holds the connection
    waiting.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    waiting.join()
    consumer.close()
    assert _counts(broker, prefix) == (0, 0, 0)
    assert broker.lost_settlements == 0


# -- the worker --------------------------------------------------------------------------------


def test_a_worker_drains_retries_and_dead_letters(broker: RabbitmqBroker, prefix: str) -> None:
    attempts: dict[int, int] = {}
    lock = threading.Lock()
    assert any(isinstance(m, Retries) for m in broker.middleware)

    @dq.actor(queue_name=prefix, max_retries=1, min_backoff=20, max_backoff=40, broker=broker)
    def job(n: int) -> None:
        with lock:
            attempts[n] = attempts.get(n, 0) + 1
            count = attempts[n]
        if n == 1 and count == 1:
            raise ValueError("fails once")
        if n == 2:
            raise ValueError("always fails")

    job.send_many([job.message(n) for n in range(200)])
    job.send_with_options(args=(999,), delay=100)
    worker = Worker(broker, worker_threads=8, worker_timeout=50)
    worker.start()
    try:
        broker.join(prefix, min_successes=5, idle_time=20, timeout=20_000)
    finally:
        worker.stop()
    assert attempts == {n: 2 if n in (1, 2) else 1 for n in [*range(200), 999]}
    (dead,) = read_queue(f"{prefix}.XQ")
    assert Message.decode(dead[0]).args == (2,)
    assert _counts(broker, prefix) == (0, 0, 1)
    assert broker.lost_settlements == 0


def test_priorities_order_messages_on_the_server(
    broker_factory: BrokerFactory, prefix: str
) -> None:
    b = broker_factory(max_priority=10)
    for i in range(6):
        b.enqueue(Message(prefix, "f", (i,), {}, {"broker_priority": 9 if i % 2 else 0}))
    consumer = b.consume(prefix, prefetch=6, timeout=50)
    order = [next(consumer).args[0] for _ in range(6)]
    assert order == [1, 3, 5, 0, 2, 4]
    consumer.close()


# -- long delays -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_long_delay_is_re_leased_before_the_consumer_timeout_and_runs_once(
    broker_factory: BrokerFactory, prefix: str
) -> None:
    b = broker_factory(consumer_timeout=1000, confirm_delivery=True)  # a lease of 500 ms
    b.join_min_successes = 3
    runs: list[int] = []

    @dq.actor(queue_name=prefix, broker=b)
    def later() -> None:
        runs.append(runtime.get_clock().now_ms())

    sent = later.send_with_options(delay=3000)
    worker = Worker(b, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        b.join(prefix, idle_time=50, timeout=10_000)
        while not runs:  # the join may see the promoted copy before it runs
            time.sleep(0.01)
    finally:
        worker.stop()
    assert len(runs) == 1 and runs[0] >= sent.options["eta"]
    assert b.re_leased >= 4  # about every 500 ms for 3 s
    assert _counts(b, prefix) == (0, 0, 0)
    assert b.unsettled(prefix) == 0


def test_a_delivery_due_within_the_lease_is_handed_out_at_once(
    broker_factory: BrokerFactory, prefix: str
) -> None:
    b = broker_factory(consumer_timeout=10_000)
    b.declare_queue(prefix)
    near = b.enqueue(Message(prefix, "f", (), {}, {}), delay=4000)
    far = b.enqueue(Message(prefix, "f", (), {}, {}), delay=60_000)
    consumer = b.consume(f"{prefix}.DQ", prefetch=10, timeout=100)
    assert next(consumer).message_id == near.message_id
    with pytest.raises(StopIteration):  # `far` is parked, not handed out
        next(consumer)
    assert b.unsettled(prefix) == 2
    consumer.close()  # returns both
    assert sorted(
        Message.decode(body).message_id for body, _ in read_queue(f"{prefix}.DQ")
    ) == sorted([near.message_id, far.message_id])


def test_a_consumer_of_a_deleted_queue_fails_and_the_next_one_declares_it_again(
    broker: RabbitmqBroker, prefix: str
) -> None:
    broker.declare_queue(prefix)
    consumer = broker.consume(prefix, prefetch=1, timeout=10)
    delete_queues([prefix])
    with pytest.raises(ConnectionClosed, match="NOT_FOUND"):
        next(consumer)
    consumer.close()
    again = broker.consume(prefix, prefetch=1, timeout=10)
    broker.enqueue(Message(prefix, "f", (), {}, {}))
    assert next(again).queue_name == prefix
    again.close()


def test_a_consumer_holding_most_of_its_prefetch_reads_what_the_server_sends(
    broker: RabbitmqBroker, prefix: str
) -> None:
    # Three of four held (less than half free) and no ack to come: the fourth is
    # read when it arrives, not when the 30 s timeout is over (nor lost to it).
    broker.declare_queue(prefix, ensure=True)
    consumer = broker.consume(prefix, prefetch=4, timeout=30_000)
    held = []
    for i in range(3):
        broker.enqueue(Message(prefix, "f", (i,), {}, {}))
        held.append(next(consumer))
    late = threading.Timer(0.05, lambda: broker.enqueue(Message(prefix, "f", (3,), {}, {})))
    late.start()
    start = time.monotonic()
    fourth = next(consumer)
    assert fourth.args == (3,) and time.monotonic() - start < 10
    late.join()
    for message in [*held, fourth]:
        consumer.ack(message)
    consumer.close()


def test_a_waiting_consumer_takes_what_arrives_and_never_more_than_its_prefetch(
    broker: RabbitmqBroker, prefix: str
) -> None:
    broker.declare_queue(prefix, ensure=True)
    consumer = broker.consume(prefix, prefetch=4, timeout=10_000)
    first: list[MessageProxy] = []
    waiting = threading.Thread(target=lambda: first.append(next(consumer)))
    waiting.start()
    while broker.get_queue_message_counts(prefix)[0] == 0 and not first:
        broker.enqueue(Message(prefix, "f", ("early",), {}, {}))  # until the wait takes one
        time.sleep(0.05)
    waiting.join()
    sent = broker.enqueue_many([Message(prefix, "f", (i,), {}, {}) for i in range(10)])
    taken = [*first, *(next(consumer) for _ in range(3))]
    assert broker.unsettled(prefix) == 4  # the prefetch, whatever arrived meanwhile
    for message in taken:
        consumer.ack(message)
    rest = [next(consumer) for _ in range(4)]
    assert broker.unsettled(prefix) == 4
    consumer.close()  # returns the 4 it holds
    ready, _, _ = broker.get_queue_message_counts(prefix)
    early = len(taken) + len(rest) + ready - len(sent)
    assert early >= 1 and broker.unsettled(prefix) == 0


# -- issue 16: the command table, queue names and declare hooks ------------------------------


def test_the_command_table_covers_every_core_command() -> None:
    from dq.brokers.rabbitmq import COMMANDS
    from dq.brokers.steps import uncovered

    assert uncovered(COMMANDS) == ()


def test_declare_hooks_get_the_canonical_name_and_dead_letter_queues_are_refused(
    broker_factory: BrokerFactory, prefix: str
) -> None:
    calls: list[tuple[str, str]] = []

    class Recorder(dq.Middleware):
        def before_declare_queue(self, broker: dq.Broker, queue_name: str) -> None:
            calls.append(("before", queue_name))

        def after_declare_queue(self, broker: dq.Broker, queue_name: str) -> None:
            calls.append(("after", queue_name))

    broker = broker_factory(middleware=[Recorder()])
    with pytest.raises(QueueNotFound):
        broker.declare_queue(f"{prefix}.XQ")
    broker.declare_queue(f"{prefix}.DQ")
    assert calls == [("before", prefix), ("after", prefix)]
    with pytest.raises(QueueNotFound):  # also once its queue is declared
        broker.declare_queue(f"{prefix}.XQ")
    assert calls == [("before", prefix), ("after", prefix)]


@pytest.mark.parametrize("template", ["__heartbeats__", "{q}.msgs", "__dq__.deliveries.{q}"])
def test_names_of_broker_keys_are_refused_and_nothing_is_created(
    broker_factory: BrokerFactory, prefix: str, template: str
) -> None:
    name = template.format(q=prefix)
    broker = broker_factory(confirm_delivery=True)
    broker_factory.extra.add(name)
    with pytest.raises(ValueError, match="invalid queue name"):
        broker.enqueue(Message(name, "f", (), {}, {}))
    with pytest.raises(ValueError, match="invalid queue name"):
        broker.declare_queue(name, ensure=True)
    with pytest.raises(QueueNotFound):
        broker.enqueue(Message(f"{prefix}.XQ", "f", (), {}, {}))
    assert not queue_exists(name)


def test_join_sees_what_the_server_already_sent_to_an_idle_subscription(
    broker: RabbitmqBroker, prefix: str
) -> None:
    # Found by the conformance machine in the default consume mode: the server pushes
    # a new message to a subscribed consumer at once, where it is unacked (not in the
    # ready count) and, until the consumer reads its socket, not in `unsettled`.
    broker.declare_queue(prefix)
    consumer = broker.consume(prefix, prefetch=2, timeout=5)
    with pytest.raises(StopIteration):
        next(consumer)  # subscribes, finds nothing
    for _ in range(5):
        broker.enqueue(Message(prefix, "f", (), {}, {}))
        with pytest.raises(QueueJoinTimeout):
            broker.join(prefix, min_successes=1, timeout=1)
        message = next(consumer)
        consumer.ack(message)
        broker.join(prefix, min_successes=1, timeout=2000)
    consumer.close()
