"""`Worker`: runs a broker's messages in background threads, from start to stop.

A worker runs one `ConsumerThread` per declared queue and per delay queue (queues
declared later get theirs as they are declared) and ``worker_threads``
`WorkerThread`s, which share one `WorkQueue` and one `RunGate`. It pauses, resumes
and stops them; a stop returns every message not started to the broker.
"""

from __future__ import annotations

import queue as _queue
import threading
import time
from collections import defaultdict

from dq.broker import Broker, Consumer, MessageProxy
from dq.core import policy
from dq.logging import get_logger
from dq.middleware import Middleware
from dq.worker import tuning
from dq.worker.gate import RunGate
from dq.worker.processing import LOGGER_NAME
from dq.worker.threads import ConsumerThread, WorkerThread
from dq.worker.work_queue import WorkQueue

__all__ = ["Worker"]


class _WorkerMiddleware(Middleware):
    """Starts a consumer for every queue declared on the broker while the worker runs."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def after_declare_queue(self, broker: Broker, queue_name: str) -> None:
        self.worker._add_consumer(queue_name)

    def after_declare_delay_queue(self, broker: Broker, queue_name: str) -> None:
        self.worker._add_consumer(queue_name, delay=True)


class Worker:
    """Processes messages from a broker's queues in background threads.

    Args:
        broker: the broker.
        queues: canonical queue names to consume (None or empty: all). A queue's delay
            queue is consumed when the queue is.
        worker_timeout: ms consumers wait for messages and threads poll for work.
        worker_threads: how many messages run at once.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        queues: set[str] | None = None,
        worker_timeout: int = tuning.WORKER_TIMEOUT,
        worker_threads: int = 8,
    ) -> None:
        if worker_threads < 1:
            raise ValueError(f"worker_threads must be >= 1, got {worker_threads!r}")
        if worker_timeout < 1:
            raise ValueError(f"worker_timeout must be >= 1 ms, got {worker_timeout!r}")
        self.logger = get_logger(LOGGER_NAME, type(self))
        self.broker = broker
        self.consumers: dict[str, ConsumerThread] = {}
        self.consumer_whitelist = set(queues) if queues else None
        self.queue_prefetch = min(tuning.QUEUE_PREFETCH or worker_threads * 2, 65535)
        self.delay_prefetch = min(tuning.DELAY_QUEUE_PREFETCH or worker_threads * 1000, 65535)
        self.workers: list[WorkerThread] = []
        self.gate = RunGate(self.workers, single=worker_threads == 1)
        self.work_queue = WorkQueue()
        self.worker_timeout = worker_timeout
        self.worker_threads = worker_threads
        self._middleware: _WorkerMiddleware | None = None
        self._lock = threading.RLock()

    def start(self) -> None:
        """Start consuming every (whitelisted) queue, now and as they are declared."""
        broker = self.broker
        broker._run_before(broker._hooks.before_worker_boot, self)
        self._middleware = _WorkerMiddleware(self)
        broker.add_middleware(self._middleware)  # replays the declared queues
        for _ in range(self.worker_threads):
            self._add_worker()
        broker._run_after(broker._hooks.after_worker_boot, self)

    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        with self._lock:
            if queue_name in self.consumers:
                return
            canonical = policy.q_name(queue_name)
            if self.consumer_whitelist and canonical not in self.consumer_whitelist:
                return
            consumer = ConsumerThread(
                broker=self.broker,
                queue_name=queue_name,
                prefetch=self.delay_prefetch if delay else self.queue_prefetch,
                work_queue=self.work_queue,
                worker_timeout=self.worker_timeout,
            )
            self.consumers[queue_name] = consumer
            consumer.start()

    def _add_worker(self) -> None:
        worker = WorkerThread(
            broker=self.broker,
            consumers=self.consumers,
            work_queue=self.work_queue,
            worker_timeout=self.worker_timeout,
            gate=self.gate,
        )
        self.workers.append(worker)
        worker.start()

    def _threads(self) -> list[ConsumerThread | WorkerThread]:
        return [*self.consumers.values(), *self.workers]

    def pause(self) -> None:
        """Stop taking and running messages; returns once every thread is idle."""
        threads = self._threads()
        for thread in threads:
            thread.pause()
        self.work_queue.wake(len(self.workers))
        for thread in threads:
            while thread.is_alive() and not thread.paused_event.wait(0.05):
                pass

    def resume(self) -> None:
        """Go on after `pause`."""
        for thread in self._threads():
            thread.resume()

    def stop(self, timeout: int = 600000) -> None:
        """Stop: finish running messages (within ``timeout`` ms, shared by all threads),
        return every message not started to the broker, close the consumers."""
        broker = self.broker
        broker._run_before(broker._hooks.before_worker_shutdown, self)
        for worker in self.workers:
            worker.stop()
        self.work_queue.wake(len(self.workers))
        deadline = time.monotonic() + timeout / 1000
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for consumer in self.consumers.values():
            consumer.stop()
        for consumer in self.consumers.values():
            consumer.join()
        # Whatever is still in memory was never started: give it back.
        unstarted: dict[Consumer, list[MessageProxy]] = defaultdict(list)
        while True:
            try:
                _, _, message, owner = self.work_queue.get_nowait()
            except _queue.Empty:
                break
            unstarted[owner].append(message)
            self.work_queue.task_done()
        for consumer_thread in self.consumers.values():
            if consumer_thread.consumer is not None:
                consumer_thread.requeue_messages(unstarted.pop(consumer_thread.consumer, []))
            consumer_thread.close()
        for owner, messages in unstarted.items():  # consumers replaced after a restart
            owner.requeue(messages)
        if self._middleware is not None:
            broker._remove_middleware(self._middleware)
            self._middleware = None
        broker._run_after(broker._hooks.after_worker_shutdown, self)

    def join(self) -> None:
        """Block until every message taken is processed and no delayed one is held."""
        while True:
            self.work_queue.join()
            if any(c.delay_queue for c in self.consumers.values()):
                time.sleep(self.worker_timeout / 1000 / 10)
                continue
            if self.work_queue.unfinished_tasks:
                continue
            return
