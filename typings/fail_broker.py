"""Misuses of brokers and messages that mypy must reject (run by tests/api/test_typing.py).

Each line that must fail ends with ``# E: <code>[, <code>...]``: the exact mypy error
codes expected on that line. Every other line must type-check. mypy.ini excludes
``typings/fail_*.py`` from the normal run.
"""

from __future__ import annotations

from typing import Any

import dq
import dq.core
from dq import Message
from dq.brokers.stub import StubBroker


def wrong_enqueues(message: Message[int]) -> None:
    dq.get_broker().enqueue(123)  # E: type-var
    StubBroker().enqueue("message")  # E: type-var
    dq.get_broker().enqueue(message, delay="1s")  # E: arg-type
    dq.get_broker().enqueue(message, 100)  # E: call-arg
    # mypy solves M from the expected type, so it reports the argument, not the assignment.
    same: Message[str] = StubBroker().enqueue(message)  # E: arg-type
    dq.set_broker(object())  # E: arg-type


def core_messages_are_not_enqueued(core: dq.core.Message[int]) -> None:
    # Brokers take the public `dq.Message`; the core's record is one step below it.
    StubBroker().enqueue(core)  # E: type-var
    dq.get_broker().enqueue(core)  # E: type-var


def wrong_consumers(broker: StubBroker) -> None:
    consumer = broker.consume("default")
    proxy = next(consumer)
    as_message: Message[Any] = proxy  # E: assignment
    maybe: None = next(consumer)  # E: assignment
    consumer.ack(proxy.message)  # E: arg-type


def frozen_messages(message: Message[int]) -> None:
    message.options = {}  # E: misc, assignment
    message.options = message.options  # E: misc
    message.queue_name = "other"  # E: misc
    message.args = ()  # E: misc
    message.copy(nope=1)  # E: call-arg
    decoded: Message[int] = Message.decode(b"{}")
    encoded: str = message.encode()  # E: assignment


def wrong_core(state: dq.core.BrokerState) -> None:
    dq.core.apply(state, "declare")  # E: arg-type
    dq.core.apply("state", dq.core.FlushAll())  # E: arg-type
    state_only: dq.core.BrokerState = dq.core.apply(state, dq.core.FlushAll())  # E: assignment
