"""The run gate: lets a message its consumer suspects run alone among a worker's
threads (`Consumer.suspect`: a worker died holding it)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

__all__ = ["RunGate", "Runs"]

#: How long a thread waits at the `RunGate` before it looks again anyway (a safety net:
#: every change notifies).
_GATE_POLL_SECS = 0.5


class Runs(Protocol):
    """A thread that runs messages (`dq.worker.WorkerThread`)."""

    #: Whether it runs (or settles) an ordinary message.
    busy: bool


class RunGate:
    """Lets a suspect message run alone among a worker's threads.

    A reader-writer gate: ordinary messages share it, a suspect (`Consumer.suspect`)
    takes it exclusively. A suspect waits until the messages running finish, and
    ordinary messages that arrive meanwhile wait until it is done; suspects run one
    at a time. While no suspect waits or runs, an ordinary message only sets its
    thread's ``busy`` flag and reads `waiting` (no lock): a suspect first counts
    itself in `waiting`, then looks at the flags, so one of the two always sees the
    other (the interpreter orders these reads and writes).

    Args:
        threads: the worker threads (the list is read whenever a suspect arrives).
        single: the worker has one thread: every message runs alone.
    """

    def __init__(self, threads: Sequence[Runs], *, single: bool = False) -> None:
        self.threads = threads
        self.single = single
        #: Suspects waiting or running; ordinary messages take the slow path while > 0.
        self.waiting = 0
        self._alone: Runs | None = None  # the thread running a suspect
        self._changed = threading.Condition(threading.Lock())

    def enter_shared(self, thread: Runs) -> None:
        """The slow path of an ordinary message (``thread.busy`` set, `waiting` seen
        non-zero): wait until no suspect waits or runs."""
        with self._changed:
            thread.busy = False
            self._changed.notify_all()  # a suspect may wait for this thread
            while self.waiting:
                self._changed.wait(_GATE_POLL_SECS)
            thread.busy = True

    def left_shared(self) -> None:
        """An ordinary message is done (its ``busy`` flag cleared) while a suspect
        waits: let the suspect look again."""
        with self._changed:
            self._changed.notify_all()

    def enter_alone(self, thread: Runs) -> None:
        """Wait until ``thread`` may run a suspect: no other suspect runs and no other
        thread runs a message."""
        with self._changed:
            self.waiting += 1
            try:
                while self._alone is not None or any(
                    other.busy for other in self.threads if other is not thread
                ):
                    self._changed.wait(_GATE_POLL_SECS)
            except BaseException:
                self.waiting -= 1
                self._changed.notify_all()
                raise
            self._alone = thread

    def leave_alone(self) -> None:
        """The suspect is settled: let the others go on."""
        with self._changed:
            self._alone = None
            self.waiting -= 1
            self._changed.notify_all()
