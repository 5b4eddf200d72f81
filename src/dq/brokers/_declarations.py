"""Queue declarations that live in one process (the Redis and SQLite brokers).

Neither broker writes a declaration to its server: a queue exists there once a message
is stored on it. What a process declares is a core state with no messages, and the
core's `DeclareQueue` transition decides what a declaration does; its events drive the
declare hooks (a running Worker starts its consumers on them).
"""

from __future__ import annotations

import threading

from dq.broker import Broker
from dq.brokers._checks import StoredQueueNames
from dq.core import DeclareQueue, apply, initial_state, policy
from dq.core import events as ev

__all__ = ["LocalDeclarations"]


class LocalDeclarations:
    """The queues one broker declared in this process.

    Args:
        names: the broker's check of queue names (a name no message may be stored on
            cannot be declared).
    """

    def __init__(self, names: StoredQueueNames) -> None:
        self._names = names
        self._state = initial_state()
        self._lock = threading.Lock()

    def declare(self, broker: Broker, queue_name: str) -> None:
        """Declare ``queue_name`` (a queue or its ``.DQ``) and its delay queue on
        ``broker``, with the declare hooks (they get canonical names); a no-op when
        declared already.

        Raises:
            InvalidQueueName: no message may be stored on ``queue_name`` (a ``.XQ``
                name, or one colliding with a broker's keys).
        """
        self._names.check(queue_name)
        canonical = policy.q_name(queue_name)
        with self._lock:
            if canonical in self._state.queues:
                return
            broker._run_before(broker._hooks.before_declare_queue, canonical)
            step = apply(self._state, DeclareQueue(canonical))
            self._state = step.state
            for event in step.events:
                if isinstance(event, ev.QueueDeclared):
                    broker.queues[event.queue_name] = event.queue_name
                    broker._run_after(broker._hooks.after_declare_queue, event.queue_name)
                elif isinstance(event, ev.DelayQueueDeclared):
                    broker.delay_queues.add(event.queue_name)
                    broker._run_after(broker._hooks.after_declare_delay_queue, event.queue_name)
