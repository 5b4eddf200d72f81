"""Wire interop on RabbitMQ: dq and Dramatiq 2.2.1 share one set of queues (spec/wire.md §4).

Most tests run in both directions: Dramatiq produces and a dq Worker consumes, and dq
produces and a Dramatiq Worker consumes. One mixed-fleet test has both workers consume
the same queue at once. The others look at what each library leaves on the server: the
properties of what it publishes, the arguments of what it declares (a queue declared by
one must be re-declarable by the other without ``406 PRECONDITION_FAILED``), and the dead
letters it makes. Every test uses its own queue ``interop_<hex>`` and deletes it, its
``.DQ`` and its ``.XQ`` at the end.

Needs RabbitMQ on 127.0.0.1:5672 (guest/guest), ``rabbitmqctl`` on the PATH (to read
queue arguments) and ``dramatiq==2.2.1`` (a test-only dependency).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker as DramatiqRabbitmqBroker

from dq.brokers.rabbitmq import RabbitmqBroker as DqRabbitmqBroker
from tests.support import interop
from tests.support.interop import FAST_RETRY, DqSide, DramatiqSide, Recorder, envelope, record
from tests.support.rabbitmq_helpers import PROPERTY_NAMES, Rabbit, private_queue, rabbitmqctl
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.rabbitmq]

RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672

#: Dramatiq's default ``dramatiq_dead_message_ttl`` (7 days in ms), the XQ's message TTL.
DEAD_MESSAGE_TTL = 604_800_000


# -- the server, seen without either library -----------------------------------------------


def queue_topology(*queue_names: str) -> dict[str, dict[str, Any]]:
    """How the server describes each queue (flags and typed arguments), via rabbitmqctl."""
    out = rabbitmqctl(
        "list_queues",
        "name",
        "durable",
        "auto_delete",
        "exclusive",
        "arguments",
        "--formatter",
        "json",
    )
    rows = json.loads(out)
    assert isinstance(rows, list)
    wanted = set(queue_names)
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        assert isinstance(row, dict)
        name = row.pop("name")
        if name in wanted:
            # [[key, type, value], ...] sorted by key: the order is not part of the wire.
            row["arguments"] = sorted(tuple(a) for a in row["arguments"])
            found[name] = row
    assert set(found) == wanted, f"rabbitmqctl lists {sorted(found)}, expected {sorted(wanted)}"
    return found


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def queue(rabbit: Rabbit) -> Iterator[str]:
    """A queue name of this test only; the queue and its DQ and XQ are deleted after."""
    yield from private_queue(rabbit, "interop")


@dataclass
class Fleet(interop.Fleet):
    """Both libraries on one queue; ``producer`` sends and ``consumer`` works."""

    queue: str
    rabbit: Rabbit

    @property
    def delay_queue(self) -> str:
        return f"{self.queue}.DQ"

    @property
    def dead_queue(self) -> str:
        return f"{self.queue}.XQ"

    def ready(self) -> tuple[int, int, int]:
        """Ready messages on Q, Q.DQ and Q.XQ."""
        return (
            self.rabbit.ready(self.queue),
            self.rabbit.ready(self.delay_queue),
            self.rabbit.ready(self.dead_queue),
        )

    def assert_nothing_left(self) -> None:
        """After shutdown (every connection closed, so nothing is unacked): all empty."""
        self.shutdown()
        assert self.ready() == (0, 0, 0)


@contextlib.contextmanager
def make_fleet(
    queue: str,
    rabbit: Rabbit,
    direction: str,
    max_priority: int | None = None,
    *,
    confirm: bool = False,
) -> Iterator[Fleet]:
    """Both libraries' brokers on ``queue``; both workers stopped and brokers closed after."""
    with interop.kept_global_brokers():
        settings: dict[str, Any] = {
            "host": RABBIT_HOST,
            "port": RABBIT_PORT,
            "max_priority": max_priority,
            "confirm_delivery": confirm,
        }
        dq_side = DqSide(DqRabbitmqBroker(**settings), queue)
        dramatiq_side = DramatiqSide(DramatiqRabbitmqBroker(**settings), queue)
        producer, consumer = interop.directed(direction, dq_side, dramatiq_side)
        fleet = Fleet(dq_side, dramatiq_side, producer, consumer, queue, rabbit)
        try:
            yield fleet
        finally:
            fleet.shutdown()


