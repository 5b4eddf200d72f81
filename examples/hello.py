"""dq's first example: actors, a broker, and a worker loop processing real tasks.

Run it with ``python examples/hello.py``. It uses the in-memory StubBroker, so no
server is needed. (dq's threaded ``Worker`` and the embedded SQLite broker arrive in
later releases; until then this file drives the broker with a small loop of its own,
using only the public consumer API.)
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

import dq
from dq.brokers.stub import StubBroker

broker = StubBroker()
dq.set_broker(broker)

results: Counter[str] = Counter()


@dq.actor
def count_words(text: str) -> int:
    """Count the words of a text."""
    n = len(text.split())
    results["words"] += n
    return n


@dq.actor(queue_name="maths")
def add(x: int, y: int) -> int:
    """Add two numbers."""
    results["sum"] += x + y
    return x + y


@dq.actor(queue_name="maths")
def divide(x: int, y: int) -> float:
    """Divide; fails (and is dead-lettered) when y is 0."""
    return x / y


def process(queue_names: list[str], idle_ms: int = 50) -> Counter[str]:
    """Process messages until every queue has been idle for ``idle_ms``.

    Each message runs its actor; a success is acked, a failure is nacked (moved to
    the dead letters) with its exception attached.
    """
    outcome: Counter[str] = Counter()
    consumers = [broker.consume(name, prefetch=8, timeout=idle_ms) for name in queue_names]
    busy = True
    while busy:
        busy = False
        for consumer in consumers:
            for message in consumer:
                busy = True
                actor = broker.get_actor(message.actor_name)
                try:
                    actor(*message.args, **message.kwargs)
                except Exception as e:
                    message.stuff_exception(e)
                    message.fail()
                    consumer.nack(message)
                    outcome["dead-lettered"] += 1
                else:
                    consumer.ack(message)
                    outcome["processed"] += 1
    for consumer in consumers:
        consumer.close()
    return outcome


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    n = 1000
    for i in range(n):
        count_words.send(f"message number {i} has exactly seven words")
        add.send(i, 1)
    divide.send(1, 0)
    print(f"enqueued {2 * n + 1} messages on {sorted(broker.get_declared_queues())}")
    outcome = process(["default", "maths"])
    elapsed = time.perf_counter() - start
    print(
        f"processed {outcome['processed']}, dead-lettered {outcome['dead-lettered']} "
        f"in {elapsed:.2f}s; words counted: {results['words']}, sum: {results['sum']}"
    )
    for proxy in broker.dead_letters:
        print(f"dead letter: {proxy} -> {type(proxy._exception).__name__}: {proxy._exception}")
    ok = outcome["processed"] == 2 * n and outcome["dead-lettered"] == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
