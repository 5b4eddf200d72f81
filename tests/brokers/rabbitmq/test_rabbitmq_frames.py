"""`parse_delivery`, the RabbitMQ consumer's decoder of whole deliveries, against pika's
own frame encoder and decoder (no server needed)."""

from __future__ import annotations

from typing import Any

import pika.exceptions
import pika.frame
import pika.spec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dq.brokers.rabbitmq import parse_delivery

BODY_MAX = 4096 - 8  # a small frame_max: bodies of a few KiB span several frames

short_strings = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
).filter(lambda s: len(s.encode()) < 256)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[int, pika.spec.Basic.Deliver, Any, bytes]:
    channel = draw(st.integers(1, 65535))
    method = pika.spec.Basic.Deliver(
        consumer_tag=draw(short_strings),
        delivery_tag=draw(st.integers(1, 2**64 - 1)),
        redelivered=draw(st.booleans()),
        exchange=draw(short_strings),
        routing_key=draw(short_strings),
    )
    properties = pika.spec.BasicProperties(
        delivery_mode=draw(st.sampled_from([None, 1, 2])),
        priority=draw(st.none() | st.integers(0, 255)),
        content_type=draw(st.none() | short_strings),
        headers=draw(st.none() | st.dictionaries(short_strings, st.integers(0, 2**31 - 1))),
    )
    body = draw(st.binary(max_size=3 * BODY_MAX + 7))
    return channel, method, properties, body


def encode(channel: int, method: Any, properties: Any, body: bytes) -> bytes:
    frames = [
        pika.frame.Method(channel, method).marshal(),
        pika.frame.Header(channel, len(body), properties).marshal(),
    ]
    for offset in range(0, len(body), BODY_MAX):
        frames.append(pika.frame.Body(channel, body[offset : offset + BODY_MAX]).marshal())
    return b"".join(frames)


def frame_count(body: bytes) -> int:
    return 2 + -(-len(body) // BODY_MAX)


@given(deliveries(), st.binary(max_size=20))
def test_a_whole_delivery_decodes_as_pika_decodes_it(
    delivery: tuple[int, pika.spec.Basic.Deliver, Any, bytes], before: bytes
) -> None:
    channel, method, properties, body = delivery
    data = encode(channel, method, properties, body)
    # What follows it (here: another delivery) is left alone.
    stream = before + data + data
    got = parse_delivery(stream, len(before), channel)
    assert got is not None
    assert got.end == len(before) + len(data)
    assert got.frames == frame_count(body)
    assert got.body == body
    # pika's decoder, frame by frame, gives the same method and properties.
    _, pika_method = pika.frame.decode_frame(data)
    assert isinstance(pika_method, pika.frame.Method)
    assert vars(got.method) == vars(pika_method.method)
    _, pika_header = pika.frame.decode_frame(data[len(pika_method.marshal()) :])
    assert isinstance(pika_header, pika.frame.Header)
    assert vars(got.properties) == vars(pika_header.properties)
    again = parse_delivery(stream, got.end, channel)
    assert again is not None and again.end == len(stream)


@given(deliveries(), st.data())
def test_a_partial_delivery_is_left_to_pika(
    delivery: tuple[int, pika.spec.Basic.Deliver, Any, bytes], data: st.DataObject
) -> None:
    channel, method, properties, body = delivery
    whole = encode(channel, method, properties, body)
    cut = data.draw(st.integers(0, len(whole) - 1))
    assert parse_delivery(whole[:cut], 0, channel) is None


@given(deliveries())
def test_another_channel_or_method_is_left_to_pika(
    delivery: tuple[int, pika.spec.Basic.Deliver, Any, bytes],
) -> None:
    channel, method, properties, body = delivery
    other = channel % 65535 + 1
    assert parse_delivery(encode(channel, method, properties, body), 0, other) is None
    ok = pika.frame.Method(channel, pika.spec.Basic.QosOk()).marshal()
    assert parse_delivery(ok + encode(channel, method, properties, body), 0, channel) is None
    heartbeat = pika.frame.Heartbeat().marshal()
    assert parse_delivery(heartbeat, 0, channel) is None


def test_a_frame_without_its_end_marker_is_an_error() -> None:
    method = pika.spec.Basic.Deliver("ctag", 1, False, "", "q")
    data = bytearray(encode(1, method, pika.spec.BasicProperties(), b"body"))
    data[-1] = 0x00
    with pytest.raises(pika.exceptions.InvalidFrameError):
        parse_delivery(bytes(data), 0, 1)
