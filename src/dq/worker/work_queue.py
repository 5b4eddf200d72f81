"""The worker's work queue: the messages its consumer threads took, waiting for a
worker thread, in order of actor priority, then arrival."""

from __future__ import annotations

import heapq
import itertools
import queue as _queue
import threading

from dq.broker import Consumer, MessageProxy

__all__ = ["WorkItem", "WorkQueue"]

_allocate_lock = threading.Lock

#: Work items: (actor priority, arrival order, message, its consumer).
WorkItem = tuple[int, int, MessageProxy, Consumer]


class WorkQueue:
    """The worker's in-memory queue: lowest actor priority first, then arrival order.

    Items sit in a heap under a plain lock. An idle worker thread parks on a lock of
    its own; a put wakes one parked thread only when no other is already on its way,
    and a thread that takes an item wakes the next parked one while items are left (a
    chain), so that items behind an actor that blocks are taken by other threads. A
    burst of puts thus wakes threads one at a time, as fast as they get going, rather
    than one per item (each wake-up is a context switch, and under the GIL most of
    them would only find the items taken already). Parked threads are woken last-in,
    first-out: the threads that just ran stay the busy ones. ``join`` waits until
    every item taken was marked done (`task_done`).
    """

    def __init__(self) -> None:
        self._heap: list[WorkItem] = []
        self._arrivals = itertools.count()  # the FIFO tie-break, shared by all consumers
        self._lock = threading.Lock()
        self._parked: list[threading.Lock] = []  # idle threads' locks (held), a stack
        self._waking = 0  # threads unparked and not yet back in `get`'s locked section
        self._wakes = 0  # `wake` calls not yet taken by a thread (each raises Empty once)
        self._queued: dict[Consumer, int] = {}  # items waiting here, by consumer
        self._drain_waiters: dict[Consumer, threading.Lock] = {}  # see wait_drained
        self._unfinished = 0
        self._all_done = threading.Condition(threading.Lock())
        self._joining = 0  # threads in join(): task_done notifies only when some wait

    def put(
        self, priority: int, message: MessageProxy, consumer: Consumer, *, wake: bool = True
    ) -> None:
        """Add a message and, if no thread is already on its way, wake one idle thread.

        Messages are ordered by ``priority`` (lower first), then by when they were
        put here, whichever consumer they come from. With ``wake=False`` nobody is
        woken: the caller puts more at once and then calls `notify`.
        """
        item = (priority, next(self._arrivals), message, consumer)
        with self._lock:
            heapq.heappush(self._heap, item)
            self._unfinished += 1
            queued = self._queued
            queued[consumer] = queued.get(consumer, 0) + 1
            if wake and self._parked and not self._waking:
                self._waking = 1
                self._parked.pop().release()

    def notify(self) -> None:
        """Wake one idle thread if items wait and no thread is already on its way."""
        with self._lock:
            if self._heap and self._parked and not self._waking:
                self._waking = 1
                self._parked.pop().release()

    def get(self, timeout: float | None = None, *, done: bool = False) -> WorkItem:
        """Take the first item, waiting up to ``timeout`` seconds.

        With ``done``, first mark the item the caller took before as processed (as
        `task_done` does, in the same locked step).

        Raises:
            queue.Empty: nothing arrived in time, or the caller was woken (`wake`)
                with nothing to take.
        """
        with self._lock:
            if done:
                self._unfinished -= 1
                if not self._unfinished and self._joining:
                    self._notify_all_done()
            if self._heap:
                return self._take()
            if self._wakes:
                self._wakes -= 1
                raise _queue.Empty
            park = _allocate_lock()
            park.acquire()
            self._parked.append(park)
        woken = park.acquire(True, -1 if timeout is None else timeout)
        with self._lock:
            if woken or park not in self._parked:
                self._waking -= 1  # whoever unparked us counted us
            else:
                self._parked.remove(park)  # timed out
            if self._heap:
                return self._take()
        raise _queue.Empty

    def get_nowait(self) -> WorkItem:
        """Take the first item without waiting.

        Raises:
            queue.Empty: there is none.
        """
        with self._lock:
            if self._heap:
                return self._take()
        raise _queue.Empty

    def _take(self) -> WorkItem:
        """Pop the first item; wake the next idle thread if items are left (call with
        the lock held)."""
        item = heapq.heappop(self._heap)
        if self._heap and self._parked and not self._waking:
            self._waking = 1
            self._parked.pop().release()
        consumer = item[3]
        left = self._queued[consumer] - 1
        if left:
            self._queued[consumer] = left
        else:
            del self._queued[consumer]
            if self._drain_waiters:
                waiter = self._drain_waiters.pop(consumer, None)
                if waiter is not None:
                    waiter.release()
        return item

    def wait_drained(self, consumer: Consumer, timeout: float) -> None:
        """Wait until no item of ``consumer`` waits here (taken, not necessarily done),
        or for ``timeout`` seconds."""
        with self._lock:
            if consumer not in self._queued:
                return
            waiter = _allocate_lock()
            waiter.acquire()
            self._drain_waiters[consumer] = waiter
        if not waiter.acquire(True, timeout):
            with self._lock:
                if self._drain_waiters.get(consumer) is waiter:
                    del self._drain_waiters[consumer]

    def wake(self, n: int) -> None:
        """Wake up to ``n`` threads blocked in `get`, or about to block there: they get
        `queue.Empty` if nothing is waiting. Stopping and pausing use it, so no thread
        depends on its timeout to notice."""
        with self._lock:
            for _ in range(n):
                if self._parked:
                    self._waking += 1
                    self._parked.pop().release()
                else:
                    self._wakes += 1

    def task_done(self) -> None:
        """Mark one item taken earlier as processed."""
        with self._lock:
            self._unfinished -= 1
            finished = self._unfinished == 0
        if finished and self._joining:
            self._notify_all_done()

    def _notify_all_done(self) -> None:
        with self._all_done:
            self._all_done.notify_all()

    def join(self) -> None:
        """Block until every item put was marked done."""
        with self._all_done:
            self._joining += 1
            try:
                while self._unfinished:
                    self._all_done.wait(0.1)
            finally:
                self._joining -= 1

    @property
    def unfinished_tasks(self) -> int:
        """Items put and not yet marked done."""
        return self._unfinished

    def qsize(self) -> int:
        """Items waiting (not yet taken)."""
        return len(self._heap)
