"""Pinned types of messages and of the pure core.

Only mypy reads this file (``typing.assert_type`` checks); nothing runs at import.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, assert_type

import dq
import dq.core
from dq import Message
from dq.core import BrokerState, Command, Step


def decoding_and_encoding(message: Message[int]) -> None:
    assert_type(Message.decode(b"{}"), Message[Any])
    assert_type(message.encode(), bytes)


def copies_keep_the_type(message: Message[int], core: dq.core.Message[str]) -> None:
    assert_type(message.copy(), Message[int])
    assert_type(message.copy(queue_name="q", options={"eta": 0}), Message[int])
    assert_type(message.without_option("eta"), Message[int])
    assert_type(message._replace(queue_name="q"), Message[int])
    assert_type(core.copy(args=(1,)), dq.core.Message[str])
    assert_type(core.without_option("eta"), dq.core.Message[str])


def fields(message: Message[int]) -> None:
    assert_type(message.queue_name, str)
    assert_type(message.actor_name, str)
    assert_type(message.args, tuple[Any, ...])
    assert_type(message.kwargs, dq.core.FrozenDict[str, Any])
    assert_type(message.options, dq.core.FrozenDict[str, Any])
    assert_type(message.message_id, str)
    assert_type(message.message_timestamp, int)
    assert_type(message.message_datetime, datetime)
    assert_type(message.asdict(), dict[str, Any])
    core: dq.core.Message[int] = message  # the public message is a core message


def built_messages() -> None:
    annotated: Message[int] = Message("default", "add", (1, 2))
    built: Message[int] = Message.build(queue_name="default", actor_name="add", args=(1, 2))
    # With no actor to say otherwise, a message's result type is Any (not Never).
    assert_type(Message("default", "add", (1, 2)), Message[Any])
    assert_type(Message.build(queue_name="default", actor_name="add"), Message[Any])


def encoders() -> None:
    assert_type(dq.get_encoder(), dq.Encoder)
    assert_type(dq.set_encoder(dq.JSONEncoder()), None)


def the_core(state: BrokerState, command: Command, message: dq.core.Message[Any]) -> None:
    assert_type(dq.core.apply(state, command), Step)
    assert_type(dq.core.apply(state, dq.core.DeclareQueue("default")), Step)
    assert_type(dq.core.apply(state, dq.core.Enqueue(message, b"{}")), Step)
    assert_type(dq.core.initial_state(), BrokerState)
    step = dq.core.apply(dq.core.initial_state(), dq.core.DeclareQueue("default"))
    assert_type(step.state, BrokerState)
    assert_type(step.effects, tuple[dq.core.effects.Effect, ...])
    assert_type(step.events, tuple[dq.core.events.Event, ...])


def check_pipelines_of_messages_and_groups(
    first: Message[int], second: Message[str], members: list[Message[int]]
) -> None:
    assert_type(first | second, dq.pipeline)
    assert_type(first | dq.group(members), dq.pipeline)  # a group as a step (dq addition)
    assert_type(first | dq.pipeline([second]), dq.pipeline)
