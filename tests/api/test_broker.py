"""The Broker API's plumbing: middleware, hooks, actors, the global broker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

import dq
import dq.broker
from dq import ActorNotFound, Broker
from dq.brokers.stub import StubBroker
from dq.middleware import Middleware, SkipMessage
from dq.middleware.middleware import HOOK_NAMES
from tests.support.global_broker import kept_global_broker


class First(Middleware):
    pass


class Second(Middleware):
    @property
    def actor_options(self) -> set[str]:
        return {"colour"}


class Third(Middleware):
    pass


def test_default_middleware_are_installed_and_an_explicit_list_is_used_as_is() -> None:
    assert [type(m) for m in StubBroker().middleware] == dq.middleware.default_middleware
    assert StubBroker(middleware=[]).middleware == []
    assert StubBroker(middleware=[]).actor_options == set()


def test_add_middleware_before_and_after() -> None:
    first, second = First(), Second()
    broker = StubBroker(middleware=[first, second])
    third = Third()
    broker.add_middleware(third, before=Second)
    assert broker.middleware == [first, third, second]
    fourth = Third()
    broker.add_middleware(fourth, after=First)
    assert broker.middleware == [first, fourth, third, second]
    assert broker.actor_options == {"colour"}


def test_add_middleware_with_a_missing_reference_names_it() -> None:
    broker = StubBroker(middleware=[First()])
    with pytest.raises(ValueError, match="Third not found"):
        broker.add_middleware(Second(), before=Third)
    with pytest.raises(AssertionError):
        broker.add_middleware(Second(), before=First, after=First)
    with pytest.raises(TypeError, match="Middleware instance"):
        broker.add_middleware(object())  # type: ignore[arg-type]  # the point


def test_adding_a_second_instance_of_a_type_warns(caplog: pytest.LogCaptureFixture) -> None:
    broker = StubBroker(middleware=[First()])
    with caplog.at_level(logging.WARNING):
        broker.add_middleware(First())
    assert "already in the stack" in caplog.text
    assert len(broker.middleware) == 2


def test_added_middleware_sees_what_was_already_declared() -> None:
    seen: list[str] = []

    class Late(Middleware):
        def after_declare_queue(self, broker: Broker, queue_name: str) -> None:
            seen.append(queue_name)

        def after_declare_delay_queue(self, broker: Broker, queue_name: str) -> None:
            seen.append(queue_name)

    broker = StubBroker(middleware=[])
    broker.declare_queue("q")
    broker.add_middleware(Late())
    # As Dramatiq: the stub declares q.DQ as a queue too, so it is replayed as both.
    assert sorted(seen) == ["q", "q.DQ", "q.DQ"]


def test_emit_before_runs_in_order_and_after_in_reverse() -> None:
    calls: list[str] = []

    def recorder(tag: str) -> Middleware:
        class R(Middleware):
            def before_process_message(self, broker: Broker, message: Any) -> None:
                calls.append("before " + tag)

            def after_process_message(
                self,
                broker: Broker,
                message: Any,
                *,
                result: Any = None,
                exception: BaseException | None = None,
            ) -> None:
                calls.append(f"after {tag} {result}")

        return R()

    broker = StubBroker(middleware=[recorder("a"), recorder("b")])
    broker.emit_before("process_message", None)
    broker.emit_after("process_message", None, result=7)
    assert calls == ["before a", "before b", "after b 7", "after a 7"]
    with pytest.raises(ValueError, match="no middleware hook"):
        broker.emit_before("nonsense")


def test_hook_failures_are_logged_and_do_not_propagate(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Middleware):
        def before_ack(self, broker: Broker, message: Any) -> None:
            raise RuntimeError("hook broke")

        def after_ack(self, broker: Broker, message: Any) -> None:
            raise RuntimeError("after hook broke")

    class Skipper(Middleware):
        def before_process_message(self, broker: Broker, message: Any) -> None:
            raise SkipMessage()

    broker = StubBroker(middleware=[Broken(), Skipper()])
    with caplog.at_level(logging.CRITICAL):
        broker.emit_before("ack", None)
        broker.emit_after("ack", None)
    assert "before_ack of Broken" in caplog.text
    assert "after_ack of Broken" in caplog.text
    with pytest.raises(SkipMessage):  # MiddlewareErrors do propagate from before_*
        broker.emit_before("process_message", None)


def test_only_overridden_hooks_are_called() -> None:
    class OnlyAck(Middleware):
        def after_ack(self, broker: Broker, message: Any) -> None:
            pass

    broker = StubBroker(middleware=[OnlyAck()])
    assert broker._hooks.after_ack and not broker._hooks.before_enqueue
    assert len(HOOK_NAMES) == 24


def test_get_actor_and_results_backend() -> None:
    broker = StubBroker(middleware=[])
    with pytest.raises(ActorNotFound) as info:
        broker.get_actor("missing")
    assert str(info.value) == "missing"
    assert broker.get_results_backend() is None


@pytest.fixture
def no_global_broker() -> Iterator[None]:
    with kept_global_broker():
        dq.broker.global_broker = None
        dq.broker._floating.clear()
        yield


@pytest.mark.usefixtures("no_global_broker")
def test_get_broker_without_one_raises_naming_set_broker() -> None:
    with pytest.raises(RuntimeError, match=r"dq\.set_broker"):
        dq.get_broker()
    with pytest.raises(TypeError, match="Broker instance"):
        dq.set_broker("redis://")  # type: ignore[arg-type]  # the point


@pytest.mark.usefixtures("no_global_broker")
def test_actors_defined_before_set_broker_are_declared_when_it_is_set() -> None:
    @dq.actor(queue_name="early")
    def early(x: int) -> int:
        return x

    with pytest.raises(RuntimeError, match="no broker yet"):
        early.send(1)
    first = StubBroker(middleware=[])
    dq.set_broker(first)
    assert dq.get_broker() is first
    assert first.get_actor("early") is early
    assert "early" in first.get_declared_queues()
    early.send(1)
    assert first.queues["early"].qsize() == 1
    # A later broker gets it too (tests often build a fresh broker each time).
    second = StubBroker(middleware=[])
    dq.set_broker(second)
    assert second.get_actor("early") is early
    assert early.broker is second


@pytest.mark.usefixtures("no_global_broker")
def test_an_unknown_option_on_an_early_actor_fails_when_it_is_bound() -> None:
    @dq.actor(colour="red")
    def painted() -> None:
        pass

    with pytest.raises(ValueError, match="colour"):
        dq.set_broker(StubBroker(middleware=[]))
