"""The reservation protocol (`dq.brokers.rabbitmq.reservation`), driven directly: no
server, no pika."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from dq.brokers.rabbitmq import reservation
from dq.brokers.rabbitmq.reservation import Effect, Phase, Reservation

Step = Callable[[Reservation], tuple[Reservation, Effect | None]]
EVENTS: dict[str, Step] = {
    "delivered": reservation.delivered,
    "marker": reservation.marker_returned,
    "cancel": reservation.cancel,
    "cancel_ok": lambda r: (reservation.cancel_ok(r), None),
}

reservations = st.builds(
    Reservation,
    tag=st.just("ctag"),
    room=st.integers(1, 5),
    subscribed=st.booleans(),
    arrived=st.integers(0, 5),
    phase=st.sampled_from(Phase),
)


def run(r: Reservation, *events: str) -> tuple[Reservation, list[Effect]]:
    effects: list[Effect] = []
    for event in events:
        r, effect = EVENTS[event](r)
        if effect is not None:
            effects.append(effect)
    return r, effects


def test_a_full_batch_is_cancelled_once_when_its_room_arrived() -> None:
    r, effects = run(Reservation("t", 2), "delivered", "delivered", "marker", "cancel_ok")
    assert r == Reservation("t", 2, arrived=2, phase=Phase.CANCELLED)
    assert effects == [Effect.SEND_CANCEL]


def test_the_marker_before_any_delivery_says_none_was_ready() -> None:
    r, effects = run(Reservation("t", 3), "marker")
    assert (r.phase, r.answered, effects) == (Phase.NONE_READY, True, [])
    r, effects = run(r, "delivered")  # came while waiting: the consume stays open
    assert (r.phase, r.arrived, effects) == (Phase.NONE_READY, 1, [])


def test_the_marker_after_some_arrived_cancels_the_rest_of_the_room() -> None:
    r, effects = run(Reservation("t", 3), "delivered", "marker")
    assert (r.phase, r.answered, effects) == (Phase.CANCELLING, False, [Effect.SEND_CANCEL])
    r, effects = run(r, "delivered", "cancel_ok")  # one raced the cancel: taken
    assert (r.phase, r.arrived, r.answered, effects) == (Phase.CANCELLED, 2, True, [])


def test_a_subscription_is_cancelled_only_when_asked() -> None:
    r, effects = run(Reservation("t", 1, subscribed=True), "delivered", "delivered", "marker")
    assert (r.phase, r.arrived, effects) == (Phase.OPEN, 2, [])
    r, effects = run(r, "cancel", "cancel")
    assert (r.phase, effects) == (Phase.CANCELLING, [Effect.SEND_CANCEL])


@given(reservations, st.sampled_from(sorted(EVENTS)))
def test_every_phase_and_event(r: Reservation, event: str) -> None:
    after, effect = EVENTS[event](r)
    # The record is a value: the transition built a new one and left the old alone.
    assert after.tag == r.tag and after.room == r.room
    assert after.arrived == r.arrived + (event == "delivered")
    # A cancel is asked for only while none was sent, and then the phase says it was.
    if effect is Effect.SEND_CANCEL:
        assert r.live and after.phase is Phase.CANCELLING
    if not r.live:
        assert effect is None
    if event == "cancel_ok" or r.phase is Phase.CANCELLED:
        assert after.phase is Phase.CANCELLED
    if r.subscribed and event in ("delivered", "marker"):
        assert effect is None
