"""dq's first example: actors, a broker, a worker, retries, a delay and a pipeline.

Run it with ``python examples/hello.py``. It uses the in-memory StubBroker, in one
process (``examples/shop.py`` runs an app through the ``dq`` command on SQLite). It
enqueues the work, lets a `dq.Worker` with Dramatiq's default middleware (retries,
age and time limits, callbacks, pipelines) drain it, and prints a summary.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

import dq
from dq.brokers.stub import StubBroker

broker = StubBroker()
dq.set_broker(broker)


class Tally(dq.Middleware):
    """Counts what happened to messages (a typed middleware: every hook is checked)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def after_process_message(
        self,
        broker: dq.Broker,
        message: dq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        with self.lock:
            self.counts["failed attempts" if exception else "processed"] += 1

    def after_nack(self, broker: dq.Broker, message: dq.MessageProxy) -> None:
        with self.lock:
            self.counts["dead-lettered"] += 1


tally = Tally()
broker.add_middleware(tally)
words: Counter[str] = Counter()
attempts: Counter[int] = Counter()


@dq.actor
def count_words(text: str) -> int:
    """Count the words of a text."""
    n = len(text.split())
    words["total"] += n
    return n


@dq.actor(queue_name="maths")
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y


@dq.actor(queue_name="maths")
def double(x: int) -> int:
    """Double a number (the last step of a pipeline)."""
    words["pipeline result"] = 2 * x
    return 2 * x


@dq.actor(max_retries=3, min_backoff=50, max_backoff=200)
def flaky(n: int) -> None:
    """Fail the first two attempts of each message, then succeed (retried by Retries)."""
    attempts[n] += 1
    if attempts[n] < 3:
        raise RuntimeError(f"attempt {attempts[n]} of {n} fails on purpose")


@dq.actor(max_retries=0, throws=(ZeroDivisionError,))
def divide(x: int, y: int) -> float:
    """Divide; dividing by 0 is dead-lettered at once (``throws``: no retry)."""
    return x / y


def main() -> int:
    logging.basicConfig(level=logging.CRITICAL)  # the summary below says it all
    start = time.perf_counter()
    n = 1000
    for i in range(n):
        count_words.send(f"message number {i} has exactly seven words")
    for i in range(5):
        flaky.send(i)
    count_words.send_with_options(args=("a delayed hello",), delay=300)
    # The pipeline passes add's result to double, so double's message has no args yet.
    (add.message(20, 1) | double.message_with_options()).run()
    divide.send(1, 0)
    print(f"enqueued {n + 9} messages on {sorted(broker.get_declared_queues())}")

    worker = dq.Worker(broker, worker_threads=4, worker_timeout=50)
    worker.start()
    for queue_name in ("default", "maths"):
        broker.join(queue_name, timeout=30_000, fail_fast=False)
    worker.join()
    worker.stop()

    elapsed = time.perf_counter() - start
    counts = tally.counts
    retried = counts["failed attempts"] - counts["dead-lettered"]
    print(
        f"processed {counts['processed']}, retried {retried}, "
        f"dead-lettered {counts['dead-lettered']} in {elapsed:.2f}s"
    )
    print(f"words counted: {words['total']}, pipeline (20 + 1) * 2 = {words['pipeline result']}")
    for proxy in broker.dead_letters:
        print(f"dead letter: {proxy} -> {type(proxy._exception).__name__}: {proxy._exception}")
    ok = (
        counts["processed"] == n + 1 + 5 + 2
        and counts["dead-lettered"] == 1
        and words["total"] == 7 * n + 3
        and words["pipeline result"] == 42
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