def message_counts(side: interop.Side[Any]) -> tuple[int, int, int]:
    """``broker.get_queue_message_counts(queue)`` of ``side``: (re-)declares Q, Q.DQ and
    Q.XQ."""
    ready, delayed, dead = side.broker.get_queue_message_counts(side.queue_name)
    return int(ready), int(delayed), int(dead)


@pytest.fixture(params=interop.DIRECTIONS)
def fleet(request: pytest.FixtureRequest, queue: str, rabbit: Rabbit) -> Iterator[Fleet]:
    with make_fleet(queue, rabbit, request.param) as fleet:
        yield fleet


@pytest.fixture(params=interop.DIRECTIONS)
def priority_fleet(request: pytest.FixtureRequest, queue: str, rabbit: Rabbit) -> Iterator[Fleet]:
    """As `fleet`, with ``max_priority=10`` on both brokers."""
    with make_fleet(queue, rabbit, request.param, max_priority=10) as fleet:
        yield fleet


# -- messages cross ------------------------------------------------------------------------


def test_plain_messages_cross_and_run_exactly_once(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("echo", record(recorder))
    sent: dict[str, tuple[list[Any], dict[str, Any]]] = {}
    for i in range(30):
        args = (i, f"s{i}", [i, {"nested": i * 1.5}], None, i % 2 == 0)
        kwargs = {"k": [i], "text": 'é€😀 /\\"', "big": 2**70 + i}
        stored = envelope(fleet.producer.send("echo", args=args, kwargs=kwargs))
        sent[stored["message_id"]] = (list(args), kwargs)
        assert stored["queue_name"] == fleet.queue
        assert stored["options"] == {}, "nothing broker-specific in the options on RabbitMQ"

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= len(sent))
    fleet.assert_nothing_left()

    interop.assert_each_ran_once(
        recorder.calls,  # everything, after the workers stopped
        sent,
        side=fleet.consumer.label,
        queue_name=fleet.queue,
        actor_name="echo",
    )


def test_delayed_messages_cross_and_run_after_their_eta(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("later", record(recorder))
    fleet.declare("now", record(recorder))

    delayed = [envelope(fleet.producer.send("later", args=(i,), delay=300)) for i in range(3)]
    for stored in delayed:
        # Published to Q.DQ with an integer ms eta (spec §4.3).
        assert stored["queue_name"] == fleet.delay_queue
        eta = stored["options"]["eta"]
        assert isinstance(eta, int)
        assert abs(eta - (stored["message_timestamp"] + 300)) < 1000
    immediate = envelope(fleet.producer.send("now", args=("go",)))
    wait_until(lambda: fleet.ready() == (1, 3, 0), "the messages to be routed")

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 4)
    fleet.assert_nothing_left()

    # Promoted: canonical queue, no eta; the same id and timestamp.
    interop.assert_ran_after_their_eta(
        recorder.calls, delayed, immediate, side=fleet.consumer.label, queue_name=fleet.queue
    )


def test_a_message_that_fails_once_is_retried_through_the_delay_queue(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("flaky", interop.fail_first_attempt(recorder))
    stored = envelope(
        fleet.producer.send("flaky", args=(7,), kwargs={"x": "y"}, max_retries=3, **FAST_RETRY)
    )

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 2)
    fleet.assert_nothing_left()

    first, second = recorder.calls
    interop.assert_retried_once(
        first, second, stored, side=fleet.consumer.label, queue_name=fleet.queue
    )
    assert len(recorder.calls) == 2


