"""`ResultBackend`: where the `Results` middleware stores results, and how they are read.

Keys and values are Dramatiq's (``spec/wire.md`` §6), so a result stored by a
Dramatiq worker is read by dq and the reverse:

* key: ``"<namespace>:<canonical queue>:<actor>:<message id>"``, or (the default) the
  hex MD5 of that string; a delayed message (queue ``q.DQ``) shares its key with ``q``;
* value: the encoder's bytes of the result itself, or of the failure marker dict
  (`dq.results.result`).

A custom backend overrides `ResultBackend._get` and `ResultBackend._store` (the
names Dramatiq's backends use) and gets a polling `ResultBackend.get_result` for
free; the built-in backends also override ``get_result`` to wait without polling
where the server can.
"""

from __future__ import annotations

import enum
import hashlib
import json
import pickle
import time
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias, TypeVar, overload

from dq.common import compute_backoff
from dq.core.policy import q_name
from dq.encoder import Encoder, JSONEncoder, PickleEncoder
from dq.errors import DecodeError
from dq.message import get_encoder
from dq.results.errors import ResultMissing, ResultTimeout
from dq.results.result import unwrap_result, wrap_exception, wrap_result

if TYPE_CHECKING:
    from dq.message import Message

__all__ = [
    "BACKOFF_FACTOR",
    "DEFAULT_TIMEOUT",
    "MResult",
    "Missing",
    "MissingType",
    "Result",
    "ResultBackend",
    "StoredMessage",
]

#: How long a blocking `ResultBackend.get_result` waits by default, in ms.
DEFAULT_TIMEOUT: Final = 10000

#: The first pause of a polling read, in ms (pauses double, with jitter, up to 2 s).
BACKOFF_FACTOR: Final = 100

R = TypeVar("R")


class MissingType(enum.Enum):
    """The type of `Missing` (one member)."""

    MISSING = "Missing"

    def __repr__(self) -> str:
        return "Missing"


#: What `ResultBackend._get` returns when no result is stored (test with ``is``).
Missing: Final = MissingType.MISSING

#: A result as stored: whatever the actor returned (Dramatiq's alias).
Result: TypeAlias = Any
#: A result, or `Missing`.
MResult: TypeAlias = Any | MissingType


class StoredMessage(Protocol):
    """What a backend needs of a message: a `dq.Message` or a `dq.MessageProxy`."""

    @property
    def queue_name(self) -> str: ...

    @property
    def actor_name(self) -> str: ...

    @property
    def message_id(self) -> str: ...


