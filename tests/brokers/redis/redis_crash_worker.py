"""A dq process on a private Redis, for the crash tests (tests/brokers/redis/test_redis_crash.py).

The tests SIGKILL it, or its actor kills it, to play a crashed worker. Two modes:

``fetch``
    Open one consumer, fetch ``--count`` messages of ``--queue`` and keep them
    unacked. Prints one JSON line (``broker_id``, ``pid``, ``redis_ids``), then sleeps
    until killed: a consumer that died between fetch and ack.

``work``
    Run a dq `Worker` (actors from `declare_record` and, with ``--poison``,
    `declare_poison`; with ``--threads 1``, on a `OneThreadBroker`). Prints one JSON
    line (``broker_id``, ``pid``) once it runs, then works until SIGTERM (a clean
    stop, exit 0) or SIGKILL.

Every process the tests start records what its actors ran in Redis hashes *outside*
the broker namespace (`processed_key`, `poison_runs_key`), so what was done survives the
process and the namespace can be checked for leftovers on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import dq
from dq.broker import Consumer, MessageProxy
from dq.brokers.redis import RedisBroker
from dq.brokers.redis._consumer import RedisConsumer
from dq.middleware import CurrentMessage, Middleware, default_middleware

__all__ = [
    "declare_poison",
    "declare_record",
    "innocent_starts_key",
    "main",
    "make_broker",
    "poison_runs_key",
    "processed_key",
]


def processed_key(namespace: str) -> str:
    """Hash message_id -> times the ``record`` actor ran it (outside the namespace)."""
    return f"{namespace}-test:processed"


def innocent_starts_key(namespace: str) -> str:
    """Hash message_id -> times the ``innocent`` actor started (outside the namespace)."""
    return f"{namespace}-test:innocent-starts"


def poison_runs_key(namespace: str) -> str:
    """Hash message_id -> times the ``poison`` actor started (outside the namespace)."""
    return f"{namespace}-test:poison-runs"


class _AloneConsumer(RedisConsumer):
    """A consumer of a process with one worker thread: whatever starts runs alone."""

    def started(self, message: MessageProxy, *, alone: bool) -> None:
        super().started(message, alone=True)


class OneThreadBroker(RedisBroker):
    """A RedisBroker for a Worker with one thread, whose consumers report every start
    as alone (true with one thread). dq's Worker says so itself once it runs suspects
    alone (issue 16, the worker's part); until then this keeps the single-thread
    poison tests about the Redis side only."""

    @property
    def consumer_class(self) -> type[Consumer]:
        return _AloneConsumer


def make_broker(
    url: str,
    namespace: str,
    *,
    heartbeat_timeout: int,
    requeue_interval: int,
    max_deliveries: int = 10,
    middleware: list[Middleware] | None = None,
    one_thread: bool = False,
) -> RedisBroker:
    """A RedisBroker with the default middleware plus `CurrentMessage` (an
    `OneThreadBroker` for a Worker with ``one_thread``)."""
    if middleware is None:
        middleware = [cls() for cls in default_middleware]
        middleware.append(CurrentMessage())
    return (OneThreadBroker if one_thread else RedisBroker)(
        url=url,
        namespace=namespace,
        middleware=middleware,
        heartbeat_timeout=heartbeat_timeout,
        requeue_interval=requeue_interval,
        max_deliveries=max_deliveries,
    )


def _current_message_id() -> str:
    message = CurrentMessage.get_current_message()
    assert message is not None, "CurrentMessage middleware missing"
    return message.message_id


def declare_record(
    broker: RedisBroker, namespace: str, *, sleep_ms: int = 0
) -> dq.Actor[[int], None]:
    """``record(n)`` on queue ``default``: HINCRBY its message_id in `processed_key`."""
    key = processed_key(namespace)

    @dq.actor(broker=broker, actor_name="record", queue_name="default", max_retries=0)
    def record(n: int) -> None:
        broker.client.hincrby(key, _current_message_id(), 1)
        if sleep_ms:
            time.sleep(sleep_ms / 1000)

    return record


def declare_poison(
    broker: RedisBroker, namespace: str, *, wait_ms: int = 0, innocent_ms: int = 0
) -> tuple[dq.Actor[[], None], dq.Actor[[int], None]]:
    """On queue ``poison``: ``poison()`` records the attempt, waits ``wait_ms`` (so its
    consumer fills its prefetch meanwhile), then SIGKILLs its process; ``innocent(n)``
    records its start in `innocent_starts_key`, runs ``innocent_ms``, then records its
    message_id in `processed_key`. The poison has the lower priority value, so it runs
    before the innocent messages its worker holds."""
    runs = poison_runs_key(namespace)
    processed = processed_key(namespace)
    starts = innocent_starts_key(namespace)

    @dq.actor(broker=broker, actor_name="poison", queue_name="poison", priority=0, max_retries=0)
    def poison() -> None:
        broker.client.hincrby(runs, _current_message_id(), 1)
        if wait_ms:
            time.sleep(wait_ms / 1000)
        os.kill(os.getpid(), signal.SIGKILL)

    @dq.actor(
        broker=broker, actor_name="innocent", queue_name="poison", priority=100, max_retries=0
    )
    def innocent(n: int) -> None:
        broker.client.hincrby(starts, _current_message_id(), 1)
        if innocent_ms:
            time.sleep(innocent_ms / 1000)
        broker.client.hincrby(processed, _current_message_id(), 1)

    return poison, innocent


def _say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _fetch(broker: RedisBroker, queue: str, count: int) -> None:
    broker.declare_queue(queue)
    consumer = broker.consume(queue, prefetch=count, timeout=200)
    redis_ids: list[str] = []
    deadline = time.monotonic() + 10
    while len(redis_ids) < count and time.monotonic() < deadline:
        try:
            message = next(consumer)
        except StopIteration:
            continue
        redis_ids.append(message.options["redis_message_id"])
    _say(broker_id=broker.broker_id, pid=os.getpid(), redis_ids=redis_ids)
    while True:  # hold them, unacked, until killed
        time.sleep(60)


def _work(
    broker: RedisBroker,
    namespace: str,
    threads: int,
    sleep_ms: int,
    poison: int | None,
    innocent_ms: int = 0,
) -> None:
    declare_record(broker, namespace, sleep_ms=sleep_ms)
    if poison is not None:
        declare_poison(broker, namespace, wait_ms=poison, innocent_ms=innocent_ms)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    worker = dq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    _say(broker_id=broker.broker_id, pid=os.getpid())
    stop.wait()
    worker.stop(timeout=5000)
    broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fetch", "work"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--heartbeat-timeout", type=int, default=1000)
    parser.add_argument("--requeue-interval", type=int, default=200)
    parser.add_argument("--max-deliveries", type=int, default=10)
    parser.add_argument("--queue", default="default")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sleep-ms", type=int, default=0)
    parser.add_argument(
        "--poison", type=int, default=None, metavar="WAIT_MS", help="declare the poison actors"
    )
    parser.add_argument("--innocent-ms", type=int, default=0, help="how long innocent runs")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    broker = make_broker(
        args.url,
        args.namespace,
        heartbeat_timeout=args.heartbeat_timeout,
        requeue_interval=args.requeue_interval,
        max_deliveries=args.max_deliveries,
        one_thread=args.mode == "work" and args.threads == 1,
    )
    if args.mode == "fetch":
        _fetch(broker, args.queue, args.count)
    else:
        _work(broker, args.namespace, args.threads, args.sleep_ms, args.poison, args.innocent_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