def test_a_retry_stored_by_one_library_is_run_by_the_other(fleet: Fleet) -> None:
    """The consumer's first attempt fails and it publishes the retry to Q.DQ; it stops
    before the retry is due, and the producer's worker promotes and runs it."""
    recorder = Recorder()
    fleet.declare("flaky", interop.fail_first_attempt(recorder))
    # A 500-1000 ms backoff: the consumer is stopped well before the retry is due.
    stored = envelope(
        fleet.producer.send("flaky", args=(1,), max_retries=3, min_backoff=1000, max_backoff=1000)
    )

    fleet.consumer.start_worker()
    (first,) = recorder.wait_for(lambda calls: len(calls) >= 1)
    # The consumer holds the retry unacked in memory until its eta; stopping (and
    # closing) hands it back to the server.
    fleet.consumer.stop_worker()
    fleet.consumer.close()
    wait_until(lambda: fleet.ready() == (0, 1, 0), "the held retry to be handed back")
    (got,) = fleet.rabbit.get_all(fleet.delay_queue)
    retry = envelope(got.body)
    assert retry["queue_name"] == fleet.delay_queue
    assert retry["message_id"] == stored["message_id"]
    assert retry["message_timestamp"] == stored["message_timestamp"]
    assert retry["args"] == [1]
    options = retry["options"]
    assert options["retries"] == 1
    assert isinstance(options["eta"], int)
    assert options["eta"] >= first.started_ms + 499
    assert got.properties["delivery_mode"] == 2
    fleet.assert_both_read(got.body, retry)
    # Put it back as it was (basic.get took it) for the producer's worker.
    publisher = fleet.rabbit.connection.channel()
    publisher.basic_publish("", fleet.delay_queue, got.body, pika.BasicProperties(delivery_mode=2))
    publisher.close()

    fleet.producer.start_worker()
    calls = recorder.wait_for(lambda calls: len(calls) >= 2)
    fleet.assert_nothing_left()

    second = calls[1]
    assert second.side == fleet.producer.label
    assert second.started_ms >= options["eta"]
    assert second.message["queue_name"] == fleet.queue
    assert second.message["message_id"] == stored["message_id"]
    assert second.message["options"]["retries"] == 1
    assert "eta" not in second.message["options"]
    assert len(recorder.calls) == 2


def test_delayed_messages_held_at_shutdown_go_back_for_the_other_library(fleet: Fleet) -> None:
    """The consumer takes delayed messages and holds them unacked; stopped before their
    eta it hands them back, and the producer's worker runs them."""
    recorder = Recorder()
    fleet.declare("later", record(recorder))
    sent = [envelope(fleet.producer.send("later", args=(i,), delay=1500)) for i in range(3)]

    fleet.consumer.start_worker()
    wait_until(
        lambda: fleet.ready() == (0, 0, 0),
        f"the {fleet.consumer.label} worker to take the delayed messages",
    )
    fleet.consumer.stop_worker()
    fleet.consumer.close()
    assert recorder.calls == []
    wait_until(lambda: fleet.ready() == (0, 3, 0), "the held messages to be handed back")

    fleet.producer.start_worker()
    calls = recorder.wait_for(lambda calls: len(calls) >= 3)
    fleet.assert_nothing_left()

    assert Counter(c.message["message_id"] for c in recorder.calls) == {
        m["message_id"]: 1 for m in sent
    }
    by_id = {c.message["message_id"]: c for c in calls}
    for message in sent:
        call = by_id[message["message_id"]]
        assert call.side == fleet.producer.label
        assert call.started_ms >= message["options"]["eta"]
        assert call.message["queue_name"] == fleet.queue


def test_a_message_that_fails_for_good_is_dead_lettered_readably(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("doomed", interop.always_fail(recorder))
    raw = fleet.producer.send("doomed", args=("x",), max_retries=0, **FAST_RETRY)
    stored = envelope(raw)

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 1)
    wait_until(lambda: fleet.rabbit.ready(fleet.dead_queue) >= 1, "a dead letter")
    fleet.shutdown()

    assert len(recorder.calls) == 1, "max_retries=0: one attempt, no retry"
    assert fleet.ready() == (0, 0, 1)
    (dead,) = fleet.rabbit.get_all(fleet.dead_queue)
    # Dead-lettered by the server through Q's arguments: the body as published.
    assert dead.body == raw
    headers = dead.properties["headers"]
    assert isinstance(headers, dict)
    (death,) = headers["x-death"]
    assert death["queue"] == fleet.queue
    assert death["reason"] == "rejected"
    assert death["exchange"] == ""
    assert dead.properties["delivery_mode"] == 2
    # Both decoders read it; in particular the library that did not dead-letter it.
    fleet.assert_both_read(dead.body, stored)


def test_a_message_for_an_actor_only_the_producer_knows_is_dead_lettered(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("known", record(recorder))
    fleet.producer.declare("ghost", record(recorder))
    ghost = fleet.producer.send("ghost", args=(1,))
    known = envelope(fleet.producer.send("known", args=(2,)))

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 1)
    wait_until(lambda: fleet.rabbit.ready(fleet.dead_queue) >= 1, "a dead letter")
    fleet.shutdown()

    assert [c.message["message_id"] for c in recorder.calls] == [known["message_id"]]
    (dead,) = fleet.rabbit.get_all(fleet.dead_queue)
    assert dead.body == ghost
    assert fleet.producer.decode(dead.body) == envelope(ghost)
    assert fleet.ready() == (0, 0, 0)


