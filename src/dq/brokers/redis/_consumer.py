"""The consumer of one Redis queue (`RedisConsumer`): fetches in batches with
``reserve.lua``, waits for wake-ups when idle, settles with one script per batch, and
reports the starts of suspects.

A *suspect* is a message a consumer died holding before (the reserve script says so):
the worker runs it alone and reports its start (`RedisConsumer.started`, a run mark
written by ``start.lua``), so a death while it runs is charged to it alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from dq import _sources as runtime
from dq import message as _message
from dq.broker import MessageProxy
from dq.brokers._buffered import BufferedConsumer
from dq.brokers.redis import _calls, _resp
from dq.brokers.redis._recovery import SHARED_MARK
from dq.brokers.redis._transport import RedisConnectionClosed
from dq.core import Ack, DeathReason, Nack, Requeue, policy
from dq.core import commands as _commands
from dq.message import Message
from dq.wire import encode_message

if TYPE_CHECKING:
    from dq.brokers.redis import RedisBroker

__all__ = ["RedisConsumer", "rid_of"]

M = TypeVar("M", bound=Message[Any])

#: How long a consumer waits before it fetches again from a key of the wrong type (s).
_BROKEN_KEY_BACKOFF = 30.0


class RedisConsumer(BufferedConsumer[str]):
    """A consumer of one Redis queue.

    When its buffer is empty it fetches as many messages as its free prefetch allows
    (at most the unpack limit) in one script call, once at least half its prefetch
    window is free, then hands them out one per ``next()``. With nothing to fetch it
    waits for an enqueue notification, or ``timeout`` ms. ``ack``, ``nack``,
    ``requeue`` and ``promote`` are thread-safe: worker threads settle directly, and
    acks arriving while another thread sends a batch join the next batch.
    """

    #: What it holds lives in Redis under this process's id, not in a connection: after
    #: a connection error the worker keeps using it (and the messages it holds).
    survives_connection_loss = True

    broker: RedisBroker

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._room = threading.Condition(self._lock)  # prefetch room freed
        self._suspects: set[str] = set()  # recovered from dead workers before
        self._broken_until = 0.0  # monotonic time before which no fetch is tried
        broker._consumers.add(self)

    def _known(self) -> set[str]:
        """The ids this consumer holds in any form (buffered, handed out, acked but
        not yet sent)."""
        with self._lock:
            return {rid for rid, _ in self._buffer} | set(self._held) | set(self._acks)

    @property
    def _outstanding(self) -> int:
        return len(self._buffer) + len(self._held)

    def _tag(self, message: MessageProxy) -> str:
        return rid_of(message)

    def _dead_letter(self, tag: str) -> None:
        self._send(Nack, [tag], DeathReason.UNDECODABLE)

    def _send_ack_batch(self, batch: list[str]) -> None:
        broker = self.broker
        _calls.ack(broker._run, broker._keys, broker.broker_id, self.queue_name, batch)

    def _room_freed(self) -> None:
        with self._room:
            self._room.notify_all()

    def _forget(self, tags: list[str]) -> None:
        if self._suspects:  # a settled suspect is no longer this consumer's concern
            with self._lock:
                self._suspects.difference_update(tags)
        super()._forget(tags)

    def _fetch(self, deadline: float) -> bool:
        """Fill the buffer, waiting until ``deadline``; return whether it has items."""
        broker = self.broker
        queue_name = self.queue_name
        while True:
            with self._lock:
                room = self.prefetch - self._outstanding
                while room < self._min_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed:
                        return False
                    self._room.wait(remaining)
                    room = self.prefetch - self._outstanding
                pause = self._broken_until - time.monotonic()
                if pause > 0:  # a key of the wrong type: back off, do not crash-loop
                    self._room.wait(min(pause, max(0.0, deadline - time.monotonic())))
                    if time.monotonic() >= deadline or self._closed:
                        return False
                    continue
            generation = broker._waker.generation(queue_name)
            limit = min(room, broker.max_unpack)
            with broker._fetch_lock(queue_name):
                try:
                    reserved = _calls.reserve(
                        broker._run,
                        broker._keys,
                        broker.broker_id,
                        queue_name,
                        limit,
                        runtime.get_clock().now_ms(),
                    )
                except _resp.ResponseError as e:
                    if not str(e).startswith("WRONGTYPE"):
                        raise
                    self._wrong_type(e)
                    continue
                if reserved.messages:
                    with self._lock:
                        self._buffer.extend(reserved.messages)
                        if reserved.suspects:
                            self._suspects |= reserved.suspects
            broker._maybe_maintain()
            if reserved.messages:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            broker._waker.wait(queue_name, generation, remaining)
            if time.monotonic() >= deadline and broker._waker.generation(queue_name) == generation:
                return False  # no notification came in time

    def _wrong_type(self, error: _resp.ResponseError) -> None:
        """Log that reserving met a key somebody else wrote, and back off."""
        self._broken_until = time.monotonic() + _BROKEN_KEY_BACKOFF
        keys = self.broker._keys
        self.broker.logger.error(
            "Cannot reserve messages of %r: %s (keys %s); somebody else wrote that key. "
            "Retrying in %.0f s.",
            self.queue_name,
            error,
            ", ".join(
                (
                    keys.queue(self.queue_name),
                    keys.msgs(self.queue_name),
                    keys.acks(self.broker.broker_id, self.queue_name),
                )
            ),
            _BROKEN_KEY_BACKOFF,
        )

    def _send(
        self,
        command: type[_commands.Command],
        rids: list[str],
        reason: DeathReason = DeathReason.NACKED,
    ) -> None:
        """Settle ``rids`` now (``command``: `Ack`, `Nack` or `Requeue`) and free their
        prefetch slots."""
        broker = self.broker
        try:
            _calls.settle(
                broker._run,
                broker._keys,
                broker.broker_id,
                command,
                self.queue_name,
                rids,
                runtime.get_clock().now_ms(),
                reason,
            )
        finally:
            self._forget(rids)

    def suspect(self, message: MessageProxy) -> bool:
        """Whether a consumer died holding ``message`` before (its delivery count in
        Redis is at least one, as the reserve script said): the worker then runs it
        alone, so a death while it runs is charged to it alone."""
        return bool(self._suspects) and rid_of(message) in self._suspects

    def started(self, message: MessageProxy, *, alone: bool) -> None:
        """Record that ``message`` starts running (``alone``: nothing else runs in this
        process meanwhile), if it is a suspect: its run mark (`dq.core.Start`, one
        ``start.lua`` call). If this process dies while it runs alone, recovery
        counts one more delivery towards ``max_deliveries``. Nothing is written for
        other messages (no lock taken either).

        Raises:
            ConnectionClosed: Redis could not be reached.
        """
        if not self._suspects:  # the common case: costs nothing
            return
        rid = rid_of(message)
        if rid not in self._suspects:
            return
        broker = self.broker
        worker = broker.broker_id
        mark = worker if alone else worker + SHARED_MARK
        _calls.start(broker._run, broker._keys, worker, self.queue_name, rid, mark)

    def nack(self, message: MessageProxy) -> None:
        """Dead-letter ``message``.

        Raises:
            ConnectionClosed: Redis could not be reached (nothing changed).
        """
        self._send(Nack, [rid_of(message)], message.death_reason)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Return unprocessed ``messages`` to the tail of their queue, in one call."""
        rids = [rid_of(message) for message in messages]
        if rids:
            self._send(Requeue, rids)

    def promote(self, message: MessageProxy) -> Message[Any]:
        """Move a held delayed message to its canonical queue in one step.

        Returns:
            The promoted copy as stored (canonical queue, no ``eta``, a new
            ``redis_message_id``).
        """
        promoted = policy.promoted(message.message)
        return self._replace(message, promoted, None, hooks=False, script="promote")

    def replace(self, message: MessageProxy, new: M, delay: int | None, *, hooks: bool = True) -> M:
        """Store ``new`` (after ``delay`` ms) and ack ``message`` in one step.

        This is how a retry is stored: if this consumer no longer holds ``message``
        (another worker recovered it), nothing is stored and it runs again instead.

        Returns:
            ``new`` as stored.

        Raises:
            BrokerOutOfMemory: Redis is at ``maxmemory`` (nothing changed).
            ConnectionClosed: Redis could not be reached (nothing changed).
        """
        return self._replace(message, new, delay, hooks=hooks, script="replace")

    def _replace(
        self,
        message: MessageProxy,
        new: M,
        delay: int | None,
        *,
        hooks: bool,
        script: Literal["replace", "promote"],
    ) -> M:
        """`replace` or `promote` (``script``) ``message`` with ``new``."""
        broker = self.broker
        old = rid_of(message)
        if hooks:
            stored, payload = broker._prepare(new, delay, runtime.get_clock().now_ms())
        else:
            stored = new.copy(options={"redis_message_id": runtime.get_id_source().new_id()})
            payload = encode_message(stored, _message.global_encoder)
        call = _calls.replace if script == "replace" else _calls.promote
        try:
            replaced = call(
                broker._run,
                broker._keys,
                broker.broker_id,
                self.queue_name,
                old,
                _calls.Stored(stored.queue_name, stored.options["redis_message_id"], payload),
            )
        finally:
            self._forget([old])
        if not replaced:
            broker.logger.warning(
                "Message %s on %r was recovered by another worker before it could be "
                "replaced; it will run again.",
                message.message_id,
                self.queue_name,
            )
        elif hooks and broker._hooks.after_enqueue:
            broker._run_after(broker._hooks.after_enqueue, stored, delay)
        return stored

    def close(self) -> None:
        """Send pending acks, and return every message this consumer holds (fetched
        or handed out, unsettled) to its queue."""
        try:
            self._close()
        finally:
            self.broker._consumers.discard(self)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            acked = set(self._acks)
            rids = [rid for rid in self._held if rid not in acked]
            rids += [rid for rid, _ in self._buffer]
            self._buffer.clear()
            self._room.notify_all()
        try:
            if self._acks:
                with self._lock:
                    self._sending = True
                self._send_acks()
            if rids:
                self._send(Requeue, rids)
        except RedisConnectionClosed:
            self.broker.logger.warning(
                "Could not return %d messages of %r: Redis is unreachable; this broker "
                "retries until it can (or they come back when its heartbeat expires).",
                len(rids),
                self.queue_name,
            )
            with self.broker._orphans_lock:
                self.broker._orphans.append((self.queue_name, Ack, list(self._acks)))
                self.broker._orphans.append((self.queue_name, Requeue, rids))
                self._acks.clear()


def rid_of(message: MessageProxy) -> str:
    """The redis_message_id a RedisBroker consumer tagged ``message`` with.

    Raises:
        ValueError: ``message`` was not delivered by a RedisBroker consumer.
    """
    tag = message._tag
    if not isinstance(tag, str):
        raise ValueError(
            f"{message!r} was not delivered by a RedisBroker consumer (it has no "
            "redis_message_id tag)"
        )
    return tag
