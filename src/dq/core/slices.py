"""State slices: the `BrokerState` a server-backed interpreter builds from the part of
its server's state a question is about, to ask the core (`dq.core.machine.apply`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rpds import HashTrieMap

from dq.core.policy import q_name
from dq.core.records import BrokerState, QueueState, Reservation

__all__ = ["holding"]


def holding(
    reservations: Iterable[Reservation], deliveries: Mapping[int, int] | None = None
) -> BrokerState:
    """Return the state in which ``reservations`` are held and nothing else is stored.

    A server-backed interpreter asks the core about a slice of the server's state with
    it: what becomes of what a dead consumer held (`Recover`), of lapsed leases
    (`ExpireLeases`). The entries' ``seq`` are the interpreter's own handles (distinct,
    > 0); ``deliveries`` gives their counts (counts of 0 are left out).
    """
    held = {r.entry.seq: r for r in reservations}
    in_flight: dict[str, int] = {}
    for reservation in held.values():
        name = q_name(reservation.entry.queue_name)
        in_flight[name] = in_flight.get(name, 0) + 1
    counts = {seq: n for seq, n in (deliveries or {}).items() if n and seq in held}
    return BrokerState(
        HashTrieMap({name: QueueState(name, in_flight=n) for name, n in in_flight.items()}),
        HashTrieMap(held),
        max(held, default=0) + 1,
        HashTrieMap(counts),
    )