def test_an_undecodable_body_is_dead_lettered_by_either_consumer(fleet: Fleet) -> None:
    recorder = Recorder()
    fleet.declare("echo", record(recorder))
    assert message_counts(fleet.producer) == (0, 0, 0)  # declares the queues
    publisher = fleet.rabbit.connection.channel()
    publisher.basic_publish("", fleet.queue, b"{not json", pika.BasicProperties(delivery_mode=2))
    publisher.close()
    after = envelope(fleet.producer.send("echo", args=(1,)))

    fleet.consumer.start_worker()
    recorder.wait_for(lambda calls: len(calls) >= 1)
    wait_until(lambda: fleet.rabbit.ready(fleet.dead_queue) >= 1, "a dead letter")
    fleet.shutdown()

    assert [c.message["message_id"] for c in recorder.calls] == [after["message_id"]]
    (dead,) = fleet.rabbit.get_all(fleet.dead_queue)
    assert dead.body == b"{not json"
    assert fleet.ready() == (0, 0, 0)


def test_stored_payloads_are_read_byte_for_byte_by_the_other_library(fleet: Fleet) -> None:
    fleet.declare("payload", record(Recorder()))
    args, kwargs = interop.PAYLOAD_ARGS, interop.PAYLOAD_KWARGS
    options = {"max_retries": 3, "time_limit": 60000}
    plain = fleet.producer.send("payload", args=args, kwargs=kwargs, **options)
    delayed = fleet.producer.send("payload", args=args, kwargs=kwargs, delay=60_000, **options)
    wait_until(lambda: fleet.ready() == (1, 1, 0), "the messages to be routed")

    for raw, queue_name in ((plain, fleet.queue), (delayed, fleet.delay_queue)):
        (got,) = fleet.rabbit.get_all(queue_name)
        assert got.body == raw
        interop.assert_encoded_as_dramatiq_does(raw)
        fleet.assert_both_read(raw, envelope(raw))
    assert envelope(plain)["options"] == options
    assert envelope(delayed)["queue_name"] == fleet.delay_queue
    assert isinstance(envelope(delayed)["options"]["eta"], int)


def test_a_mixed_fleet_shares_one_queue(queue: str, rabbit: Rabbit) -> None:
    """Both workers consume the same queue while both libraries produce (with publisher
    confirms): plain, delayed and fail-once messages each run exactly once (twice for
    the retried ones)."""
    with make_fleet(queue, rabbit, "dq-to-dramatiq", confirm=True) as mixed:
        recorder = Recorder()
        mixed.declare("echo", record(recorder))
        mixed.declare("flaky", interop.fail_first_attempt(recorder))
        for side in mixed.sides:
            side.start_worker()

        plain, flaky = interop.send_mixed_load(mixed.sides)

        expected = len(plain) + 2 * len(flaky)
        recorder.wait_for(lambda calls: len(calls) >= expected)
        mixed.assert_nothing_left()

        calls = recorder.calls
        counts = Counter(c.message["message_id"] for c in calls)
        assert counts == {**dict.fromkeys(plain, 1), **dict.fromkeys(flaky, 2)}
        assert {c.side for c in calls} == {"dq", "dramatiq"}, "both workers took messages"


# -- what each library puts on the server -------------------------------------------------


