"""Key names of one RedisBroker namespace (Dramatiq's layout, plus dq's own keys).

==========================  =====  ==============================================
key                         type   contents
==========================  =====  ==============================================
``ns:Q``                    LIST   redis_message_ids, FIFO (RPUSH / LPOP)
``ns:Q.msgs``               HASH   redis_message_id -> encoded message
``ns:__acks__.W.Q``         SET    ids worker ``W`` reserved from ``Q``, unsettled
``ns:__heartbeats__``       ZSET   worker id -> ms time of its last heartbeat
``ns:C.XQ``                 ZSET   dead-lettered ids -> ms time of the nack
``ns:C.XQ.msgs``            HASH   dead-lettered id -> the message as stored
``ns:__dq__.deliveries.Q``  HASH   id -> deliveries cut short by a death (dq)
``ns:__dq__.started.Q``     HASH   id -> run mark of a suspect (dq)
``ns:__dq__.reasons.C``     HASH   dead-lettered id -> why, unless nacked (dq)
==========================  =====  ==============================================
"""

from __future__ import annotations

from dq.core import policy

__all__ = ["DELIVERIES", "NOTIFY", "REASONS", "STARTED", "Keys", "glob_escape"]

NOTIFY = "__dq__.notify."
DELIVERIES = "__dq__.deliveries."
STARTED = "__dq__.started."
REASONS = "__dq__.reasons."


class Keys:
    """Key names of one namespace."""

    __slots__ = ("heartbeats", "ns")

    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self.heartbeats = f"{namespace}:__heartbeats__"

    def queue(self, queue_name: str) -> str:
        """The list of ids waiting on ``queue_name``."""
        return f"{self.ns}:{queue_name}"

    def msgs(self, queue_name: str) -> str:
        """The hash of the payloads stored on ``queue_name``."""
        return f"{self.ns}:{queue_name}.msgs"

    def acks(self, worker: str, queue_name: str) -> str:
        """The set of ids ``worker`` holds from ``queue_name``."""
        return f"{self.ns}:__acks__.{worker}.{queue_name}"

    def dead(self, queue_name: str) -> str:
        """The dead letters (a zset) of ``queue_name``'s canonical queue."""
        return f"{self.ns}:{policy.xq_name(queue_name)}"

    def dead_msgs(self, queue_name: str) -> str:
        """The payloads of the dead letters of ``queue_name``'s canonical queue."""
        return f"{self.ns}:{policy.xq_name(queue_name)}.msgs"

    def deliveries(self, queue_name: str) -> str:
        """dq's delivery counts of ``queue_name`` (the delivery cap)."""
        return f"{self.ns}:{DELIVERIES}{queue_name}"

    def started(self, queue_name: str) -> str:
        """dq's run marks of the suspects of ``queue_name``."""
        return f"{self.ns}:{STARTED}{queue_name}"

    def reasons(self, queue_name: str) -> str:
        """dq's reasons for the dead letters of ``queue_name``'s canonical queue."""
        return f"{self.ns}:{REASONS}{policy.q_name(queue_name)}"

    def channel(self, queue_name: str) -> str:
        """The pub/sub channel that wakes ``queue_name``'s consumers."""
        return f"{self.ns}:{NOTIFY}{queue_name}"


def glob_escape(text: str) -> str:
    """``text`` with the glob characters of SCAN's MATCH escaped."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
