"""Helpers for tests on the real RabbitMQ (127.0.0.1:5672, guest/guest): private queue
names, a broker factory that remembers what it declared, and cleanup."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from dq.brokers.rabbitmq import RabbitmqBroker
from dq.brokers.rabbitmq._pika import socket_of
from dq.core import policy

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


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


def _rabbitmqctl(*args: str) -> str:
    """What ``rabbitmqctl -q ARGS`` prints (it must succeed)."""
    import subprocess

    done = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True)
    return done.stdout


def confirm_modes(connection: Any) -> list[bool]:
    """Whether each open channel of ``connection`` is in publisher-confirm mode, as the
    server sees it (``rabbitmqctl list_channels``)."""
    listing = _rabbitmqctl("list_channels", "name", "confirm")
    name = _client_name(connection)
    return [line.split("\t")[1] == "true" for line in listing.splitlines() if line.startswith(name)]


def close_server_side(connection: Any) -> None:
    """Have RabbitMQ close ``connection`` (a pika BlockingConnection) from its side, as an
    operator's ``rabbitmqctl close_connection`` does."""
    name = _client_name(connection)
    listing = _rabbitmqctl("list_connections", "pid", "name")
    pids = [line.split("\t")[0] for line in listing.splitlines() if line.endswith(name)]
    assert len(pids) == 1, (name, listing)
    _rabbitmqctl("close_connection", pids[0], "dq test")
