"""Rate-limiter interop on Redis: a dq limiter and a Dramatiq 2.2.1 limiter given the
same key share one limit (spec/wire.md section 7), in both directions; the same for
barriers, blocking waits included.

Needs the Redis server on 127.0.0.1:6379 and ``dramatiq==2.2.1`` (test-only).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import dramatiq.broker
import dramatiq.brokers.redis
import dramatiq.middleware
import dramatiq.rate_limits
import dramatiq.rate_limits.backends
import pytest
import redis

import dq
import dq.broker
import dq.rate_limits as dq_rl
from dq.brokers.redis import RedisBroker
from dq.middleware import CurrentMessage, GroupCallbacks
from dq.rate_limits.backends import RedisBackend as DqRedisBackend
from tests.support.redis_helpers import REDIS_URL

pytestmark = [pytest.mark.redis]

# Dramatiq ships no type hints: its classes are used through Any.
dramatiq_rl: Any = dramatiq.rate_limits
dramatiq_mod: Any = dramatiq
DramatiqRedisBackend: Any = dramatiq.rate_limits.backends.RedisBackend

#: (dq backend, Dramatiq backend, fresh-key factory)
Env = tuple[DqRedisBackend, Any, Callable[[str], str]]


@pytest.fixture
def env() -> Iterator[Env]:
    prefix = f"dq-test-rli-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(REDIS_URL)
    dq_backend = DqRedisBackend(client=client)
    dramatiq_backend = DramatiqRedisBackend(client=client)
    yield dq_backend, dramatiq_backend, lambda name: f"{prefix}:{name}"
    found = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if found:
        client.delete(*found)
    client.close()


def attempt(limiter: Any) -> bool:
    """Try ``limiter`` (dq's or Dramatiq's) once; keep the slot (nothing released)."""
    manager = limiter.acquire(raise_on_failure=False)
    acquired: bool = manager.__enter__()
    return acquired


@pytest.mark.parametrize("first", ["dq", "dramatiq"])
def test_concurrent_limiters_share_the_limit(env: Env, first: str) -> None:
    dq_backend, dramatiq_backend, key = env
    k = key("concurrent")
    ours = dq_rl.ConcurrentRateLimiter(dq_backend, k, limit=3)
    theirs = dramatiq_rl.ConcurrentRateLimiter(dramatiq_backend, k, limit=3)
    a, b = (ours, theirs) if first == "dq" else (theirs, ours)
    with a.acquire() as one, b.acquire() as two, a.acquire() as three:
        assert (one, two, three) == (True, True, True)
        assert attempt(b) is False
        assert attempt(a) is False
    # Every slot came back, whichever side released it.
    with b.acquire() as x, a.acquire() as y, b.acquire() as z:
        assert (x, y, z) == (True, True, True)
        assert attempt(a) is False


@pytest.mark.parametrize("first", ["dq", "dramatiq"])
def test_bucket_limiters_share_the_limit(env: Env, first: str) -> None:
    dq_backend, dramatiq_backend, key = env
    bucket = 3_600_000
    for round_ in range(3):  # redo if a bucket boundary passed in the middle
        k = key(f"bucket{round_}")
        start = int(time.time() * 1000) // bucket
        ours = dq_rl.BucketRateLimiter(dq_backend, k, limit=3, bucket=bucket)
        theirs = dramatiq_rl.BucketRateLimiter(dramatiq_backend, k, limit=3, bucket=bucket)
        a, b = (ours, theirs) if first == "dq" else (theirs, ours)
        outcomes = [attempt(a), attempt(b), attempt(a), attempt(b), attempt(a)]
        if int(time.time() * 1000) // bucket == start:
            assert outcomes == [True, True, True, False, False]
            return
    pytest.fail("three bucket boundaries in a row")


@pytest.mark.parametrize("first", ["dq", "dramatiq"])
def test_window_limiters_share_the_limit(env: Env, first: str) -> None:
    dq_backend, dramatiq_backend, key = env
    k = key("window")
    # A 60 s window: the attempts below all fall inside it, whatever second they hit.
    ours = dq_rl.WindowRateLimiter(dq_backend, k, limit=3, window=60)
    theirs = dramatiq_rl.WindowRateLimiter(dramatiq_backend, k, limit=3, window=60)
    a, b = (ours, theirs) if first == "dq" else (theirs, ours)
    assert [attempt(a), attempt(b), attempt(a), attempt(b), attempt(a)] == [
        True,
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize("creator", ["dq", "dramatiq"])
def test_barriers_agree_on_who_clears(env: Env, creator: str) -> None:
    dq_backend, dramatiq_backend, key = env
    k = key("barrier")
    ours = dq_rl.Barrier(dq_backend, k, ttl=60_000)
    theirs = dramatiq_rl.Barrier(dramatiq_backend, k, ttl=60_000)
    a, b = (ours, theirs) if creator == "dq" else (theirs, ours)
    assert a.create(4) is True
    assert b.create(4) is False
    assert [b.wait(block=False), a.wait(block=False), b.wait(block=False)] == [
        False,
        False,
        False,
    ]
    assert a.wait(block=False) is True
    # The counter stops at 1 on both sides, so both report later waits as cleared.
    assert b.wait(block=False) is True
    assert ours.wait(block=False) is True


@pytest.mark.parametrize("waiter", ["dq", "dramatiq"])
def test_blocked_party_is_woken_by_the_other_side(env: Env, waiter: str) -> None:
    dq_backend, dramatiq_backend, key = env
    k = key("blocking")
    ours = dq_rl.Barrier(dq_backend, k, ttl=60_000)
    theirs = dramatiq_rl.Barrier(dramatiq_backend, k, ttl=60_000)
    blocked, clearer = (ours, theirs) if waiter == "dq" else (theirs, ours)
    assert blocked.create(2)
    # The waiter needs its own connection: a blocking command holds one.
    blocked_client = redis.Redis.from_url(REDIS_URL)
    if waiter == "dq":
        blocked = dq_rl.Barrier(DqRedisBackend(client=blocked_client), k, ttl=60_000)
    else:
        blocked = dramatiq_rl.Barrier(DramatiqRedisBackend(client=blocked_client), k, ttl=60_000)
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(blocked.wait(timeout=20_000)))
    thread.start()
    # Let the waiter take its party's place first (it then blocks on the events list).
    deadline = time.monotonic() + 10
    while int(dq_backend.client.get(k) or b"0") != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert clearer.wait(block=False) is True
    thread.join(30)
    assert outcome == [True]
    blocked_client.close()


# -- group completion callbacks across a mixed fleet ---------------------------------------

GROUP_QUEUE = "interop_groups"


class MixedFleet:
    """A dq RedisBroker and a Dramatiq RedisBroker on one namespace, both with
    CurrentMessage and GroupCallbacks, each declaring ``member`` and ``done``."""

    def __init__(self, namespace: str) -> None:
        self.lock = threading.Lock()
        self.members: list[str] = []  # the side that ran each member
        self.callbacks: list[str] = []
        self.barriers: set[str] = set()
        self.ours = RedisBroker(url=REDIS_URL, namespace=namespace, heartbeat_timeout=1000)
        self.ours.add_middleware(CurrentMessage())
        self.ours.add_middleware(GroupCallbacks(DqRedisBackend(url=REDIS_URL), barrier_ttl=60_000))
        self.theirs: Any = dramatiq_mod.brokers.redis.RedisBroker(
            url=REDIS_URL, namespace=namespace
        )
        self.theirs.add_middleware(dramatiq_mod.middleware.CurrentMessage())
        self.theirs.add_middleware(
            dramatiq_mod.middleware.GroupCallbacks(
                DramatiqRedisBackend(url=REDIS_URL), barrier_ttl=60_000
            )
        )
        self.dq_member = dq.actor(actor_name="member", queue_name=GROUP_QUEUE, broker=self.ours)(
            self._member("dq", CurrentMessage)
        )
        self.dq_done = dq.actor(actor_name="done", queue_name=GROUP_QUEUE, broker=self.ours)(
            self._done("dq")
        )
        self.their_member = dramatiq_mod.actor(
            actor_name="member", queue_name=GROUP_QUEUE, broker=self.theirs
        )(self._member("dramatiq", dramatiq_mod.middleware.CurrentMessage))
        self.their_done = dramatiq_mod.actor(
            actor_name="done", queue_name=GROUP_QUEUE, broker=self.theirs
        )(self._done("dramatiq"))

    def _member(self, side: str, current: Any) -> Callable[[int], None]:
        def member(i: int) -> None:
            message = current.get_current_message()
            with self.lock:
                self.members.append(side)
                self.barriers.add(str(message.options["group_completion_uuid"]))
            time.sleep(0.01)  # spread the members over both workers

        return member

    def _done(self, side: str) -> Callable[[], None]:
        def done() -> None:
            with self.lock:
                self.callbacks.append(side)

        return done

    def run_workers(self) -> None:
        """Run a worker on each side until the queue is empty and a duplicate
        callback would have shown up."""
        dq_worker = dq.Worker(self.ours, worker_threads=2, worker_timeout=50)
        their_worker = dramatiq_mod.Worker(self.theirs, worker_threads=2, worker_timeout=50)
        dq_worker.start()
        their_worker.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not self.callbacks:
                time.sleep(0.02)
            self.ours.join(GROUP_QUEUE, timeout=20_000)
            time.sleep(0.2)
            self.ours.join(GROUP_QUEUE, timeout=20_000)
        finally:
            dq_worker.stop()
            their_worker.stop()

    def close(self, client: redis.Redis, namespace: str) -> None:
        self.theirs.close()
        self.ours.close()
        found = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        found += [k for b in self.barriers for k in (b, f"{b}@events")]
        if found:
            client.delete(*found)


@pytest.mark.parametrize("runner", ["dq", "dramatiq"])
def test_group_completion_fires_once_across_a_mixed_fleet(runner: str) -> None:
    """A group (8 members + a completion callback) run by one side, its members
    processed by a dq worker and a Dramatiq worker at once, both with GroupCallbacks
    on the same Redis: the callback runs exactly once."""
    namespace = f"dq-test-rli-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(REDIS_URL)
    previous = (dq.broker.global_broker, dramatiq.broker.global_broker)
    fleet = MixedFleet(namespace)
    try:
        g: Any
        if runner == "dq":
            g = dq.group([fleet.dq_member.message(i) for i in range(8)], broker=fleet.ours)
            g.add_completion_callback(fleet.dq_done.message())
        else:
            g = dramatiq_mod.group(
                [fleet.their_member.message(i) for i in range(8)], broker=fleet.theirs
            )
            g.add_completion_callback(fleet.their_done.message())
        g.run()
        fleet.run_workers()
    finally:
        fleet.close(client, namespace)
        client.close()
        dq.broker.global_broker, dramatiq.broker.global_broker = previous
    assert len(fleet.members) == 8
    assert len(fleet.barriers) == 1
    assert len(fleet.callbacks) == 1
