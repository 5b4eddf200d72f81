"""The AMQP frame codec of the RabbitMQ broker: bytes in, records out, and back.

No sockets, no connection: it decodes a whole ``basic.deliver`` (method frame, content
header, body frames) from a byte string, finds the end of a whole frame, and encodes the
frames of ``basic.publish`` batches. It uses pika's public spec classes for the method
and the properties, so what it decodes is what pika's reader would decode.

pika decodes each frame into objects, runs it through its callback registry and
reassembles the content: over half of an idle consumer's time between the socket waking
it and the message reaching the worker. `parse_delivery` is the same decoding, written
for the one frame sequence that matters (`dq.brokers.rabbitmq._pika` says when it runs).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

import pika.exceptions
import pika.frame
import pika.spec

__all__ = [
    "INCOMPLETE",
    "Delivered",
    "parse_delivery",
    "publish_frames",
    "read_delivery",
    "whole_frame",
]

_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_METHOD_ID = struct.Struct(">I")
_CONTENT_HEADER = struct.Struct(">HHQ")  # class, weight, body size
_DELIVER_ID = pika.spec.Basic.Deliver.INDEX
_FRAME_END = 0xCE
_CACHED_METHODS = 1024  # marshalled basic.publish frames kept per cache

#: What `read_delivery` returns for a delivery whose rest has not arrived yet.
INCOMPLETE: Final = "incomplete"


class Delivered(NamedTuple):
    """One whole delivery decoded by `parse_delivery`."""

    end: int  # the offset just past its last frame
    frames: int
    method: pika.spec.Basic.Deliver
    properties: pika.spec.BasicProperties
    body: bytes


def _frame_at(data: bytes, offset: int, kind: int, channel: int) -> tuple[int, int] | str | None:
    """The payload's (start, stop) of a whole frame of ``kind`` on ``channel`` at
    ``offset``; None if another frame is there; `INCOMPLETE` if not all of it is."""
    if len(data) - offset < 7:
        return INCOMPLETE
    frame_kind, number, size = _FRAME_HEADER.unpack_from(data, offset)
    if frame_kind != kind or number != channel:
        return None
    start = offset + 7
    stop = start + size
    if stop >= len(data):
        return INCOMPLETE
    if data[stop] != _FRAME_END:
        raise pika.exceptions.InvalidFrameError("Invalid FRAME_END marker")
    return start, stop


def whole_frame(data: bytes, offset: int) -> int:
    """The size of the frame at ``data[offset]`` if all of it is there, else 0."""
    if len(data) - offset < 7:
        return 0
    size = int(_FRAME_HEADER.unpack_from(data, offset)[2]) + 8
    return size if offset + size <= len(data) else 0


def _is_delivery(data: bytes, offset: int, channel: int) -> bool:
    """Whether a ``basic.deliver`` method frame on ``channel`` starts at ``offset``."""
    return (
        len(data) - offset >= 11
        and _FRAME_HEADER.unpack_from(data, offset)[:2] == (pika.spec.FRAME_METHOD, channel)
        and _METHOD_ID.unpack_from(data, offset + 7)[0] == _DELIVER_ID
    )


def parse_delivery(data: bytes, offset: int, channel: int) -> Delivered | None:
    """Decode the whole ``basic.deliver`` on ``channel`` that starts at ``data[offset]``
    (its method frame, content header and body frames), or return None when something
    else starts there or not all of it has arrived.

    Raises:
        pika.exceptions.InvalidFrameError: a frame lacks its end marker.
        pika.exceptions.BodyTooLongError: the body frames carry more than the header says.
    """
    delivered = read_delivery(data, offset, channel)
    return delivered if isinstance(delivered, Delivered) else None


def read_delivery(data: bytes, offset: int, channel: int) -> Delivered | str | None:
    """`parse_delivery`, telling apart a delivery whose frames so far came in order
    and whose rest has not arrived (`INCOMPLETE`) from anything else (None)."""
    if len(data) - offset >= 11 and not _is_delivery(data, offset, channel):
        return None
    method_frame = _frame_at(data, offset, pika.spec.FRAME_METHOD, channel)
    if not isinstance(method_frame, tuple):
        return method_frame
    start, stop = method_frame
    header = _frame_at(data, stop + 1, pika.spec.FRAME_HEADER, channel)
    if not isinstance(header, tuple):
        return header
    method = pika.spec.Basic.Deliver().decode(data, start + 4)
    header_start, stop = header
    _, _, size = _CONTENT_HEADER.unpack_from(data, header_start)
    properties = pika.spec.BasicProperties()
    properties.decode(data, header_start + 12)
    frames = 2
    parts: list[bytes] = []
    received = 0
    while received < size:
        body = _frame_at(data, stop + 1, pika.spec.FRAME_BODY, channel)
        if not isinstance(body, tuple):
            return body
        body_start, stop = body
        parts.append(data[body_start:stop])
        received += stop - body_start
        frames += 1
    if received != size:
        raise pika.exceptions.BodyTooLongError(received, size)
    return Delivered(stop + 1, frames, method, properties, b"".join(parts))


def publish_frames(
    channel: int,
    items: Sequence[tuple[str, bytes, pika.BasicProperties]],
    *,
    mandatory: bool,
    body_max: int,
    methods: dict[tuple[str, bool], bytes],
) -> tuple[bytes, int]:
    """The frames of one ``basic.publish`` (default exchange) per (routing key, body,
    properties) of ``items`` on ``channel``, as one buffer, and how many frames it holds.

    Args:
        channel: the channel number.
        items: what to publish.
        mandatory: the publishes' mandatory flag.
        body_max: the largest body frame payload (the connection's frame_max less 8).
        methods: marshalled method frames by (routing key, mandatory): looked up and
            filled here (up to a bound), so a queue's method frame is built once.
    """
    frames: list[bytes] = []
    for routing_key, body, properties in items:
        method_frame = methods.get((routing_key, mandatory))
        if method_frame is None:
            method = pika.spec.Basic.Publish(
                exchange="", routing_key=routing_key, mandatory=mandatory
            )
            method_frame = pika.frame.Method(channel, method).marshal()
            if len(methods) < _CACHED_METHODS:
                methods[routing_key, mandatory] = method_frame
        frames.append(method_frame)
        frames.append(pika.frame.Header(channel, len(body), properties).marshal())
        for offset in range(0, len(body), body_max):
            frames.append(pika.frame.Body(channel, body[offset : offset + body_max]).marshal())
    return b"".join(frames), len(frames)
