"""`Message`: the public message type, and the process-global encoder.

A message is the user's handle: ``a | b`` builds a pipeline and `Message.get_result`
asks the global broker's results backend, so this module sits above `dq.broker` and
`dq.composition`, which handle messages without importing it (a message decoded from
a dict is built with the class of the message at hand).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

import attrs

from dq import _sources as runtime
from dq.broker import get_broker
from dq.composition import pipeline
from dq.core import EMPTY, FrozenDict
from dq.core import Message as CoreMessage
from dq.core._frozendict import freeze_options
from dq.encoder import Encoder, JSONEncoder
from dq.options import (  # defined here before dq.options existed
    CHECKED_OPTIONS,
    check_options,
    option_problem,
    options_problem,
)
from dq.wire import decode_message, encode_message

if TYPE_CHECKING:
    from dq.composition import group
    from dq.results.backend import ResultBackend

__all__ = [
    "CHECKED_OPTIONS",
    "Message",
    "check_options",
    "generate_unique_id",
    "get_encoder",
    "global_encoder",
    "option_problem",
    "options_problem",
    "set_encoder",
]

# Defaults to Any, so a message built without a known actor is Message[Any]
# (not Message[Never]).
if TYPE_CHECKING:
    # PEP 696 defaults (``Message`` means ``Message[Any]``) for the type checker; at
    # run time a plain TypeVar does the same job without importing typing_extensions.
    from typing_extensions import TypeVar

    R_co = TypeVar("R_co", covariant=True, default=Any)
else:
    from typing import TypeVar

    R_co = TypeVar("R_co", covariant=True)

#: The process-global encoder (Dramatiq's name). Prefer `get_encoder`.
global_encoder: Encoder = JSONEncoder()


def get_encoder() -> Encoder:
    """Return the process-global encoder."""
    return global_encoder


def set_encoder(encoder: Encoder) -> None:
    """Install the process-global encoder used by `Message.encode` / `Message.decode`.

    Raises:
        TypeError: ``encoder`` is not an `Encoder`.
    """
    global global_encoder
    if not isinstance(encoder, Encoder):
        raise TypeError(f"set_encoder expects an dq.Encoder instance, got {encoder!r}")
    global_encoder = encoder


def generate_unique_id() -> str:
    """Return a new uuid4 string from the runtime's id source."""
    return runtime.get_id_source().new_id()


@attrs.frozen(init=False, repr=False)
class Message(CoreMessage[R_co]):
    """A task message (Dramatiq's ``Message``), immutable all the way down.

    ``kwargs`` and ``options`` are read-only mappings; ``args`` is a tuple. Build
    changed copies with `copy`. ``R_co`` is the result type of the actor that will
    run it (results and composition arrive with the results issue).

    Args:
        queue_name: the queue.
        actor_name: the actor's name.
        args: positional arguments (any iterable; stored as a tuple).
        kwargs: keyword arguments.
        options: broker and middleware options.
        message_id: defaults to a new uuid4 string.
        message_timestamp: defaults to now, in ms since the epoch.
    """

    def __init__(
        self,
        queue_name: str,
        actor_name: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        message_timestamp: int | None = None,
    ) -> None:
        # Slot setters, bound once (see _SET below): cheaper than object.__setattr__.
        set_queue_name, set_actor_name, set_args, set_kwargs, set_options, set_id, set_ts = _SET
        set_queue_name(self, queue_name)
        set_actor_name(self, actor_name)
        set_args(self, args if type(args) is tuple else tuple(args))
        set_kwargs(
            self,
            kwargs if type(kwargs) is FrozenDict else FrozenDict(kwargs) if kwargs else EMPTY,
        )
        set_options(self, options if options is EMPTY else freeze_options(options))
        set_id(self, runtime._ids.new_id() if message_id is None else message_id)
        set_ts(self, runtime._clock.now_ms() if message_timestamp is None else message_timestamp)

    @classmethod
    def build(
        cls,
        *,
        queue_name: str,
        actor_name: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        message_timestamp: int | None = None,
    ) -> Self:
        """Build a message, checking field types (the validating constructor).

        Raises:
            TypeError: a field has the wrong type.
        """
        if isinstance(args, str | bytes | Mapping) or not isinstance(args, Iterable):
            raise TypeError(f"Message args must be a sequence of arguments, got {args!r}")
        for name, value in (("queue_name", queue_name), ("actor_name", actor_name)):
            if not isinstance(value, str):
                raise TypeError(f"Message {name} must be a str, got {value!r}")
        for name, mapping in (("kwargs", kwargs), ("options", options)):
            if mapping is not None and not isinstance(mapping, Mapping):
                raise TypeError(f"Message {name} must be a mapping, got {mapping!r}")
            if mapping and not all(isinstance(k, str) for k in mapping):
                raise TypeError(f"Message {name} keys must be strings, got {list(mapping)!r}")
        if message_id is not None and not isinstance(message_id, str):
            raise TypeError(f"Message message_id must be a str, got {message_id!r}")
        if message_timestamp is not None and (
            isinstance(message_timestamp, bool) or not isinstance(message_timestamp, int)
        ):
            raise TypeError(
                f"Message message_timestamp must be an int (ms), got {message_timestamp!r}"
            )
        return cls(queue_name, actor_name, args, kwargs, options, message_id, message_timestamp)

    def encode(self) -> bytes:
        """Return this message encoded with the global encoder.

        Raises:
            TypeError: a value is not serialisable.
        """
        return encode_message(self, global_encoder)

    def __or__(self, other: Message[Any] | pipeline | group) -> pipeline:
        """Return the pipeline of this message followed by ``other`` (a message, a
        pipeline, or a group: a dq addition), on the global broker (as Dramatiq).

        Raises:
            RuntimeError: no global broker is set.
        """
        return pipeline([self, other])

    def get_result(
        self,
        *,
        backend: ResultBackend | None = None,
        block: bool = False,
        timeout: int | None = None,
    ) -> R_co:
        """Return the result the actor stored for this message.

        Args:
            backend: the result backend to read; defaults to the global broker's
                (`dq.Broker.get_results_backend`).
            block: wait for the result if it is not stored yet.
            timeout: how long to wait at most, in ms, when ``block`` is true
                (default 10000); 0 or less checks once.

        Raises:
            RuntimeError: no ``backend`` was given and the global broker has no
                `dq.results.Results` middleware (or no global broker is set).
            ResultMissing: ``block`` is false and no result is stored.
            ResultTimeout: ``block`` is true and no result was stored in time.
            ResultFailure: the actor failed for good; the error names its exception.
        """
        if backend is None:
            broker = get_broker()
            found = broker.get_results_backend()
            if found is None:
                raise RuntimeError(
                    f"The global broker ({type(broker).__name__}) has no results backend: "
                    "add one with broker.add_middleware(dq.results.Results(backend=...)), "
                    "or pass get_result(backend=...)."
                )
            backend = found
        # Inside its own class mypy resolves the call to the untyped overload.
        result: R_co = backend.get_result(self, block=block, timeout=timeout)
        return result

    @classmethod
    def decode(cls, data: bytes) -> Message[Any]:
        """Return the message encoded in ``data`` (global encoder), checking every field.

        Raises:
            DecodeError: ``data`` is not a valid message; the error names what was
                wrong and shows an excerpt of the data.
        """
        return decode_message(data, global_encoder, cls)


# The slot descriptors of the seven fields (defined on the core record), in order.
_SET: tuple[Callable[[object, Any], None], ...] = tuple(
    vars(CoreMessage)[name].__set__ for name in CoreMessage._fields
)
