"""Actors: both decorator forms, options, sending, calling, GenericActor."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

import dq
from dq import GenericActor
from dq.brokers.stub import StubBroker
from dq.common import current_millis
from dq.middleware import Middleware


def test_bare_and_called_decorators_make_actors(stub_broker: StubBroker) -> None:
    @dq.actor
    def bare(x: int) -> int:
        return x * 2

    @dq.actor()
    def called(x: int) -> int:
        return x * 3

    @dq.actor(actor_name="renamed", queue_name="other", priority=5)
    def configured() -> None:
        pass

    assert (bare.actor_name, bare.queue_name, bare.priority) == ("bare", "default", 0)
    assert bare(21) == 42 and called(2) == 6
    assert (configured.actor_name, configured.queue_name, configured.priority) == (
        "renamed",
        "other",
        5,
    )
    assert stub_broker.get_actor("renamed") is configured
    assert {"default", "other"} <= stub_broker.get_declared_queues()


@pytest.mark.parametrize(
    "name", ["$q", "1q", "", "a b", "q.DQ", "q.XQ", "q.msgs", "__heartbeats__", "__acks__.x"]
)
def test_bad_queue_names_are_refused_at_decoration(stub_broker: StubBroker, name: str) -> None:
    with pytest.raises(ValueError, match="Queue name") as info:

        @dq.actor(queue_name=name)
        def f() -> None:
            pass

    assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["a", "_q", "a.b-c_1", "Q9"])
def test_good_queue_names(stub_broker: StubBroker, name: str) -> None:
    @dq.actor(queue_name=name)
    def f() -> None:
        pass

    assert f.queue_name == name


def test_unknown_options_are_refused_listing_the_known_ones(stub_broker: StubBroker) -> None:
    class Colours(Middleware):
        @property
        def actor_options(self) -> set[str]:
            return {"colour"}

    with pytest.raises(ValueError, match=r"\['size'\].*known options: \[\]"):

        @dq.actor(size=3)
        def f() -> None:
            pass

    stub_broker.add_middleware(Colours())

    @dq.actor(colour="red")
    def g() -> None:
        pass

    assert g.options == {"colour": "red"}


def test_two_actors_with_one_name_are_refused(stub_broker: StubBroker) -> None:
    @dq.actor
    def twin() -> None:
        pass

    with pytest.raises(ValueError, match="already registered"):

        @dq.actor(actor_name="twin")
        def other() -> None:
            pass


def test_send_returns_the_stored_message(stub_broker: StubBroker) -> None:
    @dq.actor
    def add(x: int, y: int) -> int:
        return x + y

    message = add.send(1, 2)
    assert message.args == (1, 2) and message.kwargs == {}
    assert message.queue_name == "default" and message.actor_name == "add"
    assert uuid.UUID(message.message_id).version == 4
    assert abs(message.message_timestamp - current_millis()) < 5000
    consumer = stub_broker.consume("default", timeout=10)
    assert next(consumer) == message


def test_send_with_options_and_a_timedelta_delay(stub_broker: StubBroker) -> None:
    @dq.actor
    def f(x: int) -> None:
        pass

    a = f.send_with_options(args=(1,), delay=timedelta(seconds=1))
    b = f.send_with_options(args=(1,), delay=1000)
    assert a.queue_name == b.queue_name == "default.DQ"
    assert 0 <= b.options["eta"] - a.options["eta"] < 1000
    c = f.send_with_options(kwargs={"x": 3}, extra=True)
    assert c.kwargs == {"x": 3} and c.options == {"extra": True}


def test_message_with_options_turns_callback_actors_into_names(stub_broker: StubBroker) -> None:
    @dq.actor
    def f() -> None:
        pass

    @dq.actor
    def done() -> None:
        pass

    m = f.message_with_options(on_success=done, on_failure="named")
    assert m.options == {"on_success": "done", "on_failure": "named"}
    with pytest.raises(TypeError, match="on_success"):
        f.message_with_options(on_success=print)
    built = f.message()
    assert built.args == () and built.queue_name == "default"


def test_sending_unserialisable_arguments_fails_at_once(stub_broker: StubBroker) -> None:
    @dq.actor
    def f(x: Any) -> None:
        pass

    with pytest.raises(TypeError):
        f.send({1, 2})
    assert stub_broker.queues["default"].qsize() == 0


def test_str_and_repr(stub_broker: StubBroker) -> None:
    @dq.actor
    def shown() -> None:
        pass

    assert str(shown) == "Actor(shown)"
    assert repr(shown).startswith("Actor(<function ")
    assert repr(shown).endswith("queue_name='default', actor_name='shown')")


def test_async_actor_needs_the_event_loop_to_be_called(stub_broker: StubBroker) -> None:
    @dq.actor
    async def coro(x: int) -> int:
        return x

    assert coro.is_async
    assert coro.send(1).args == (1,)
    with pytest.raises(RuntimeError, match="AsyncIO"):
        coro(1)


def test_an_explicit_broker_wins(stub_broker: StubBroker) -> None:
    other = StubBroker(middleware=[])

    @dq.actor(broker=other)
    def f() -> None:
        pass

    assert f.broker is other
    assert other.get_actor("f") is f
    with pytest.raises(dq.ActorNotFound):
        stub_broker.get_actor("f")


def test_generic_actor(stub_broker: StubBroker) -> None:
    class Base(GenericActor):
        class Meta:
            abstract = True
            queue_name = "generic"

        def perform(self, x: int) -> int:
            return x + 1

    class Concrete(Base):
        pass

    class Named(GenericActor):
        class Meta:
            actor_name = "custom"

        def perform(self) -> str:
            return "hi"

    assert isinstance(Base, type)
    concrete: Any = Concrete
    assert concrete.queue_name == "generic" and concrete.actor_name == "Concrete"
    assert concrete(1) == 2
    assert concrete.send(5).args == (5,)
    assert stub_broker.get_actor("custom").fn() == "hi"
    with pytest.raises(AttributeError):
        GenericActor.missing  # noqa: B018 - the lookup is the test

    class NoPerform(GenericActor):
        class Meta:
            actor_name = "noperform"

    with pytest.raises(NotImplementedError):
        NoPerform()


# -- option values are checked at the boundary (issue 16) -----------------------------------


@pytest.fixture
def default_broker(stub_broker: StubBroker) -> StubBroker:
    """A StubBroker with the default middleware (their options are known), global."""
    broker = StubBroker()
    dq.set_broker(broker)
    return broker


BAD_OPTIONS = [
    ("time_limit", "x", "a number of ms >= 0, inf, or null"),
    ("max_retries", -1, "an integer >= 0"),
    ("max_retries", 2.5, "an integer >= 0"),
    ("max_backoff", -100, "a number of ms >= 0"),
    ("min_backoff", float("nan"), "a number of ms >= 0"),
    ("max_age", "old", "a number of ms >= 0"),
    ("notify_shutdown", "yes", "true, false or null"),
    ("retries", -3, "an integer >= 0"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_OPTIONS)
def test_send_with_options_refuses_a_bad_option_value_naming_it(
    default_broker: StubBroker, key: str, value: Any, expected: str
) -> None:
    @dq.actor
    def f() -> None: ...

    options: dict[str, Any] = {key: value}
    for build in (f.send_with_options, f.message_with_options):
        with pytest.raises(ValueError, match="actor 'f'") as raised:
            build(**options)
        text = str(raised.value)
        assert repr(key) in text and repr(value) in text and expected in text
    assert default_broker.queues["default"].qsize() == 0  # nothing was sent


@pytest.mark.parametrize(("key", "value", "expected"), BAD_OPTIONS)
def test_an_actor_declared_with_a_bad_option_value_is_refused(
    default_broker: StubBroker, key: str, value: Any, expected: str
) -> None:
    options: dict[str, Any] = {key: value}
    with pytest.raises(ValueError, match="options of actor 'f'") as raised:

        @dq.actor(**options)
        def f() -> None: ...

    text = str(raised.value)
    assert repr(key) in text and repr(value) in text and expected in text
    assert "f" not in default_broker.actors


def test_dramatiq_option_values_are_accepted(default_broker: StubBroker) -> None:
    # What Dramatiq gives a meaning, including the values the core's rule does not
    # list: an infinite limit is none, a falsy message value falls through.
    valid: dict[str, Any] = {
        "time_limit": float("inf"),
        "max_age": None,
        "max_retries": None,
        "min_backoff": 0,
        "max_backoff": float("inf"),
        "notify_shutdown": None,
        "retry_when": lambda retries, exc: False,
        "throws": (KeyError,),
    }

    @dq.actor(**valid)
    def f() -> None: ...

    @dq.actor(time_limit=0, max_retries=0, max_age=0, min_backoff=10.5, max_backoff=0)
    def g() -> None: ...

    f.send_with_options(time_limit=0, max_retries=3, notify_shutdown=True, eta=None)
    g.send_with_options(time_limit=1.5, max_age=float("inf"), custom_option="anything")
    assert default_broker.queues["default"].qsize() == 2
