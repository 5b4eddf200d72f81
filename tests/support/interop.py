"""Running Dramatiq 2.2.1 beside dq for the wire-interop tests: what the actors record,
each library behind one `Side` interface, and the two sides as one `Fleet`.

A broker's test file (tests/brokers/*/test_*_interop.py) makes the brokers on its
server (`DqSide(broker, queue)`, `DramatiqSide(broker, queue)`), puts them in a
subclass of `Fleet` that can look at the server, and picks the direction with
`directed`. Every actor of a test runs a `Behaviour` that records each attempt as a
`Call` in a `Recorder`, which the test waits on.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import dramatiq
import dramatiq.broker
import dramatiq.middleware

import dq
import dq.broker
import dq.middleware
from tests.support.global_broker import kept_global_broker
from tests.support.waiting import WAIT

#: Both workers' settings.
WORKER_THREADS = 2
WORKER_TIMEOUT = 100

#: Retry options sent with the messages: the consuming side's Retries reads them
#: (by key presence), so a retry waits 50-100 ms in the delay queue.
FAST_RETRY: dict[str, Any] = {"min_backoff": 50, "max_backoff": 100}

#: Who produces and who consumes: a test parametrized with these runs both ways.
DIRECTIONS = ["dramatiq-to-dq", "dq-to-dramatiq"]

Envelope = dict[str, Any]


def now_ms() -> float:
    return time.time() * 1000


def envelope(encoded: bytes) -> Envelope:
    """The seven fields of an encoded message, as plain JSON values."""
    data = json.loads(encoded)
    assert isinstance(data, dict)
    return data


# -- what the actors record ------------------------------------------------------------


class Boom(Exception):
    """What the failing actors raise."""


@dataclass(frozen=True)
class Call:
    """One attempt of an actor, as seen from inside it."""

    side: str
    actor_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    message: Envelope
    started_ms: float


class Recorder:
    """Thread-safe list of calls, with a deadline-bounded wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: list[Call] = []

    def add(self, call: Call) -> None:
        with self._cond:
            self._calls.append(call)
            self._cond.notify_all()

    @property
    def calls(self) -> list[Call]:
        with self._cond:
            return list(self._calls)

    def wait_for(self, done: Callable[[list[Call]], bool], timeout: float = WAIT) -> list[Call]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self._calls):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s; calls so far: {self._calls!r}"
                    )
                self._cond.wait(remaining)
            return list(self._calls)


Behaviour = Callable[[Call], None]


def record(recorder: Recorder) -> Behaviour:
    return recorder.add


def fail_first_attempt(recorder: Recorder) -> Behaviour:
    def run(call: Call) -> None:
        recorder.add(call)
        if "retries" not in call.message["options"]:
            raise Boom("first attempt fails")

    return run


def always_fail(recorder: Recorder) -> Behaviour:
    def run(call: Call) -> None:
        recorder.add(call)
        raise Boom("this one never succeeds")

    return run


# -- checks both brokers' tests make ----------------------------------------------------

#: Arguments that take JSON to its corners: big and negative numbers, -0.0, escapes,
#: non-ASCII text, nesting and key order.
PAYLOAD_ARGS: tuple[Any, ...] = (
    1,
    -2,
    2**70,
    0.1,
    1e100,
    -0.0,
    True,
    None,
    'é€😀 </script> \\ " \n \t \x00',
    [1, [2, {"a": None}]],
    {"b": 1, "a": 2, "ü": [3.25]},
)
PAYLOAD_KWARGS: dict[str, Any] = {"z": "last", "a": {"nested": [1.5, "x"]}, "ü": 1}


def assert_encoded_as_dramatiq_does(raw: bytes) -> None:
    """``raw`` (a message sent with `PAYLOAD_KWARGS`) has Dramatiq's seven fields in its
    order, the kwargs in the order sent, and Dramatiq's JSON: compact separators,
    ensure_ascii, key order kept (spec §1.2)."""
    # The fields Dramatiq's Message.asdict() writes, in its order.
    assert list(envelope(raw)) == [f.name for f in dataclasses.fields(dramatiq.Message)]
    assert list(envelope(raw)["kwargs"]) == ["z", "a", "ü"]
    assert raw == json.dumps(envelope(raw), separators=(",", ":")).encode()


def assert_each_ran_once(
    calls: list[Call],
    sent: dict[str, tuple[list[Any], dict[str, Any]]],
    *,
    side: str,
    queue_name: str,
    actor_name: str,
) -> None:
    """Every message of ``sent`` (message id -> args, kwargs) ran exactly once, on
    ``side``, with its arguments, from ``queue_name``."""
    counts = Counter(call.message["message_id"] for call in calls)
    assert counts == dict.fromkeys(sent, 1), "every message exactly once"
    for call in calls:
        assert call.side == side
        sent_args, sent_kwargs = sent[call.message["message_id"]]
        assert call.args == sent_args
        assert call.kwargs == sent_kwargs
        assert call.message["queue_name"] == queue_name
        assert call.message["actor_name"] == actor_name


