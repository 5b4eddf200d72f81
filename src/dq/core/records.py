"""Immutable records: the message, the stored copies of it, and the broker's state.

Every record is a frozen, slotted ``attrs`` class whose fields are immutable too
(tuples, `FrozenDict`, `PQueue`, ``rpds`` maps). A "mutator" returns a new value.
Hot-path records have no validators or converters: values are checked once, at the
boundary (`dq.message.Message.build`, `dq.wire`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Self, TypeAlias, TypeVar

import attrs
from rpds import HashTrieMap

from dq.core._frozendict import EMPTY, FrozenDict, freeze, freeze_options
from dq.core.persistent import PQueue, empty_queue

#: A JSON value, as messages carry them.
JSON: TypeAlias = "bool | int | float | str | Sequence[JSON] | Mapping[str, JSON] | None"

R_co = TypeVar("R_co", covariant=True)

_FIELDS = (
    "queue_name",
    "actor_name",
    "args",
    "kwargs",
    "options",
    "message_id",
    "message_timestamp",
)


@attrs.frozen(repr=False)
class Message(Generic[R_co]):
    """A task message: which actor to run, with what, and how.

    Field order and meaning are Dramatiq's wire envelope. ``R_co`` is the actor's
    result type; it exists only for type checkers.

    Attributes:
        queue_name: the queue the stored copy sits on (``q`` or ``q.DQ``).
        actor_name: the registered name of the actor to run.
        args: positional arguments.
        kwargs: keyword arguments (read-only).
        options: broker and middleware options (read-only).
        message_id: a uuid4 string, fixed when the message is built.
        message_timestamp: milliseconds since the epoch when it was built.
    """

    queue_name: str
    actor_name: str
    args: tuple[Any, ...]
    kwargs: FrozenDict[str, Any]
    options: FrozenDict[str, Any]
    message_id: str
    message_timestamp: int

    # -- namedtuple compatibility (Dramatiq's Message offers these) -------------
    _fields: ClassVar[tuple[str, ...]] = _FIELDS
    _field_defaults: ClassVar[Mapping[str, Any]] = EMPTY

    def asdict(self) -> dict[str, Any]:
        """Return the seven fields, in wire order, as a new ``dict``.

        The values are the message's own (read-only) objects, not copies.
        """
        return {
            "queue_name": self.queue_name,
            "actor_name": self.actor_name,
            "args": self.args,
            "kwargs": self.kwargs,
            "options": self.options,
            "message_id": self.message_id,
            "message_timestamp": self.message_timestamp,
        }

    _asdict = asdict

    def copy(
        self,
        *,
        queue_name: str | None = None,
        actor_name: str | None = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        message_timestamp: int | None = None,
    ) -> Self:
        """Return a new message with the given fields replaced.

        ``options`` is merged into the current options (existing keys keep their
        position, new keys come last), as Dramatiq does; every other field given
        replaces the current value. ``message_id`` and ``message_timestamp`` are kept
        unless given.
        """
        return type(self)(
            self.queue_name if queue_name is None else queue_name,
            self.actor_name if actor_name is None else actor_name,
            self.args if args is None else tuple(args),
            self.kwargs if kwargs is None else freeze(kwargs),
            self.options if not options else freeze_options({**self.options, **options}),
            self.message_id if message_id is None else message_id,
            self.message_timestamp if message_timestamp is None else message_timestamp,
        )

    def _replace(self, **changes: Any) -> Self:
        """Return a new message with fields replaced (``options`` replaced, not merged)."""
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(f"Message has no field(s) {sorted(unknown)}; fields are {_FIELDS}")
        if "options" in changes:
            changes["options"] = freeze_options(changes["options"])
        if "kwargs" in changes:
            changes["kwargs"] = freeze(changes["kwargs"])
        if "args" in changes:
            changes["args"] = tuple(changes["args"])
        return attrs.evolve(self, **changes)

    def without_option(self, key: str) -> Self:
        """Return a new message whose options lack ``key`` (unchanged if absent)."""
        if key not in self.options:
            return self
        return attrs.evolve(
            self, options=FrozenDict({k: v for k, v in self.options.items() if k != key})
        )

    @property
    def message_datetime(self) -> datetime:
        """The message timestamp as a UTC-aware datetime (millisecond precision)."""
        seconds, ms = divmod(self.message_timestamp, 1000)
        return datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=ms * 1000)

    def __str__(self) -> str:
        params = ", ".join(
            [repr(arg) for arg in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        )
        return f"{self.actor_name}({params})"

    def __repr__(self) -> str:
        return (
            f"Message(queue_name={self.queue_name!r}, actor_name={self.actor_name!r}, "
            f"args={self.args!r}, kwargs={dict(self.kwargs)!r}, "
            f"options={dict(self.options)!r}, message_id={self.message_id!r}, "
            f"message_timestamp={self.message_timestamp!r})"
        )

    def __lt__(self, other: Message[Any]) -> bool:
        return _astuple(self) < _astuple(other)


def _astuple(m: Message[Any]) -> tuple[Any, ...]:
    return (
        m.queue_name,
        m.actor_name,
        m.args,
        tuple(m.kwargs.items()),
        tuple(m.options.items()),
        m.message_id,
        m.message_timestamp,
    )


#: An entry as the queues store it: ``(seq, queue_name, message_id, eta_ms, payload)``.
#: A plain tuple of atomic values, so the garbage collector stops tracking it (and
#: the cons cells holding it): a queue of 100,000 messages costs a full collection
#: nothing. `Entry` is the same data as a record.
Row: TypeAlias = tuple[int, str, str, int | None, bytes]


@attrs.frozen
class Entry:
    """One stored copy of a message.

    Attributes:
        seq: the broker-wide key of this copy. A retry or a promotion stores a new
            copy under a new ``seq`` even though the ``message_id`` stays the same.
        queue_name: the queue it is stored on (``q`` or ``q.DQ``).
        message_id: the message's id.
        eta_ms: when it may run (delay-queue copies), or None.
        payload: the encoded message (opaque to the core; the interpreter encodes).
    """

    seq: int
    queue_name: str
    message_id: str
    eta_ms: int | None
    payload: bytes

    @classmethod
    def from_row(cls, row: Row) -> Entry:
        """Return the record of a stored row."""
        return cls(*row)

    @property
    def row(self) -> Row:
        """This entry as the queues store it."""
        return (self.seq, self.queue_name, self.message_id, self.eta_ms, self.payload)


class Run(enum.Enum):
    """Whether the message of a reserved entry has started running, and how.

    The delivery cap needs it: a consumer that dies while running one message alone
    is that message's fault; one that dies while running several is nobody's in
    particular (see `dq.core.policy.deliveries_after_death`).
    """

    WAITING = "waiting"  # reserved, not reported as started
    ALONE = "alone"  # started while nothing else ran in its process
    SHARED = "shared"  # started beside other messages

    __hash__ = object.__hash__


class DeathReason(enum.Enum):
    """Why an entry was dead-lettered (kept with the dead letter, and logged)."""

    NACKED = "nacked"  # a consumer settled it as failed (its actor gave up)
    MAX_DELIVERIES = "max_deliveries"  # its consumers died running it too often
    BAD_ETA = "bad_eta"  # its eta is not a finite number of ms in range
    UNDECODABLE = "undecodable"  # its payload is not a message
    BAD_OPTIONS = "bad_options"  # an option's value is not what dq accepts
    UNSTORABLE = "unstorable"  # what had to replace it (a retry) could not be stored

    __hash__ = object.__hash__


@attrs.frozen
class Reservation:
    """An entry handed to a consumer and not yet settled.

    Attributes:
        entry: the stored copy (its ``queue_name`` is where it was taken from).
        consumer: the id of the consumer holding it.
        lease_until_ms: when the reservation lapses unless renewed (None: never;
            it ends with its consumer).
        run: whether its message started running, and how.
        priority: the priority it waited with (it goes back with it).
    """

    entry: Entry
    consumer: str
    lease_until_ms: int | None = None
    run: Run = Run.WAITING
    priority: int = 0


@attrs.frozen
class DeadLetter:
    """A dead-lettered entry, when it died (ms) and why."""

    entry: Entry
    dead_at_ms: int
    reason: DeathReason = DeathReason.NACKED


@attrs.frozen
class QueueState:
    """The state of one canonical queue and its delay queue.

    Attributes:
        name: the canonical queue name.
        ready: rows waiting on the queue, by priority (lower first), then oldest
            first.
        delayed: rows waiting on the delay queue (``name.DQ``), oldest first.
        in_flight: how many entries of either are reserved right now.
        dead: dead letters, oldest first.
    """

    name: str
    ready: PQueue[Row] = attrs.field(factory=empty_queue)
    delayed: PQueue[Row] = attrs.field(factory=empty_queue)
    in_flight: int = 0
    dead: PQueue[DeadLetter] = attrs.field(factory=empty_queue)

    @property
    def pending(self) -> int:
        """How many entries are not finished: waiting or reserved."""
        return len(self.ready) + len(self.delayed) + self.in_flight


@attrs.frozen
class BrokerState:
    """Everything a broker holds, as one value.

    Attributes:
        queues: per canonical queue name.
        reserved: unsettled reservations, by entry ``seq``.
        next_seq: the ``seq`` the next stored entry gets.
        deliveries: for stored entries whose consumer died holding them, how many
            deliveries ended that way, as `dq.core.policy.deliveries_after_death`
            counts them (absent: none). Requeues keep the count; a settle or a
            replacement drops it.
    """

    queues: HashTrieMap[str, QueueState] = attrs.field(factory=HashTrieMap)
    reserved: HashTrieMap[int, Reservation] = attrs.field(factory=HashTrieMap)
    next_seq: int = 1
    deliveries: HashTrieMap[int, int] = attrs.field(factory=HashTrieMap)


def initial_state() -> BrokerState:
    """Return the state of a broker with no queues."""
    return BrokerState()