class ResultBackend:
    """Base class of result backends.

    Args:
        namespace: the first part of every key (Dramatiq's default, so mixed fleets
            share results).
        encoder: how values become bytes; defaults to the global encoder at
            construction time.
        use_namespace_prefix_keys: when True, keys are the readable
            ``"<namespace>:<queue>:<actor>:<message id>"`` (so they can be scanned by
            prefix); when False (the default), the MD5 hex digest of it.

    Raises:
        TypeError: ``encoder`` is not an `Encoder`, or ``namespace`` not a string.
    """

    def __init__(
        self,
        *,
        namespace: str = "dramatiq-results",
        encoder: Encoder | None = None,
        use_namespace_prefix_keys: bool = False,
    ) -> None:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {namespace!r}")
        if encoder is not None and not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be a dq.Encoder instance, got {encoder!r}")
        self.namespace = namespace
        self.encoder: Encoder = encoder if encoder is not None else get_encoder()
        self.use_namespace_prefix_keys = use_namespace_prefix_keys

    # -- keys and values ------------------------------------------------------------------

    def build_message_key(self, message: StoredMessage) -> str:
        """Return the key of ``message``'s result (Dramatiq's key)."""
        queue_name = q_name(message.queue_name)
        key = f"{self.namespace}:{queue_name}:{message.actor_name}:{message.message_id}"
        if self.use_namespace_prefix_keys:
            return key
        return hashlib.md5(key.encode("utf-8"), usedforsecurity=False).hexdigest()

    def unwrap_result(self, res: Any) -> Any:
        """Return the result stored as ``res`` (override to match custom storage).

        Raises:
            ResultFailure: ``res`` is a stored failure.
        """
        return unwrap_result(res)

    def _encode(self, value: Any) -> bytes:
        """Return ``value`` as the bytes to store, with this backend's encoder.

        Dramatiq's encoders take any value; dq's `JSONEncoder` and `PickleEncoder`
        are message encoders (their ``decode`` wants an object), so for them the
        same bytes are produced here directly.

        Raises:
            TypeError: ``value`` cannot be encoded.
        """
        encoder = self.encoder
        encode = type(encoder).encode
        try:
            if encode is JSONEncoder.encode:
                return json.dumps(value, separators=(",", ":")).encode("utf-8")
            if encode is PickleEncoder.encode:
                return pickle.dumps(value)
            data: Any = value  # a custom encoder gets the value, as in Dramatiq
            return encoder.encode(data)
        except TypeError:
            raise
        except (ValueError, RecursionError, pickle.PicklingError, AttributeError) as e:
            raise TypeError(
                f"result of type {type(value).__name__} cannot be encoded with "
                f"{type(encoder).__name__}: {e}"
            ) from e

    def _decode(self, data: bytes | str) -> Any:
        """Return the value stored as ``data``.

        Raises:
            DecodeError: ``data`` is not valid for this backend's encoder.
        """
        if isinstance(data, str):  # a client that decodes replies
            data = data.encode("utf-8")
        encoder = self.encoder
        decode = type(encoder).decode
        try:
            if decode is JSONEncoder.decode:
                return json.loads(data)
            if decode is PickleEncoder.decode:
                return pickle.loads(data)
        except Exception as e:
            raise DecodeError(
                f"stored result is not valid for {type(encoder).__name__}: {e!r}", data, e
            ) from e
        return encoder.decode(data)

    # -- reading ----------------------------------------------------------------------------

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
        """Return the result of ``message``.

        Reading does not consume a result: it can be read any number of times, by
        any number of readers, until its TTL runs out.

        Args:
            message: the message (as sent, or as delivered).
            block: wait for the result if it is not stored yet.
            timeout: how long to wait at most, in ms, when ``block`` is true
                (default `DEFAULT_TIMEOUT`); 0 or less checks once.

        Raises:
            ResultMissing: ``block`` is false and no result is stored.
            ResultTimeout: ``block`` is true and no result was stored in time.
            ResultFailure: the actor failed for good; the error names its exception.
        """
        message_key = self.build_message_key(message)
        if not block:
            value = self._get(message_key)
            if value is Missing:
                raise ResultMissing(message)
            return self.unwrap_result(value)
        deadline = time.monotonic() + _timeout_ms(timeout) / 1000
        attempts = 0
        while True:
            value = self._get(message_key)
            if value is not Missing:
                return self.unwrap_result(value)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeout(message)
            attempts, pause_ms = compute_backoff(attempts, factor=BACKOFF_FACTOR)
            # The last pause ends at the deadline, for one last check (Dramatiq gives
            # up as soon as the next pause would pass it).
            time.sleep(min(pause_ms / 1000, remaining))

    # -- writing ----------------------------------------------------------------------------

    def store_result(self, message: StoredMessage, result: Result, ttl: int) -> None:
        """Store ``result`` as ``message``'s result for ``ttl`` ms.

        Raises:
            TypeError: ``result`` cannot be encoded, or ``ttl`` is not a number.
            ValueError: ``ttl`` is not positive.
        """
        self._store(self.build_message_key(message), wrap_result(result), _ttl_ms(ttl))

    def store_exception(self, message: StoredMessage, exception: BaseException, ttl: int) -> None:
        """Store ``exception`` as ``message``'s outcome for ``ttl`` ms: reading the
        result then raises `ResultFailure` naming its type and message.

        Raises:
            TypeError: ``ttl`` is not a number.
            ValueError: ``ttl`` is not positive.
        """
        self._store(self.build_message_key(message), wrap_exception(exception), _ttl_ms(ttl))

    # -- subclass hooks -------------------------------------------------------------------------

    def _get(self, message_key: str) -> MResult:
        """Return the value stored under ``message_key`` (decoded, not unwrapped), or
        `Missing`.

        Raises:
            NotImplementedError: the subclass does not implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement _get()")

    def _store(self, message_key: str, result: Result, ttl: int) -> None:
        """Store ``result`` (a value to encode) under ``message_key`` for ``ttl`` ms.

        Raises:
            NotImplementedError: the subclass does not implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement _store()")


def _timeout_ms(timeout: int | None) -> float:
    """Return the blocking-read timeout in ms (`DEFAULT_TIMEOUT` for None).

    Raises:
        TypeError: ``timeout`` is not a number.
    """
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of ms or None, got {timeout!r}")
    return timeout


def _ttl_ms(ttl: int) -> int:
    """Return ``ttl`` as a whole number of ms.

    Raises:
        TypeError: ``ttl`` is not a number.
        ValueError: ``ttl`` is not positive.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"result ttl must be a number of ms, got {ttl!r}")
    if ttl < 1:
        raise ValueError(f"result ttl must be at least 1 ms, got {ttl!r}")
    return int(ttl)
