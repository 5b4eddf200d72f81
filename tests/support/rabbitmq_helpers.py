"""Helpers for tests on the real RabbitMQ (127.0.0.1:5672, guest/guest): private queue
names, a broker factory that remembers what it declared, cleanup, a plain pika view of
the queues (`Rabbit`) and ``rabbitmqctl``."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pytest

from dq.brokers.rabbitmq import RabbitmqBroker
from dq.brokers.rabbitmq._pika import socket_of
from dq.core import policy

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: The AMQP basic properties, as pika names them.
PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def new_prefix(prefix: str = "dq-test") -> str:
    """A queue-name prefix no other test uses (queue names must start with a letter)."""
    return f"{prefix.replace('-', '_')}_{uuid.uuid4().hex[:12]}"


def delete_queues(names: Iterable[str]) -> None:
    """Delete each canonical queue with its ``.DQ`` and ``.XQ`` (missing ones are fine)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        for name in sorted(set(names)):
            canonical = policy.q_name(name)
            for queue in (canonical, policy.dq_name(canonical), policy.xq_name(canonical)):
                if channel.is_closed:
                    channel = connection.channel()
                try:
                    channel.queue_delete(queue)
                except pika.exceptions.ChannelClosedByBroker:
                    continue
    finally:
        connection.close()


def queue_exists(name: str) -> bool:
    """Whether ``name`` exists on the server (a passive declare)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


def read_queue(name: str) -> list[tuple[bytes, Any]]:
    """Every ready message of ``name`` as (body, properties), without removing any
    (taken unacked, then returned by closing the channel)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        found: list[tuple[bytes, Any]] = []
        while True:
            try:
                method, properties, body = channel.basic_get(name)
            except pika.exceptions.ChannelClosedByBroker:
                return found  # no such queue
            if method is None or body is None:
                return found
            found.append((bytes(body), properties))
    finally:
        if connection.is_open:
            connection.close()


class BrokerFactory:
    """Makes RabbitmqBrokers on one server and remembers every queue they declared, so
    `cleanup` deletes them all."""

    def __init__(self) -> None:
        self.brokers: list[RabbitmqBroker] = []
        self.extra: set[str] = set()

    def __call__(self, **kwargs: Any) -> RabbitmqBroker:
        kwargs.setdefault("url", RABBITMQ_URL)
        broker = RabbitmqBroker(**kwargs)
        self.brokers.append(broker)
        return broker

    def cleanup(self) -> None:
        names = set(self.extra)
        for broker in self.brokers:
            names |= broker.get_declared_queues() | broker._ensured
            broker.close()
        delete_queues(names)


@dataclass(frozen=True)
class Got:
    """One message taken from a queue with ``basic.get``."""

    body: bytes
    properties: dict[str, Any]
    redelivered: bool


class Rabbit:
    """A plain pika connection to look at queues (and delete them); no dq, no Dramatiq."""

    def __init__(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def counts(self, queue_name: str) -> tuple[int, int]:
        """Ready messages and consumers of an existing queue (a passive declare)."""
        channel = self.connection.channel()
        try:
            ok = channel.queue_declare(queue_name, passive=True)
            method = ok.method
            assert isinstance(method, pika.spec.Queue.DeclareOk)
            return int(method.message_count), int(method.consumer_count)
        finally:
            if channel.is_open:
                channel.close()

    def ready(self, queue_name: str) -> int:
        return self.counts(queue_name)[0]

    def consumers(self, queue_name: str) -> int:
        return self.counts(queue_name)[1]

    def exists(self, queue_name: str) -> bool:
        try:
            self.counts(queue_name)
        except pika.exceptions.ChannelClosedByBroker as error:
            assert error.reply_code == 404, error
            return False
        return True

    def get_all(self, queue_name: str) -> list[Got]:
        """Take every ready message off ``queue_name`` (acked: they are gone)."""
        channel = self.connection.channel()
        got: list[Got] = []
        try:
            while True:
                method, properties, body = channel.basic_get(queue_name, auto_ack=True)
                if method is None:
                    return got
                assert properties is not None and body is not None
                got.append(
                    Got(
                        body=bytes(body),
                        properties={n: getattr(properties, n) for n in PROPERTY_NAMES},
                        redelivered=bool(method.redelivered),
                    )
                )
        finally:
            if channel.is_open:
                channel.close()

    def declare(self, queue_name: str, arguments: dict[str, Any]) -> None:
        """Declare as the libraries do (durable, not exclusive, not auto-delete)."""
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue_name, durable=True, arguments=arguments)
        finally:
            if channel.is_open:
                channel.close()

    def delete(self, *queue_names: str) -> None:
        channel = self.connection.channel()
        for name in queue_names:
            channel.queue_delete(name)
        channel.close()


def private_queue(rabbit: Rabbit, prefix: str) -> Iterator[str]:
    """For a fixture (``yield from``): a queue name ``PREFIX_<hex>`` of one test; the
    queue, its ``.DQ`` and its ``.XQ`` are deleted after."""
    name = f"{prefix}_{uuid.uuid4().hex}"
    yield name
    rabbit.delete(name, f"{name}.DQ", f"{name}.XQ")


@pytest.fixture
def broker_factory() -> Iterator[BrokerFactory]:
    """A `BrokerFactory`; every queue its brokers declared is deleted afterwards."""
    factory = BrokerFactory()
    yield factory
    factory.cleanup()


@pytest.fixture
def prefix() -> str:
    """A unique queue-name prefix."""
    return new_prefix()


def wait_for_counts(
    broker: RabbitmqBroker, queue_name: str, expected: tuple[int, int, int], timeout: float = 5.0
) -> None:
    """Wait until ``broker.get_queue_message_counts(queue_name) == expected``: without
    ``confirm_delivery`` RabbitMQ may count a publish a moment after it was sent."""
    deadline = time.monotonic() + timeout
    while (counts := broker.get_queue_message_counts(queue_name)) != expected:
        assert time.monotonic() < deadline, f"counts of {queue_name!r}: {counts} != {expected}"
        time.sleep(0.01)


def _client_name(connection: Any) -> str:
    """The server's name of ``connection`` (a pika BlockingConnection): client -> server."""
    sock = socket_of(connection)  # the client end of the TCP connection
    host, port = sock.getsockname()[:2]
    return f"{host}:{port} -> 127.0.0.1:5672"


def rabbitmqctl(*args: str) -> str:
    """What ``rabbitmqctl -q ARGS`` prints (it must succeed within 30 s)."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=30
    )
    return done.stdout


def confirm_modes(connection: Any) -> list[bool]:
    """Whether each open channel of ``connection`` is in publisher-confirm mode, as the
    server sees it (``rabbitmqctl list_channels``)."""
    listing = rabbitmqctl("list_channels", "name", "confirm")
    name = _client_name(connection)
    return [line.split("\t")[1] == "true" for line in listing.splitlines() if line.startswith(name)]


def close_server_side(connection: Any) -> None:
    """Have RabbitMQ close ``connection`` (a pika BlockingConnection) from its side, as an
    operator's ``rabbitmqctl close_connection`` does."""
    name = _client_name(connection)
    listing = rabbitmqctl("list_connections", "pid", "name")
    pids = [line.split("\t")[0] for line in listing.splitlines() if line.endswith(name)]
    assert len(pids) == 1, (name, listing)
    rabbitmqctl("close_connection", pids[0], "dq test")