def assert_ran_after_their_eta(
    calls: list[Call], delayed: list[Envelope], immediate: Envelope, *, side: str, queue_name: str
) -> dict[str, Call]:
    """Each message ran once; ``immediate`` before every delayed one; each delayed one on
    ``side`` after its eta, promoted (``queue_name``, no eta, its timestamp and args).
    Returns the calls by message id."""
    assert Counter(c.message["message_id"] for c in calls) == {
        m["message_id"]: 1 for m in [*delayed, immediate]
    }
    by_id = {c.message["message_id"]: c for c in calls}
    assert by_id[immediate["message_id"]].started_ms < min(
        by_id[m["message_id"]].started_ms for m in delayed
    )
    for stored in delayed:
        call = by_id[stored["message_id"]]
        assert call.side == side
        assert call.started_ms >= stored["options"]["eta"], "ran before its eta"
        assert call.message["queue_name"] == queue_name
        assert "eta" not in call.message["options"]
        assert call.message["message_timestamp"] == stored["message_timestamp"]
        assert call.args == stored["args"]
    return by_id


def assert_retried_once(
    first: Call, second: Call, stored: Envelope, *, side: str, queue_name: str
) -> dict[str, Any]:
    """``stored`` (``flaky(7, x="y")``, max_retries=3, `FAST_RETRY`) failed once on
    ``side`` and its retry ran after the backoff; returns the retry's options."""
    for call in (first, second):
        assert call.side == side
        assert call.message["message_id"] == stored["message_id"]
        assert call.message["message_timestamp"] == stored["message_timestamp"]
        assert call.message["queue_name"] == queue_name
        assert "eta" not in call.message["options"]
        assert call.args == [7]
        assert call.kwargs == {"x": "y"}
    assert first.message["options"] == stored["options"]
    options: dict[str, Any] = second.message["options"]
    assert options["retries"] == 1
    assert "Boom" in options["traceback"]
    assert isinstance(options["requeue_timestamp"], int)
    assert options["max_retries"] == 3
    # The retry waited its backoff (50-100 ms) in the delay queue.
    assert second.started_ms - first.started_ms >= 49
    return options


def send_mixed_load(sides: tuple[Side[Any], Side[Any]]) -> tuple[list[str], list[str]]:
    """From each side: 20 plain and 2 delayed ``echo`` messages, and 3 ``flaky`` ones
    that fail once. Returns the ids of the (echo, flaky) messages."""
    plain: list[str] = []
    flaky: list[str] = []
    for side in sides:
        for i in range(20):
            plain.append(envelope(side.send("echo", args=(side.label, i)))["message_id"])
        for i in range(2):
            plain.append(envelope(side.send("echo", args=(side.label, i), delay=150))["message_id"])
        for i in range(3):
            sent = side.send("flaky", args=(i,), max_retries=3, **FAST_RETRY)
            flaky.append(envelope(sent)["message_id"])
    return plain, flaky


# -- the two libraries behind one interface ----------------------------------------------


class _Broker(Protocol):
    """What a `Side` needs of either library's broker."""

    def close(self) -> None: ...

    def flush(self, queue_name: str) -> None: ...


class _Worker(Protocol):
    def stop(self) -> None: ...


B = TypeVar("B", bound=_Broker)
DqB = TypeVar("DqB", bound=dq.broker.Broker)
DramatiqB = TypeVar("DramatiqB", bound=dramatiq.broker.Broker)


