"""`StubBackend`: results in memory, for tests and single-process use."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar, overload

from dq import _sources as runtime
from dq.results.backend import (
    Missing,
    MResult,
    Result,
    ResultBackend,
    StoredMessage,
    _timeout_ms,
)
from dq.results.errors import ResultMissing, ResultTimeout

if TYPE_CHECKING:
    from dq.encoder import Encoder
    from dq.message import Message

__all__ = ["StubBackend"]

R = TypeVar("R")

#: Stores between two sweeps of expired entries.
_SWEEP_EVERY = 1024


class StubBackend(ResultBackend):
    """Keep results in this process's memory, encoded as a server backend would.

    Unlike Dramatiq's, each instance has its own store (Dramatiq's instances share
    one), and TTLs are exact to the millisecond on `dq.runtime`'s clock (Dramatiq
    truncates them to whole seconds, so TTLs under 1 s expire at once); a test can
    therefore expire results by setting a fake clock. A blocking `get_result` wakes
    as soon as the result is stored. Safe to use from many threads.

    Args:
        namespace: the first part of every key.
        encoder: how values become bytes (the global encoder by default).
        use_namespace_prefix_keys: readable keys instead of MD5 digests.
    """

    def __init__(
        self,
        *,
        namespace: str = "dramatiq-results",
        encoder: Encoder | None = None,
        use_namespace_prefix_keys: bool = False,
    ) -> None:
        super().__init__(
            namespace=namespace,
            encoder=encoder,
            use_namespace_prefix_keys=use_namespace_prefix_keys,
        )
        #: key -> (encoded value, expiry time in ms on dq.runtime's clock).
        self.results: dict[str, tuple[bytes, int]] = {}
        self._stored = threading.Condition(threading.Lock())
        self._stores = 0

    @overload
    def get_result(
        self, message: Message[R], *, block: bool = False, timeout: int | None = None
    ) -> R: ...
    @overload
    def get_result(
        self, message: StoredMessage, *, block: bool = False, timeout: int | None = None
    ) -> Any: ...
    def get_result(
        self, message: StoredMessage, *, block: bool = False, timeout: int | None = None
    ) -> Any:
        """Return the result of ``message`` (see `ResultBackend.get_result`).

        Raises:
            ResultMissing: ``block`` is false and no result is stored.
            ResultTimeout: ``block`` is true and no result was stored in time.
            ResultFailure: the actor failed for good.
        """
        message_key = self.build_message_key(message)
        if not block:
            value = self._get(message_key)
            if value is Missing:
                raise ResultMissing(message)
            return self.unwrap_result(value)
        deadline = time.monotonic() + _timeout_ms(timeout) / 1000
        with self._stored:
            while True:
                data = self._lookup(message_key)
                if data is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ResultTimeout(message)
                self._stored.wait(remaining)
        return self.unwrap_result(self._decode(data))

    def _lookup(self, message_key: str) -> bytes | None:
        """The bytes stored under ``message_key`` if not expired (lock held)."""
        entry = self.results.get(message_key)
        if entry is None:
            return None
        data, expires_ms = entry
        if runtime.get_clock().now_ms() >= expires_ms:
            del self.results[message_key]
            return None
        return data

    def _get(self, message_key: str) -> MResult:
        with self._stored:
            data = self._lookup(message_key)
        return Missing if data is None else self._decode(data)

    def _store(self, message_key: str, result: Result, ttl: int) -> None:
        data = self._encode(result)
        now_ms = runtime.get_clock().now_ms()
        with self._stored:
            self.results[message_key] = (data, now_ms + ttl)
            self._stores += 1
            if self._stores % _SWEEP_EVERY == 0:
                self._sweep(now_ms)
            self._stored.notify_all()

    def _sweep(self, now_ms: int) -> None:
        """Drop every expired entry (lock held), so the store does not grow forever."""
        expired = [key for key, (_, expires_ms) in self.results.items() if expires_ms <= now_ms]
        for key in expired:
            del self.results[key]

    def flush(self) -> None:
        """Drop every stored result."""
        with self._stored:
            self.results.clear()
