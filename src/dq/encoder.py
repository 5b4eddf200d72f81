"""Encoders turn message data into bytes and back (Dramatiq's ``Encoder`` API)."""

from __future__ import annotations

import _json
import abc
import json
import pickle
from collections.abc import Callable
from typing import Any, TypeAlias

from dq.errors import DecodeError

__all__ = ["Encoder", "JSONEncoder", "MessageData", "PickleEncoder"]

#: The data of one message: its seven fields as a dict.
MessageData: TypeAlias = dict[str, Any]

_EXCERPT = 80

_HEAD = '{"queue_name":%s,"actor_name":%s,"args":'
_BODY = '%s%s,"kwargs":%s,"options":%s,"message_id":%s,"message_timestamp":%s}'
_MAX_HEADS = 4096
_str = json.encoder.encode_basestring_ascii  # what the JSON encoder uses for str
_c_make_encoder: type[_json.make_encoder] | None = getattr(_json, "make_encoder", None)
_int = int.__repr__  # what the JSON encoder uses for int


def excerpt(data: bytes | str) -> str:
    """Return a short printable excerpt of ``data`` for error messages."""
    text = repr(data[:_EXCERPT])
    return text + ("..." if len(data) > _EXCERPT else "")


class Encoder(abc.ABC):
    """Turns message data into bytes and back."""

    @abc.abstractmethod
    def encode(self, data: MessageData) -> bytes:
        """Return ``data`` as bytes."""

    @abc.abstractmethod
    def decode(self, data: bytes) -> MessageData:
        """Return the message data encoded in ``data``.

        Raises:
            DecodeError: ``data`` is not valid for this encoder.
        """


# The decoder's C scanner (json.loads's own); typeshed does not declare the attribute.
_decoder = json.JSONDecoder()
_scan_once: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]  # see above


def _scan_object(text: str) -> dict[str, Any] | None:
    """Parse a JSON object with no surrounding white space using the C scanner directly
    (what ``json.loads`` does, without its Python-level wrapping); return None for
    anything else, including malformed input, so the caller takes the general path."""
    if not text or text[0] != "{" or text[-1] != "}":
        return None
    try:
        value, end = _scan_once(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return None
    if end != len(text) or type(value) is not dict:
        return None
    return value


class JSONEncoder(Encoder):
    """Compact JSON in UTF-8: Dramatiq's default, byte for byte.

    The settings are ``json.dumps``'s defaults but for the separators: ASCII only
    (``\\uXXXX`` escapes), ``NaN``/``Infinity`` allowed, key order kept.
    """

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(separators=(",", ":"))
        self._heads: dict[tuple[str, str], str] = {}
        # The C encoder json.dumps builds per call, built once. It runs without
        # circular-reference markers (they would be shared across threads); a cycle
        # then overflows the stack, and `_dumps` re-encodes on the checked path so
        # the caller gets json's own "Circular reference detected" ValueError.
        self._c_encoder = (
            None
            if _c_make_encoder is None
            else _c_make_encoder(
                None,
                self._encoder.default,
                _str,
                None,
                ":",
                ",",
                False,
                False,
                True,
            )
        )

    def _dumps(self, value: Any) -> str:
        """Return ``value`` as compact JSON, exactly as ``json.dumps`` would."""
        c_encoder = self._c_encoder
        if c_encoder is None:
            return self._encoder.encode(value)
        try:
            return "".join(c_encoder(value, 0))
        except RecursionError:
            return self._encoder.encode(value)

    def encode_fields(
        self,
        queue_name: str,
        actor_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        message_id: str,
        message_timestamp: int,
    ) -> bytes:
        """Return the envelope of these seven fields: the same bytes as `encode` of
        their dict, without building the dict (the hot path of every send)."""
        dumps = self._dumps
        head = self._heads.get((queue_name, actor_name))
        if head is None:
            head = self._head(queue_name, actor_name)
        return (
            _BODY
            % (
                head,
                dumps(args),
                dumps(kwargs) if kwargs else "{}",
                dumps(options) if options else "{}",
                _str(message_id),
                _int(message_timestamp),
            )
        ).encode("utf-8")

    def _head(self, queue_name: str, actor_name: str) -> str:
        """The envelope's start for a queue and actor, remembered (a few per app)."""
        head = _HEAD % (_str(queue_name), _str(actor_name))
        if len(self._heads) < _MAX_HEADS:
            self._heads[queue_name, actor_name] = head
        return head

    def encode(self, data: MessageData) -> bytes:
        """Return ``data`` as compact JSON bytes.

        Raises:
            TypeError: a value is not JSON-serialisable (nothing is sent).
        """
        return self._encoder.encode(data).encode("utf-8")

    def decode(self, data: bytes) -> MessageData:
        """Parse compact or pretty JSON bytes into a dict.

        Raises:
            DecodeError: the bytes are not UTF-8, not JSON, or not a JSON object.
        """
        try:
            text = data.decode("utf-8")
        except (UnicodeDecodeError, AttributeError) as e:
            raise DecodeError(
                f"message is not UTF-8 bytes ({e}); data: {excerpt(data)}", data, e
            ) from e
        # _scan_object, inlined (every message received goes through here).
        if text and text[0] == "{" and text[-1] == "}":
            try:
                value, end = _scan_once(text, 0)
            except (StopIteration, ValueError, RecursionError):
                pass
            else:
                if end == len(text) and type(value) is dict:
                    return value
        try:
            value = json.loads(text)  # the general path, with json's own error messages
        except json.JSONDecodeError as e:
            raise DecodeError(
                f"message is not valid JSON ({e}); data: {excerpt(data)}", data, e
            ) from e
        except (ValueError, RecursionError) as e:  # huge integers, deep nesting
            raise DecodeError(
                f"message cannot be parsed ({e!r}); data: {excerpt(data)}", data, e
            ) from e
        if not isinstance(value, dict):
            raise DecodeError(
                f"message must be a JSON object, got {type(value).__name__}; data: {excerpt(data)}",
                data,
                None,
            )
        return value


class PickleEncoder(Encoder):
    """Pickle both ways.

    Unsafe: decoding runs arbitrary code chosen by whoever wrote to the broker. Use it
    only where every producer is trusted. It never interoperates with JSON workers, and
    it is never the default.
    """

    def encode(self, data: MessageData) -> bytes:
        """Return ``data`` pickled."""
        return pickle.dumps(data)

    def decode(self, data: bytes) -> MessageData:
        """Unpickle ``data``.

        Raises:
            DecodeError: it does not unpickle to a dict.
        """
        try:
            value = pickle.loads(data)
        except Exception as e:
            raise DecodeError(
                f"message does not unpickle ({e!r}); data: {excerpt(data)}", data, e
            ) from e
        if not isinstance(value, dict):
            raise DecodeError(
                f"message must unpickle to a dict, got {type(value).__name__}", data, None
            )
        return value
