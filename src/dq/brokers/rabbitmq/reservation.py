"""The reservation protocol of a RabbitMQ consumer, sans I/O: where one ``basic.consume``
stands, as a frozen record, and the pure functions that move it on.

Theory of operation. To reserve ``room`` messages, the consumer sends ``basic.qos``
(prefetch ``room``) and ``basic.consume``, and when the consume-ok comes, a second
``basic.qos`` that changes nothing: the *marker*. The queue hands the consume what is
ready before it answers it, so every delivery of what was ready precedes the marker's
answer. The consume is cancelled once ``room`` arrived, or when the marker came back
after some arrived: the consumer then holds exactly what it reserved. The server's
cancel-ok follows the last delivery of the consume, and all of them are taken. When
the marker comes back before any delivery, nothing was ready: the consumer may wait
for the first message on the open consume. A *subscribed* consume (the consumer's
standing subscription) is never cancelled by the protocol, only by the consumer.

The consumer (`dq.brokers.rabbitmq.consumer`) does the I/O: it feeds each event here
and carries out the effect returned (`SEND_CANCEL`)::

              delivery (room not full)
               +------+
               v      |
            +------------+  marker, none arrived   +------------+
     ------>|    OPEN    |------------------------>| NONE_READY |
            +------------+                         +------------+
               |  room full, or marker after some arrived, |
               |  or cancel asked: SEND_CANCEL           |  room full, or
               v                                         |  cancel asked: SEND_CANCEL
            +------------+  <----------------------------+
            | CANCELLING |
            +------------+
               |  cancel-ok (from any phase)
               v
            +------------+
            | CANCELLED  |  nothing more arrives
            +------------+

Rules: a subscribed consume leaves OPEN only by `cancel` (or the cancel-ok); the cancel
is sent once; nothing moves a CANCELLED reservation.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "Effect",
    "Phase",
    "Reservation",
    "cancel",
    "cancel_ok",
    "delivered",
    "marker_returned",
    "subscribe",
]


class Phase(enum.Enum):
    """Where a consume stands (see the diagram above)."""

    OPEN = "open"
    NONE_READY = "none ready"  # the marker came back before any delivery
    CANCELLING = "cancelling"  # the cancel was sent
    CANCELLED = "cancelled"  # the cancel-ok came: nothing more arrives


class Effect(enum.Enum):
    """What the consumer must do after a transition."""

    SEND_CANCEL = "send basic.cancel"


@attrs.frozen
class Reservation:
    """One ``basic.consume`` of a consumer.

    Attributes:
        tag: its consumer tag.
        room: its prefetch: it never has more unacked deliveries than this.
        subscribed: kept open as the consumer's subscription (not cancelled when full).
        arrived: deliveries so far.
        phase: where it stands.
    """

    tag: str
    room: int
    subscribed: bool = False
    arrived: int = 0
    phase: Phase = Phase.OPEN

    @property
    def full(self) -> bool:
        """Whether ``room`` deliveries arrived."""
        return self.arrived >= self.room

    @property
    def answered(self) -> bool:
        """Whether the server answered the reservation: full, cancelled, or nothing was
        ready."""
        return self.full or self.phase in (Phase.CANCELLED, Phase.NONE_READY)

    @property
    def cancelled(self) -> bool:
        """Whether the cancel-ok came."""
        return self.phase is Phase.CANCELLED

    @property
    def live(self) -> bool:
        """Whether no cancel was sent for it (it may still receive deliveries)."""
        return self.phase in (Phase.OPEN, Phase.NONE_READY)


def cancel(reservation: Reservation) -> tuple[Reservation, Effect | None]:
    """The consumer ends ``reservation`` (the cancel is sent once)."""
    if not reservation.live:
        return reservation, None
    return attrs.evolve(reservation, phase=Phase.CANCELLING), Effect.SEND_CANCEL


def delivered(reservation: Reservation) -> tuple[Reservation, Effect | None]:
    """A delivery of ``reservation`` arrived: when it fills the room of one that is not
    subscribed, the consume is cancelled."""
    # Built directly: this runs for every delivery, and `attrs.evolve` costs 3x as much.
    r = reservation
    reservation = Reservation(r.tag, r.room, r.subscribed, r.arrived + 1, r.phase)
    if reservation.full and not reservation.subscribed:
        return cancel(reservation)
    return reservation, None


def marker_returned(reservation: Reservation) -> tuple[Reservation, Effect | None]:
    """The marker came back: with nothing arrived, nothing was ready; otherwise what
    was ready arrived, and a consume that is not subscribed is cancelled."""
    if not reservation.arrived:
        if reservation.phase is Phase.OPEN:
            return attrs.evolve(reservation, phase=Phase.NONE_READY), None
        return reservation, None
    if not reservation.subscribed:
        return cancel(reservation)
    return reservation, None


def cancel_ok(reservation: Reservation) -> Reservation:
    """The server's cancel-ok came: nothing more arrives."""
    return attrs.evolve(reservation, phase=Phase.CANCELLED)


def subscribe(reservation: Reservation, subscribed: bool) -> Reservation:
    """Keep ``reservation`` open as the consumer's subscription, or not."""
    return attrs.evolve(reservation, subscribed=subscribed)
