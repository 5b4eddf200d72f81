"""The runtime seam: where time, ids and random draws come from, and `Runner`, a
runtime without threads.

The pure core takes time and ids as arguments; everything that needs them asks a
`Clock`, an `IdSource` or a `RandomSource`. The defaults read the system clock and
the operating system's random source; a custom runtime (or a deterministic test)
installs its own with `set_clock` / `set_id_source` / `set_random`. (They live in
`dq._sources`, below the rest of dq, and are re-exported here.)

`Runner` processes messages in the calling thread, one step at a time, with the
worker's processing (`dq.worker.processing`): the seam for embedding dq in another
runtime.
"""

from __future__ import annotations

import heapq
import itertools

from dq._sources import (
    Clock,
    IdSource,
    RandomSource,
    SystemClock,
    UUID4Source,
    get_clock,
    get_id_source,
    get_random,
    set_clock,
    set_id_source,
    set_random,
)
from dq.broker import Broker, Consumer, MessageProxy
from dq.core import DeathReason, InvalidValue, policy
from dq.errors import ActorNotFound
from dq.logging import get_logger
from dq.worker.processing import (
    LOGGER_NAME,
    dead_letter,
    mark_started,
    process_message,
    promote,
    settle_or_dead_letter,
)

__all__ = [
    "Clock",
    "IdSource",
    "RandomSource",
    "Runner",
    "SystemClock",
    "UUID4Source",
    "get_clock",
    "get_id_source",
    "get_random",
    "set_clock",
    "set_id_source",
    "set_random",
]


class Runner:
    """Processes messages in the calling thread, one step at a time, with no threads
    and no sleeps: the seam for embedding dq in another runtime (an event loop, a
    simulation, a deterministic test).

    Time is the runtime clock's (`dq.runtime.set_clock`), so with a fake clock a test
    decides when delayed messages and retries come due. Each `step` takes what the
    broker has ready, promotes held delayed messages whose eta has passed, then runs
    one ready message (lowest actor priority first, oldest first) and settles it, as
    a `Worker` would. Middleware that need threads of their own (TimeLimit,
    ShutdownNotifications) have nothing to interrupt here.

    Args:
        broker: the broker.
        queues: canonical queue names to consume (None: every declared queue).
        prefetch: how many messages each consumer may hold.
    """

    def __init__(
        self, broker: Broker, *, queues: set[str] | None = None, prefetch: int = 100
    ) -> None:
        self.broker = broker
        self.logger = get_logger(LOGGER_NAME, type(self))
        self.prefetch = prefetch
        self.whitelist = set(queues) if queues else None
        self.consumers: dict[str, Consumer] = {}
        self.ready: list[tuple[int, int, MessageProxy, Consumer]] = []
        self.delayed: list[tuple[int, int, MessageProxy, Consumer]] = []
        self._order = itertools.count()

    def _sync_consumers(self) -> None:
        for name in sorted(
            self.broker.get_declared_queues() | self.broker.get_declared_delay_queues()
        ):
            if name in self.consumers or name.endswith(policy.DEAD_SUFFIX):
                continue
            if self.whitelist and policy.q_name(name) not in self.whitelist:
                continue
            self.consumers[name] = self.broker.consume(name, prefetch=self.prefetch, timeout=0)

    def _take(self) -> None:
        for consumer in self.consumers.values():
            for message in consumer:
                try:
                    eta = (
                        policy.message_eta_ms(message.message) if "eta" in message.options else None
                    )
                except InvalidValue as e:  # it can never come due (see ConsumerThread)
                    self.logger.error(
                        "Dead-lettering message %s (actor %r) of %r: %s.",
                        message.message_id,
                        message.actor_name,
                        message.queue_name,
                        e,
                    )
                    message.stuff_exception(e)
                    dead_letter(self.broker, consumer, message, DeathReason.BAD_ETA, self.logger)
                    continue
                if eta is not None:
                    self.broker._run_before(self.broker._hooks.before_delay_message, message)
                    heapq.heappush(self.delayed, (eta, next(self._order), message, consumer))
                    continue
                try:
                    priority = self.broker.get_actor(message.actor_name).priority
                except ActorNotFound:
                    priority = 0
                heapq.heappush(self.ready, (priority, next(self._order), message, consumer))

    def _promote_due(self) -> int:
        now = get_clock().now_ms()
        promoted = 0
        while self.delayed and self.delayed[0][0] <= now:
            _, _, message, consumer = heapq.heappop(self.delayed)
            promote(self.broker, consumer, message)
            promoted += 1
        return promoted

    def step(self) -> bool:
        """Do one unit of work; return False when there was nothing to do now."""
        self._sync_consumers()
        self._take()
        promoted = self._promote_due()
        if promoted:
            self._take()
        if not self.ready:
            return promoted > 0
        _, _, message, consumer = heapq.heappop(self.ready)
        # One message at a time: each runs alone, suspects included.
        mark_started(consumer, message, self.logger, alone=True)
        process_message(self.broker, message, self.logger)
        settle_or_dead_letter(self.broker, consumer, message, self.logger)
        return True

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Step until nothing is ready and nothing held is due; return the steps taken.

        Raises:
            RuntimeError: ``max_steps`` were taken and there is still work (a loop).
        """
        for steps in range(max_steps):
            if not self.step():
                return steps
        raise RuntimeError(f"still busy after {max_steps} steps")

    def next_eta_ms(self) -> int | None:
        """When the earliest held delayed message comes due (None: none is held)."""
        return self.delayed[0][0] if self.delayed else None

    def close(self) -> None:
        """Return every message taken and not processed to the broker; close consumers."""
        for items in (self.ready, self.delayed):
            for _, _, message, consumer in items:
                consumer.requeue([message])
            items.clear()
        for consumer in self.consumers.values():
            consumer.close()
        self.consumers.clear()
