"""The typed script calls (`dq.brokers.redis._calls`) and reply narrowing, without a
server: each names its script's keys and arguments, and reads its reply into a typed
result."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dq.brokers.redis import _calls, _resp
from dq.brokers.redis._keys import Keys
from dq.brokers.redis._replies import as_bytes, as_int, as_list, as_text
from dq.core import Ack, DeathReason, Nack, Requeue

KEYS = Keys("ns")


class Recorder:
    """A ``run`` that records each call and answers with a fixed reply."""

    def __init__(self, reply: _resp.Reply) -> None:
        self.reply = reply
        self.calls: list[tuple[str, tuple[str, ...], tuple[_resp.Arg, ...]]] = []

    def __call__(self, name: str, keys: Sequence[str], args: Sequence[_resp.Arg]) -> _resp.Reply:
        self.calls.append((name, tuple(keys), tuple(args)))
        return self.reply


def test_reserve_reads_its_triples_into_a_record() -> None:
    run = Recorder([b"r1", b"p1", 0, b"r2", b"p2", 1])
    reserved = _calls.reserve(run, KEYS, "w", "q", 10, 123)
    assert reserved == _calls.Reserved((("r1", b"p1"), ("r2", b"p2")), frozenset({"r2"}))
    assert run.calls == [
        (
            "reserve",
            ("ns:q", "ns:q.msgs", "ns:__acks__.w.q", "ns:__heartbeats__", "ns:__dq__.deliveries.q"),
            (10, 123, "w"),
        )
    ]
    assert _calls.reserve(Recorder([]), KEYS, "w", "q", 10, 123) == _calls.Reserved()


def test_settle_runs_the_script_of_each_command() -> None:
    for command, name in ((Ack, "ack"), (Nack, "nack"), (Requeue, "requeue")):
        run = Recorder(2)
        assert _calls.settle(run, KEYS, "w", command, "q", ["a", "b"], 7) == 2
        assert [call[0] for call in run.calls] == [name]
    run = Recorder(1)
    _calls.nack(run, KEYS, "w", "q", ["a"], 7, DeathReason.UNDECODABLE)
    _calls.nack(run, KEYS, "w", "q", ["a"], 7)
    assert [call[2] for call in run.calls] == [
        (7, DeathReason.UNDECODABLE.value, "a"),
        (7, "", "a"),
    ]


def test_recover_reads_alive_or_what_moved() -> None:
    moves = [("r1", "requeue", ""), ("r2", "dead", "max_deliveries")]
    assert _calls.recover(Recorder([-1]), KEYS, "d", "q", 5, 9, moves) == _calls.Recovered(True)
    run = Recorder([1, b"r2"])
    assert _calls.recover(run, KEYS, "d", "q", 5, 9, moves) == _calls.Recovered(False, 1, ("r2",))
    (name, keys, args) = run.calls[0]
    assert (name, keys) == ("recover", _calls.recover_keys(KEYS, "d", "q"))
    assert args == (
        "d",
        5,
        9,
        "ns:__dq__.notify.q",
        "r1",
        "requeue",
        "",
        "r2",
        "dead",
        "max_deliveries",
    )


def test_replace_and_promote_store_the_new_copy_on_its_queue() -> None:
    new = _calls.Stored("other", "n1", b"payload")
    for call, name in ((_calls.replace, "replace"), (_calls.promote, "promote")):
        run = Recorder(0)
        assert call(run, KEYS, "w", "q.DQ", "o1", new) is False
        assert run.calls == [
            (
                name,
                (
                    "ns:__acks__.w.q.DQ",
                    "ns:q.DQ.msgs",
                    "ns:__dq__.deliveries.q.DQ",
                    "ns:__dq__.started.q.DQ",
                    "ns:other",
                    "ns:other.msgs",
                ),
                ("o1", "n1", b"payload", "ns:__dq__.notify.other"),
            )
        ]


def test_replies_are_narrowed_or_refused() -> None:
    assert as_int(b"12") == 12 and as_int(3) == 3
    assert as_list([1]) == [1]
    assert as_bytes(b"x") == b"x" and as_text(b"x") == "x"
    error = _resp.ResponseError("WRONGTYPE no")
    with pytest.raises(_resp.ResponseError) as caught:
        as_list(error)
    assert caught.value is error
    with pytest.raises(_resp.ResponseError, match="expected a string"):
        as_text(None)