class Side(abc.ABC, Generic[B]):
    """One library's broker (and, once started, worker) on the test's queue."""

    label: str

    def __init__(self, broker: B, queue_name: str) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.actors: dict[str, Any] = {}
        self.worker: _Worker | None = None
        self.closed = False

    @abc.abstractmethod
    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        """Declare an actor named ``actor_name`` on the queue that runs ``behaviour``."""

    @abc.abstractmethod
    def current_message(self) -> Envelope:
        """The fields of the message being processed (inside an actor)."""

    @abc.abstractmethod
    def _read(self, raw: bytes) -> Any:
        """``Message.decode(raw)`` with this library."""

    @abc.abstractmethod
    def _options(self, message: Any) -> dict[str, Any]:
        """The options of a message `_read` returned, as plain JSON values."""

    @abc.abstractmethod
    def start_worker(self, threads: int = WORKER_THREADS) -> None: ...

    def send(
        self,
        actor_name: str,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: int | None = None,
        **options: Any,
    ) -> bytes:
        """Enqueue through this library; return the encoded copy it stored or published."""
        stored = self.actors[actor_name].send_with_options(
            args=args, kwargs=kwargs, delay=delay, **options
        )
        encoded: bytes = stored.encode()
        return encoded

    def decode(self, raw: bytes) -> Envelope:
        """Decode with this library's ``Message.decode``; return the fields it read."""
        message = self._read(raw)
        return {
            "queue_name": message.queue_name,
            "actor_name": message.actor_name,
            "args": json.loads(json.dumps(list(message.args))),
            "kwargs": json.loads(json.dumps(dict(message.kwargs))),
            "options": self._options(message),
            "message_id": message.message_id,
            "message_timestamp": message.message_timestamp,
        }

    def reencode(self, raw: bytes) -> bytes:
        """``Message.decode(raw).encode()`` with this library."""
        encoded: bytes = self._read(raw).encode()
        return encoded

    def stop_worker(self) -> None:
        if self.worker is not None:
            worker, self.worker = self.worker, None
            worker.stop()

    def flush(self, queue_name: str) -> None:
        self.broker.flush(queue_name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.broker.close()

    def _wrap(self, actor_name: str, behaviour: Behaviour) -> Callable[..., None]:
        def fn(*args: Any, **kwargs: Any) -> None:
            behaviour(
                Call(
                    side=self.label,
                    actor_name=actor_name,
                    args=list(args),
                    kwargs=dict(kwargs),
                    message=self.current_message(),
                    started_ms=now_ms(),
                )
            )

        fn.__name__ = actor_name
        return fn


class DqSide(Side[DqB]):
    """dq's side: ``broker`` gets CurrentMessage and becomes dq's global broker."""

    label = "dq"

    def __init__(self, broker: DqB, queue_name: str) -> None:
        super().__init__(broker, queue_name)
        broker.add_middleware(dq.middleware.CurrentMessage())
        dq.set_broker(broker)

    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        fn = self._wrap(actor_name, behaviour)
        self.actors[actor_name] = dq.actor(
            actor_name=actor_name, queue_name=self.queue_name, broker=self.broker
        )(fn)

    def current_message(self) -> Envelope:
        message = dq.middleware.CurrentMessage.get_current_message()
        assert message is not None
        return envelope(message.encode())

    def _read(self, raw: bytes) -> dq.Message[Any]:
        return dq.Message.decode(raw)

    def _options(self, message: Any) -> dict[str, Any]:
        options: dict[str, Any] = envelope(message.encode())["options"]
        return options

    def start_worker(self, threads: int = WORKER_THREADS) -> None:
        worker = dq.Worker(self.broker, worker_threads=threads, worker_timeout=WORKER_TIMEOUT)
        self.worker = worker
        worker.start()


class DramatiqSide(Side[DramatiqB]):
    """Dramatiq's side: ``broker`` gets CurrentMessage and becomes Dramatiq's global
    broker."""

    label = "dramatiq"

    def __init__(self, broker: DramatiqB, queue_name: str) -> None:
        super().__init__(broker, queue_name)
        broker.add_middleware(dramatiq.middleware.CurrentMessage())
        dramatiq.set_broker(broker)

    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        fn = self._wrap(actor_name, behaviour)
        self.actors[actor_name] = dramatiq.actor(
            actor_name=actor_name, queue_name=self.queue_name, broker=self.broker
        )(fn)

    def current_message(self) -> Envelope:
        message = dramatiq.middleware.CurrentMessage.get_current_message()
        assert message is not None
        return envelope(message.encode())

    def _read(self, raw: bytes) -> dramatiq.Message[Any]:
        return dramatiq.Message.decode(raw)

    def _options(self, message: Any) -> dict[str, Any]:
        options: dict[str, Any] = json.loads(json.dumps(message.options))
        return options

    def start_worker(self, threads: int = WORKER_THREADS) -> None:
        worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=WORKER_TIMEOUT)
        self.worker = worker
        worker.start()


# -- both at once --------------------------------------------------------------------------


@dataclass
class Fleet:
    """Both libraries on one queue; ``producer`` sends and ``consumer`` works."""

    dq: DqSide[Any]
    dramatiq: DramatiqSide[Any]
    producer: Side[Any]
    consumer: Side[Any]

    @property
    def sides(self) -> tuple[Side[Any], Side[Any]]:
        return (self.dq, self.dramatiq)

    def declare(self, actor_name: str, behaviour: Behaviour) -> None:
        """Declare the same actor (name and queue) on both sides."""
        for side in self.sides:
            side.declare(actor_name, behaviour)

    def shutdown(self) -> None:
        """Stop both workers, then close both brokers (idempotent)."""
        for side in self.sides:
            side.stop_worker()
        for side in self.sides:
            side.close()

    def assert_both_read(self, raw: bytes, fields: Envelope) -> None:
        """Both libraries decode ``raw`` to ``fields`` and re-encode it byte for byte."""
        for side in self.sides:
            assert side.decode(raw) == fields, side.label
            assert side.reencode(raw) == raw, side.label


def directed(
    direction: str, dq_side: DqSide[Any], dramatiq_side: DramatiqSide[Any]
) -> tuple[Side[Any], Side[Any]]:
    """(producer, consumer) for one of `DIRECTIONS`."""
    if direction == "dramatiq-to-dq":
        return dramatiq_side, dq_side
    return dq_side, dramatiq_side


@contextlib.contextmanager
def kept_global_brokers() -> Iterator[None]:
    """On exit, both libraries' global brokers (and dq's waiting actors) are as on entry."""
    dramatiq_previous = dramatiq.broker.global_broker
    try:
        with kept_global_broker():
            yield
    finally:
        dramatiq.broker.global_broker = dramatiq_previous
