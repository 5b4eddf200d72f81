"""The wake-up pair of RedisBroker: idle consumers wait on a `Waker`, and a `Listener`
thread moves it on when an enqueue is published.

Enqueue scripts publish on the channel ``ns:__dq__.notify.Q`` (pub/sub: no key is
written). The listener subscribes to every queue's channel with one pattern and bumps
that queue's generation; a consumer with nothing to fetch waits until its queue's
generation moves past the one it saw before fetching, or its timeout passes (it still
polls, for messages enqueued by Dramatiq producers, which do not publish).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from dq.brokers.redis._keys import glob_escape
from dq.brokers.redis._transport import ERRORS, Subscriber

__all__ = ["Listener", "Waker"]


class Waker:
    """Per-queue wake-up generations: consumers wait until theirs moves on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation: dict[str, int] = {}

    def generation(self, queue_name: str) -> int:
        """The current generation of ``queue_name`` (what `wait` compares with)."""
        return self._generation.get(queue_name, 0)

    def notify(self, queue_name: str) -> None:
        """Move ``queue_name`` on and wake its waiters."""
        with self._cond:
            self._generation[queue_name] = self._generation.get(queue_name, 0) + 1
            self._cond.notify_all()

    def notify_all(self) -> None:
        """Move every queue on and wake every waiter."""
        with self._cond:
            for name in self._generation:
                self._generation[name] += 1
            self._cond.notify_all()

    def wait(self, queue_name: str, generation: int, timeout: float) -> None:
        """Wait up to ``timeout`` s unless ``queue_name`` moved past ``generation``."""
        with self._cond:
            if self._generation.get(queue_name, 0) == generation:
                self._cond.wait(timeout)


class Listener(threading.Thread):
    """Turns enqueue notifications (pub/sub) into wake-ups, reconnecting as needed.

    Args:
        name: the thread's name.
        channel_prefix: the channels' common prefix (`Keys.channel` of ``""``); what
            follows it is the queue name.
        new_subscriber: opens a pub/sub connection.
        waker: what to move on.
        logger: where connection losses are logged.
    """

    def __init__(
        self,
        name: str,
        channel_prefix: str,
        new_subscriber: Callable[[], Subscriber],
        waker: Waker,
        logger: logging.Logger,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.stopped = threading.Event()
        self.ready = threading.Event()
        self._pattern = glob_escape(channel_prefix) + "*"
        self._prefix = len(channel_prefix.encode())
        self._new_subscriber = new_subscriber
        self._waker = waker
        self._logger = logger

    def run(self) -> None:
        waker = self._waker
        while not self.stopped.is_set():
            subscriber = self._new_subscriber()
            try:
                subscriber.psubscribe(self._pattern)
                self.ready.set()
                # Anything published while we were (re)connecting was missed: poll now.
                waker.notify_all()
                while not self.stopped.is_set():
                    message = subscriber.get_message(timeout=0.5)
                    if message is not None:
                        waker.notify(message.channel[self._prefix :].decode())
            except ERRORS:
                if not self.stopped.is_set():
                    self._logger.warning(
                        "Lost the notification connection; reconnecting.", exc_info=True
                    )
                    self.stopped.wait(0.5)
            except Exception:
                self._logger.exception("Notification listener failed; restarting it.")
                self.stopped.wait(0.5)
            finally:
                with contextlib.suppress(Exception):  # closing a broken connection
                    subscriber.close()
