"""The keeper of a consuming RedisBroker: the thread that refreshes this process's
heartbeat and runs recovery on a timer.

Every ``heartbeat_interval`` ms it writes the heartbeat (``heartbeat.lua``) and retries
the settlements closed consumers could not send; every ``requeue_interval`` ms, or at
once when maintenance won the draw (`Keeper.wake`), it runs a recovery tick
(`dq.brokers.redis._recovery`) and returns the ids whose fetch reply was lost
(`RedisBroker.reconcile`). An unreachable Redis is logged once per outage.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from dq.brokers.redis._transport import RedisConnectionClosed

if TYPE_CHECKING:
    from dq.brokers.redis import RedisBroker

__all__ = ["Keeper"]


class Keeper(threading.Thread):
    """Refreshes ``broker``'s heartbeat and runs its recovery on a timer."""

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(name=f"dq-redis-keeper-{broker.broker_id[:8]}", daemon=True)
        self.broker = broker
        self.stopped = threading.Event()
        self.wake = threading.Event()  # run recovery now (maintenance won the draw)

    def run(self) -> None:
        broker = self.broker
        beat_every = broker.heartbeat_interval / 1000
        recover_every = broker.requeue_interval / 1000
        next_recovery = time.monotonic() + recover_every
        failing = False
        while not self.stopped.is_set():
            wait = beat_every
            try:
                broker.heartbeat()
                broker._settle_orphans()
                if self.wake.is_set() or time.monotonic() >= next_recovery:
                    self.wake.clear()
                    next_recovery = time.monotonic() + recover_every
                    broker.recover()
                    broker.reconcile()
                if failing:
                    failing = False
                    broker.logger.info("Redis is reachable again.")
                wait = min(beat_every, next_recovery - time.monotonic())
            except RedisConnectionClosed:
                if not failing:  # once per outage, not once per attempt
                    failing = True
                    broker.logger.warning(
                        "Heartbeat or recovery failed: Redis is unreachable; retrying every "
                        "%.2f s.",
                        beat_every,
                    )
            except Exception:
                broker.logger.exception("Heartbeat or recovery failed.")
            self.wake.wait(max(0.01, wait))
