"""Dramatiq's semi-public ``do_<command>`` calls of its Redis broker, as explicit
methods (`DramatiqCalls`, a base class of `RedisBroker`).

Each runs one atomic script on the server, as Dramatiq's do: ``do_enqueue(queue, id,
data)``, ``do_fetch(queue, n)`` (the payloads, oldest first), ``do_ack(queue, id)``,
``do_nack(queue, id)``, ``do_requeue(queue, *ids)``, ``do_purge(queue)`` and
``do_qsize(queue)``. Any other ``do_*`` name is an ``AttributeError``, like any
unknown attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dq import _sources as runtime
from dq.brokers.redis import _calls, _resp
from dq.brokers.redis._keys import Keys

__all__ = ["DramatiqCalls"]


class _Broker(Protocol):
    """What the calls need of the broker they are methods of."""

    broker_id: str
    _keys: Keys

    @property
    def max_unpack(self) -> int: ...

    def _run(self, name: str, keys: Sequence[str], args: Sequence[_resp.Arg]) -> _resp.Reply: ...

    def _stored_name(self, queue_name: str) -> str: ...

    def qsize(self, queue_name: str) -> int: ...


class DramatiqCalls:
    """Dramatiq's ``do_*`` methods of its Redis broker."""

    def do_enqueue(self: _Broker, queue_name: str, rid: str, data: bytes) -> None:
        """Store ``data`` on ``queue_name`` under the redis_message_id ``rid``.

        Raises:
            InvalidQueueName: the name collides with a key of the broker.
        """
        self._stored_name(queue_name)
        _calls.enqueue(self._run, self._keys, queue_name, rid, data)

    def do_fetch(self: _Broker, queue_name: str, n: int) -> list[bytes]:
        """Reserve up to ``n`` messages of ``queue_name``; return their payloads."""
        reserved = _calls.reserve(
            self._run,
            self._keys,
            self.broker_id,
            queue_name,
            min(n, self.max_unpack),
            runtime.get_clock().now_ms(),
        )
        return [payload for _, payload in reserved.messages]

    def do_ack(self: _Broker, queue_name: str, rid: str) -> None:
        """Forget the message ``rid`` this broker holds on ``queue_name``."""
        _calls.ack(self._run, self._keys, self.broker_id, queue_name, (rid,))

    def do_nack(self: _Broker, queue_name: str, rid: str) -> None:
        """Dead-letter the message ``rid`` this broker holds on ``queue_name``."""
        now_ms = runtime.get_clock().now_ms()
        _calls.nack(self._run, self._keys, self.broker_id, queue_name, (rid,), now_ms)

    def do_requeue(self: _Broker, queue_name: str, *rids: str) -> None:
        """Return messages this broker holds on ``queue_name`` to its tail."""
        _calls.requeue(self._run, self._keys, self.broker_id, queue_name, rids)

    def do_purge(self: _Broker, queue_name: str) -> int:
        """Drop the waiting messages of ``queue_name`` (and its canonical queue's dead
        letters); return how many were waiting."""
        return _calls.flush(self._run, self._keys, queue_name)

    def do_qsize(self: _Broker, queue_name: str) -> int:
        """How many messages of ``queue_name`` and its ``.DQ`` are stored."""
        return self.qsize(queue_name)
