"""The wire: Dramatiq 2.2.1's message envelope, in one place.

One converter (`make_converter`) knows how a `Message` becomes the seven-field
dict that encoders turn into bytes, and how such a dict becomes a message again,
checking every field on the way in. Records carry no serialisation config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from dq.core import EMPTY, FrozenDict
from dq.core import Message as CoreMessage
from dq.core._frozendict import deep_freeze, freeze_options
from dq.encoder import Encoder, JSONEncoder, MessageData, excerpt
from dq.errors import DecodeError

if TYPE_CHECKING:
    import cattrs

__all__ = [
    "FIELDS",
    "decode_message",
    "deep_freeze",
    "encode_message",
    "make_converter",
    "message_from_data",
]

M = TypeVar("M", bound=CoreMessage[Any])

#: The envelope's keys, in Dramatiq's order (the message record's field order).
FIELDS = CoreMessage._fields
_FIELD_SET = frozenset(FIELDS)


def _problem(data: Mapping[str, Any]) -> str | None:
    """Return what is wrong with an envelope dict, or None."""
    missing = [f for f in FIELDS if f not in data]
    if missing:
        return f"missing field(s) {missing}"
    extra = sorted(set(data) - _FIELD_SET)
    if extra:
        return f"unknown field(s) {extra}"
    expected: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
        ("queue_name", str, "a string"),
        ("actor_name", str, "a string"),
        ("args", (list, tuple), "an array"),
        ("kwargs", dict, "an object"),
        ("options", dict, "an object"),
        ("message_id", str, "a string"),
    )
    for name, types, what in expected:
        if not isinstance(data[name], types):
            return f"field {name!r} must be {what}, got {type(data[name]).__name__}"
    ts = data["message_timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        return f"field 'message_timestamp' must be an integer (ms), got {type(ts).__name__}"
    bad_keys = [k for k in data["kwargs"] if not isinstance(k, str)]
    if bad_keys:
        return f"field 'kwargs' must have string keys, got {bad_keys[:3]!r}"
    return None


def message_from_data(data: Mapping[str, Any], cls: type[M], raw: Any = None) -> M:
    """Build a message of type ``cls`` from an envelope dict, checking every field.

    Raises:
        DecodeError: a field is missing, unknown, or of the wrong type.
    """
    # Fast path: the exact shape every well-formed envelope has. Anything else goes
    # through _problem, which names what is wrong (or finds nothing wrong).
    if len(data) == 7:
        try:
            queue_name = data["queue_name"]
            actor_name = data["actor_name"]
            args = data["args"]
            kwargs = data["kwargs"]
            options = data["options"]
            message_id = data["message_id"]
            timestamp = data["message_timestamp"]
        except KeyError:
            pass
        else:
            if (
                type(queue_name) is str
                and type(actor_name) is str
                and type(args) is list
                and type(kwargs) is dict
                and type(options) is dict
                and type(message_id) is str
                and type(timestamp) is int
                and (not kwargs or all(type(k) is str for k in kwargs))
            ):
                return cls(
                    queue_name,
                    actor_name,
                    tuple(args),
                    FrozenDict(kwargs) if kwargs else EMPTY,
                    freeze_options(options) if options else EMPTY,
                    message_id,
                    timestamp,
                )
    problem = _problem(data)
    if problem is not None:
        shown = raw if isinstance(raw, bytes | str) else repr(dict(data))
        raise DecodeError(
            f"Failed to decode message: {problem}; data: {excerpt(shown)}",
            raw if raw is not None else data,
            None,
        )
    kwargs = data["kwargs"]
    return cls(
        data["queue_name"],
        data["actor_name"],
        tuple(data["args"]),
        FrozenDict(kwargs) if kwargs else EMPTY,
        freeze_options(data["options"]),
        data["message_id"],
        data["message_timestamp"],
    )


def make_converter() -> cattrs.Converter:
    """Build dq's one converter between messages and envelope dicts.

    Unstructuring a message gives its seven fields in wire order (``args`` a tuple,
    which encoders write as an array); structuring checks every field and raises
    `DecodeError` naming the problem.
    """
    # Loaded here, not at the top: only custom encoders need it, and it costs each
    # process about 2.5 MB and 30 ms (bench/run.sh cli reports the worker RSS).
    import cattrs  # noqa: PLC0415 - costly to load, and most processes never need it

    converter = cattrs.Converter()
    converter.register_unstructure_hook(FrozenDict, lambda d: d)
    converter.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, CoreMessage),
        lambda m: m.asdict(),
    )
    converter.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, CoreMessage),
        message_from_data,
    )
    return converter


_converter: cattrs.Converter | None = None


def get_converter() -> cattrs.Converter:
    """dq's converter (`make_converter`), made on first use."""
    global _converter
    if _converter is None:
        _converter = make_converter()
    return _converter


def __getattr__(name: str) -> Any:
    if name == "CONVERTER":  # the converter, built on first use
        return get_converter()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def encode_message(message: CoreMessage[Any], encoder: Encoder) -> bytes:
    """Return ``message`` encoded with ``encoder``.

    dq's own `JSONEncoder` writes the envelope straight from the fields (same bytes,
    no intermediate dict); any other encoder gets the converter's dict.

    Raises:
        TypeError: a value is not serialisable by ``encoder``.
    """
    if type(encoder) is JSONEncoder and type(message.message_timestamp) is int:
        return encoder.encode_fields(
            message.queue_name,
            message.actor_name,
            message.args,
            message.kwargs,
            message.options,
            message.message_id,
            message.message_timestamp,
        )
    data: MessageData = get_converter().unstructure(message, type(message))
    return encoder.encode(data)


def decode_message(data: bytes, encoder: Encoder, cls: type[M]) -> M:
    """Return the message of type ``cls`` encoded in ``data``.

    Raises:
        DecodeError: ``data`` is not a valid message; the error names the problem and
            shows an excerpt of the data.
    """
    try:
        fields = encoder.decode(data)
    except DecodeError as e:
        raise DecodeError(f"Failed to decode message: {e}", data, e) from e
    try:
        return message_from_data(fields, cls, raw=data)
    except DecodeError:
        raise
    except Exception as e:  # a custom encoder's odd output
        raise DecodeError(f"Failed to decode message: {e!r}; data: {excerpt(data)}", data, e) from e
