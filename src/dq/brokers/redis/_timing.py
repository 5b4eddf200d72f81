"""RedisBroker's timing arguments: each checked to be a whole number of ms, and the
recovery interval and deadline derived from each other and ``heartbeat_timeout``
(a dead worker's messages are back in their queue at most ``requeue_deadline =
heartbeat_timeout + requeue_interval`` ms after its last heartbeat).
"""

from __future__ import annotations

from dq.brokers._checks import is_whole

__all__ = ["positive_ms", "recovery_timing"]


def positive_ms(name: str, value: object, *, allow_zero: bool = False) -> int:
    """``value``, checked to be a positive integer (or 0 with ``allow_zero``).

    Raises:
        ValueError: it is not.
    """
    if not is_whole(value, 0 if allow_zero else 1):
        expected = "an integer >= 0" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {expected} (ms), got {value!r}")
    assert isinstance(value, int)
    return value


def recovery_timing(
    heartbeat_timeout: int, deadline: int | None, interval: int | None
) -> tuple[int, int]:
    """Return (requeue_interval, requeue_deadline) from what was given.

    Raises:
        ValueError: a value is not a positive integer, or the two contradict
            ``heartbeat_timeout``.
    """
    if interval is not None:
        positive_ms("requeue_interval", interval)
    if deadline is not None:
        positive_ms("requeue_deadline", deadline)
        if deadline <= heartbeat_timeout:
            raise ValueError(
                f"requeue_deadline ({deadline} ms) must be larger than heartbeat_timeout "
                f"({heartbeat_timeout} ms): a worker counts as dead only after that long"
            )
        if interval is None:
            interval = deadline - heartbeat_timeout
        elif heartbeat_timeout + interval > deadline:
            raise ValueError(
                f"requeue_deadline ({deadline} ms) cannot be met with heartbeat_timeout "
                f"({heartbeat_timeout} ms) and requeue_interval ({interval} ms): it must be "
                "at least their sum"
            )
        return interval, deadline
    if interval is None:
        interval = max(100, heartbeat_timeout // 10)
    return interval, heartbeat_timeout + interval
