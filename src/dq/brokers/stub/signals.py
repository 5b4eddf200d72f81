"""`Signal`: the wake-up primitive of `dq.brokers.stub.StubBroker`, a condition on the
broker's one lock that knows whether anyone waits on it (so a step that changes
nothing anyone waits for signals nobody).
"""

from __future__ import annotations

import threading

__all__ = ["Signal"]

_allocate_lock = threading.Lock


class Signal:
    """A condition on the broker's lock that knows whether anyone waits on it.

    `threading.Condition`'s protocol, without its generality: a waiter parks on a
    lock of its own, which ``notify_all`` releases.
    """

    __slots__ = ("_all", "_lock", "_parked", "_waiters")

    def __init__(self, lock: threading.Lock, waiting: list[int]) -> None:
        self._lock = lock
        self._parked: list[threading.Lock] = []  # waiters not notified yet
        self._waiters = 0
        self._all = waiting  # the broker's count of waiters on all its signals

    def wait(self, timeout: float | None) -> None:
        """Wait to be woken or for ``timeout`` seconds (call with the lock held; it
        is released while waiting and held again on return)."""
        park = _allocate_lock()
        park.acquire()
        self._parked.append(park)
        self._waiters += 1
        self._all[0] += 1
        self._lock.release()
        try:
            park.acquire(True, -1 if timeout is None else timeout)
        finally:
            self._lock.acquire()
            self._waiters -= 1
            self._all[0] -= 1
            if self._parked and park in self._parked:  # timed out: not notified
                self._parked.remove(park)

    def notify_all(self) -> None:
        """Wake every waiter, if any (call with the lock held)."""
        if self._parked:
            for park in self._parked:
                park.release()
            self._parked.clear()