@pytest.mark.parametrize("max_priority", [None, 10])
def test_both_libraries_publish_with_the_same_properties(
    queue: str, rabbit: Rabbit, max_priority: int | None
) -> None:
    """Persistent, ``priority`` from ``broker_priority`` (and nothing else), the encoded
    message as the body, routed to Q or Q.DQ through the default exchange."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("plain", {}),
        ("delayed", {"delay": 60_000}),
        ("null priority", {"broker_priority": None}),
    ]
    if max_priority is not None:
        cases += [
            ("priority", {"broker_priority": 7}),
            ("delayed priority", {"delay": 60_000, "broker_priority": 3}),
        ]
    seen: dict[str, dict[str, dict[str, Any]]] = {}
    with make_fleet(queue, rabbit, "dq-to-dramatiq", max_priority) as fleet:
        fleet.declare("echo", record(Recorder()))
        for side in fleet.sides:
            for label, options in cases:
                raw = side.send("echo", args=(label,), **options)
                target = fleet.delay_queue if "delay" in options else fleet.queue

                def routed(target: str = target) -> bool:
                    return rabbit.ready(target) == 1

                wait_until(routed, f"{side.label} {label} routed")
                (got,) = rabbit.get_all(target)
                assert got.body == raw, f"{side.label} {label}"
                assert not got.redelivered
                seen.setdefault(label, {})[side.label] = got.properties
    for label, options in cases:
        by_side = seen[label]
        assert by_side["dq"] == by_side["dramatiq"], label
        expected = dict.fromkeys(PROPERTY_NAMES)
        expected["delivery_mode"] = 2
        expected["priority"] = options.get("broker_priority")
        assert by_side["dq"] == expected, label


def test_broker_priority_orders_delivery_across_libraries(priority_fleet: Fleet) -> None:
    """With ``max_priority`` set on both, the producer's ``broker_priority`` reaches the
    server: a consumer with one thread runs a backlog highest priority first."""
    fleet = priority_fleet
    recorder = Recorder()
    fleet.declare("ranked", record(recorder))
    priorities = [2, 9, 0, 5, 7, 1, 8]
    for priority in priorities:
        fleet.producer.send("ranked", args=(priority,), broker_priority=priority)
    wait_until(lambda: fleet.ready() == (len(priorities), 0, 0), "the messages to be routed")

    fleet.consumer.start_worker(threads=1)
    calls = recorder.wait_for(lambda calls: len(calls) >= len(priorities))
    fleet.assert_nothing_left()

    assert [c.args[0] for c in calls] == sorted(priorities, reverse=True)
    assert [c.message["options"]["broker_priority"] for c in calls] == sorted(
        priorities, reverse=True
    )


def expected_topology(queue: str, max_priority: int | None) -> dict[str, dict[str, Any]]:
    """Spec §4.2, as rabbitmqctl prints it."""
    flags = {"durable": True, "auto_delete": False, "exclusive": False}
    dead_letter: list[tuple[str, str, str | int]] = [
        ("x-dead-letter-exchange", "longstr", ""),
        ("x-dead-letter-routing-key", "longstr", f"{queue}.XQ"),
    ]
    if max_priority is not None:
        dead_letter.append(("x-max-priority", "signedint", max_priority))
    return {
        queue: {**flags, "arguments": sorted(dead_letter)},
        f"{queue}.DQ": {**flags, "arguments": sorted(dead_letter)},
        f"{queue}.XQ": {**flags, "arguments": [("x-message-ttl", "signedint", DEAD_MESSAGE_TTL)]},
    }


@pytest.mark.parametrize("max_priority", [None, 10])
@pytest.mark.parametrize("first", ["dq", "dramatiq"])
def test_queues_declared_by_one_library_are_redeclared_by_the_other(
    queue: str, rabbit: Rabbit, first: str, max_priority: int | None
) -> None:
    """The first library declares Q, Q.DQ and Q.XQ (by publishing); the second
    re-declares them (not passively) and consumes from them, with no 406; the server
    holds exactly Dramatiq's arguments. A declaration that differs is refused, so the
    test would see a mismatch."""
    with make_fleet(queue, rabbit, "dq-to-dramatiq", max_priority) as fleet:
        one, other = (fleet.dq, fleet.dramatiq) if first == "dq" else (fleet.dramatiq, fleet.dq)
        recorder = Recorder()
        fleet.declare("echo", record(recorder))
        raw = one.send("echo", args=(1,))
        wait_until(lambda: rabbit.ready(queue) == 1, "the message to be routed")
        assert queue_topology(queue, f"{queue}.DQ", f"{queue}.XQ") == expected_topology(
            queue, max_priority
        )

        assert message_counts(other) == (1, 0, 0)
        other.start_worker()
        (call,) = recorder.wait_for(lambda calls: len(calls) >= 1)
        assert call.side == other.label
        assert call.message == envelope(raw)
        other.send("echo", args=(2,), delay=10)
        recorder.wait_for(lambda calls: len(calls) >= 2)
        assert message_counts(one) == (0, 0, 0)
        fleet.assert_nothing_left()
        assert queue_topology(queue, f"{queue}.DQ", f"{queue}.XQ") == expected_topology(
            queue, max_priority
        )

    # The control: the server refuses other arguments for the same queue.
    wrong_priority = 5 if max_priority is None else max_priority + 1
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        rabbit.declare(
            queue,
            {
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": f"{queue}.XQ",
                "x-max-priority": wrong_priority,
            },
        )
    assert refused.value.reply_code == 406
