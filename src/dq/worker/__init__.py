"""`dq.worker`: the worker's public names (Dramatiq 2.2.1's ``dramatiq.worker``).

A `Worker` runs one `ConsumerThread` per declared queue and per delay queue, and
``worker_threads`` `WorkerThread`s. Consumer threads take messages from the broker
and put ready ones on one in-memory priority queue (`WorkQueue`: lower actor
``priority`` first, arrival order among equals); delayed ones are held in memory
until their eta and then promoted to their canonical queue (atomically, when the
consumer can). Worker threads run the actors and settle each message directly on
its consumer: ack after success (storing first the retry a middleware asked for),
nack when a middleware failed the message, requeue when a middleware asked for
redelivery.

Messages that cannot run are dead-lettered, each with its reason
(`MessageProxy.death_reason`): an invalid ``eta`` (`DeathReason.BAD_ETA`, by the
consumer thread, which goes on with the others), an option value dq cannot honour
(`DeathReason.BAD_OPTIONS`, before its actor runs), and a settlement that cannot be
stored for any reason but the connection, such as a retry the broker refuses
(`DeathReason.UNSTORABLE`; this frees the message's prefetch slot). Only while the
broker is unreachable does a worker thread keep trying to settle a message.

A message its consumer suspects (`Consumer.suspect`: a worker died holding it)
runs alone: no other message of the worker runs meanwhile (`RunGate`).

The modules of the package, one job each:

* `dq.worker.processing`: running one message through its middleware and actor,
  and settling it (shared with the single-threaded `dq.runtime.Runner`);
* `dq.worker.work_queue`: the in-memory priority queue;
* `dq.worker.gate`: the gate that lets a suspect run alone;
* `dq.worker.threads`: the consumer and worker threads;
* `dq.worker.worker`: `Worker`, which starts, pauses and stops them;
* `dq.worker.tuning`: the tuning constants read from the environment.
"""

from __future__ import annotations

from dq.worker.gate import RunGate
from dq.worker.processing import ReplacementStored, has_results_middleware, process_message
from dq.worker.threads import ConsumerThread, WorkerThread
from dq.worker.tuning import (
    CONSUMER_RESTART_DELAY,
    CONSUMER_RESTART_DELAY_SECS,
    DELAY_QUEUE_PREFETCH,
    POST_PROCESS_MESSAGE_RETRY_DELAY_SECS,
    QUEUE_PREFETCH,
    WORKER_TIMEOUT,
)
from dq.worker.work_queue import WorkQueue
from dq.worker.worker import Worker

__all__ = [
    "CONSUMER_RESTART_DELAY",
    "CONSUMER_RESTART_DELAY_SECS",
    "DELAY_QUEUE_PREFETCH",
    "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS",
    "QUEUE_PREFETCH",
    "WORKER_TIMEOUT",
    "ConsumerThread",
    "ReplacementStored",
    "RunGate",
    "WorkQueue",
    "Worker",
    "WorkerThread",
    "has_results_middleware",
    "process_message",
]
