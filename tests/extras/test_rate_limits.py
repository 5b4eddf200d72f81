"""Rate limiters and barriers on every backend (in memory, real Redis, real Memcached).

Bounds are checked with many threads and asserted as counts: rounds in which every
thread tries at once (synchronised by a `threading.Barrier`, so the expected count is
exact), and free-running threads that count how many are inside at any moment.
Bucket and window limiters run on a fixed clock, so every attempt falls in a known
bucket.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.client.base import PooledClient

import dq
import dq.broker
from dq import runtime
from dq.brokers.stub import StubBroker
from dq.errors import RateLimitExceeded as ErrorsRateLimitExceeded
from dq.middleware import Retries
from dq.rate_limits import (
    Barrier,
    BucketRateLimiter,
    ConcurrentRateLimiter,
    RateLimiter,
    RateLimiterBackend,
    RateLimitExceeded,
    WindowRateLimiter,
)
from dq.rate_limits.backends import MemcachedBackend, RedisBackend, StubBackend
from tests.support.backends import BACKENDS
from tests.support.redis_helpers import REDIS_URL

THREADS = 16
MEMCACHED = ("127.0.0.1", 11211)


class FixedClock:
    """A wall clock that only moves when told to."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Iterator[FixedClock]:
    previous = runtime.get_clock()
    fixed = FixedClock(1_699_999_980_000)  # a whole minute (so a whole second)
    runtime.set_clock(fixed)
    yield fixed
    runtime.set_clock(previous)


class Keys:
    """Fresh keys for one test, deleted from the server afterwards."""

    def __init__(self) -> None:
        self.prefix = f"dq-test-rl-{uuid.uuid4().hex}"
        self.used: list[str] = []

    def __call__(self, name: str) -> str:
        key = f"{self.prefix}:{name}"
        self.used.append(key)
        return key


@pytest.fixture(params=BACKENDS)
def backend_and_keys(request: pytest.FixtureRequest) -> Iterator[tuple[RateLimiterBackend, Keys]]:
    keys = Keys()
    backend: RateLimiterBackend
    if request.param == "stub":
        backend = StubBackend()
        yield backend, keys
    elif request.param == "redis":
        backend = RedisBackend(url=REDIS_URL)
        yield backend, keys
        conn = redis.Redis.from_url(REDIS_URL)
        found = list(conn.scan_iter(match=f"{keys.prefix}:*", count=1000))
        if found:
            conn.delete(*found)
        conn.close()
    else:
        backend = MemcachedBackend(servers=["127.0.0.1:11211"])
        yield backend, keys
        backend.pool.close()  # its sockets, not left for the garbage collector
        # Memcached cannot list keys: delete every key the test named, and the keys
        # limiters derive from them (events lists; buckets and windows use the
        # fixed clock, whose keys the tests add to `keys.used` themselves).
        client = MemcacheClient(MEMCACHED)
        for key in keys.used:
            client.delete_many([key, key + "@events"], noreply=False)
        client.close()


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Run ``target(i)`` in ``count`` threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a test thread hung"
    if errors:
        raise errors[0]


def contend(limiter: RateLimiter, rounds: int, *, release_between: bool = True) -> list[int]:
    """Every round, each of THREADS threads tries to acquire at the same moment and
    holds what it got until all have tried; return how many got a slot per round."""
    sync = threading.Barrier(THREADS, timeout=30)
    wins = [0] * rounds
    lock = threading.Lock()

    def worker(_: int) -> None:
        for r in range(rounds):
            sync.wait()
            with limiter.acquire(raise_on_failure=False) as acquired:
                if acquired:
                    with lock:
                        wins[r] += 1
                sync.wait()  # everyone tried while the winners hold their slots
        sync.wait()

    run_threads(THREADS, worker)
    return wins


# -- ConcurrentRateLimiter ---------------------------------------------------------------


def test_concurrent_limiter_admits_exactly_limit_each_round(
    backend_and_keys: tuple[RateLimiterBackend, Keys],
) -> None:
    backend, keys = backend_and_keys
    limiter = ConcurrentRateLimiter(backend, keys("concurrent"), limit=3)
    # 16 threads x 20 rounds: each round exactly 3 win, so refused attempts never
    # inflate the counter and every release is counted.
    assert contend(limiter, 20) == [3] * 20


def test_concurrent_limiter_never_has_more_than_limit_inside(
    backend_and_keys: tuple[RateLimiterBackend, Keys],
) -> None:
    backend, keys = backend_and_keys
    limiter = ConcurrentRateLimiter(backend, keys("concurrent"), limit=3)
    lock = threading.Lock()
    inside = 0
    most = 0
    entries = 0
    start = threading.Barrier(THREADS, timeout=30)

    def worker(_: int) -> None:
        nonlocal inside, most, entries
        start.wait()
        for _ in range(40):
            with limiter.acquire(raise_on_failure=False) as acquired:
                if not acquired:
                    continue
                with lock:
                    inside += 1
                    entries += 1
                    most = max(most, inside)
                threading.Event().wait(0.0005)
                with lock:
                    inside -= 1

    run_threads(THREADS, worker)
    assert 1 <= most <= 3
    assert entries >= 1
    # Every slot was given back: all three can be taken again, and no fourth.
    with (
        limiter.acquire() as a,
        limiter.acquire() as b,
        limiter.acquire() as c,
        limiter.acquire(raise_on_failure=False) as d,
    ):
        assert (a, b, c, d) == (True, True, True, False)


def test_acquire_raises_rate_limit_exceeded_and_releases_only_what_it_took(
    backend_and_keys: tuple[RateLimiterBackend, Keys],
) -> None:
    backend, keys = backend_and_keys
    key = keys("mutex")
    mutex = ConcurrentRateLimiter(backend, key, limit=1)
    with mutex.acquire() as held:
        assert held is True
        with pytest.raises(RateLimitExceeded) as info, mutex.acquire():
            pytest.fail("the block must not run")
        assert str(info.value) == f"rate limit exceeded for key {key!r}"
        assert RateLimitExceeded is ErrorsRateLimitExceeded
        with mutex.acquire(raise_on_failure=False) as second:
            assert second is False
    # The refused attempts released nothing that was not theirs, and the holder's
    # slot came back.
    with mutex.acquire() as again:
        assert again is True


def test_concurrent_limiter_rejects_limit_below_one() -> None:
    with pytest.raises(AssertionError, match="limit must be a positive integer, got 0"):
        ConcurrentRateLimiter(StubBackend(), "k", limit=0)


# -- BucketRateLimiter -------------------------------------------------------------------


def test_bucket_limiter_admits_exactly_limit_per_bucket(
    backend_and_keys: tuple[RateLimiterBackend, Keys], clock: FixedClock
) -> None:
    backend, keys = backend_and_keys
    key = keys("bucket")
    limiter = BucketRateLimiter(backend, key, limit=5, bucket=60_000)
    keys.used += [f"{key}@{clock.now}", f"{key}@{clock.now + 60_000}"]
    admitted = 0
    lock = threading.Lock()

    def worker(_: int) -> None:
        nonlocal admitted
        for _ in range(10):
            with limiter.acquire(raise_on_failure=False) as acquired:
                if acquired:
                    with lock:
                        admitted += 1

    run_threads(THREADS, worker)  # 160 attempts in one bucket
    assert admitted == 5
    clock.now += 59_999  # still the same bucket
    assert not _try(limiter)
    clock.now += 1  # the next bucket
    admitted = 0
    run_threads(THREADS, worker)
    assert admitted == 5


def test_bucket_limiter_never_releases(
    backend_and_keys: tuple[RateLimiterBackend, Keys], clock: FixedClock
) -> None:
    backend, keys = backend_and_keys
    key = keys("bucket")
    keys.used.append(f"{key}@{clock.now}")
    limiter = BucketRateLimiter(backend, key, limit=2, bucket=60_000)
    assert [_try(limiter) for _ in range(4)] == [True, True, False, False]


# -- WindowRateLimiter -------------------------------------------------------------------


def test_window_limiter_admits_exactly_limit_per_window(
    backend_and_keys: tuple[RateLimiterBackend, Keys], clock: FixedClock
) -> None:
    backend, keys = backend_and_keys
    key = keys("window")
    start_s = clock.now // 1000
    keys.used += [f"{key}@{start_s + i}" for i in range(4)]
    limiter = WindowRateLimiter(backend, key, limit=5, window=2)
    admitted = 0
    lock = threading.Lock()

    def worker(_: int) -> None:
        nonlocal admitted
        for _ in range(10):
            if _try(limiter):
                with lock:
                    admitted += 1

    run_threads(THREADS, worker)
    assert admitted == 5
    clock.now += 1000  # the first second is still inside the 2 s window
    admitted = 0
    run_threads(THREADS, worker)
    assert admitted == 0
    clock.now += 1000  # now it left the window
    run_threads(THREADS, worker)
    assert admitted == 5


def test_window_limiter_spreads_the_limit_over_seconds(
    backend_and_keys: tuple[RateLimiterBackend, Keys], clock: FixedClock
) -> None:
    backend, keys = backend_and_keys
    key = keys("window")
    start_s = clock.now // 1000
    keys.used += [f"{key}@{start_s + i}" for i in range(4)]
    limiter = WindowRateLimiter(backend, key, limit=3, window=3)
    assert [_try(limiter) for _ in range(2)] == [True, True]
    clock.now += 1000
    assert [_try(limiter) for _ in range(2)] == [True, False]
    clock.now += 2000  # the first second left the window: 2 of 3 freed
    assert [_try(limiter) for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize(("limit", "window"), [(0, 1), (1, 0)])
def test_window_limiter_rejects_bad_bounds(limit: int, window: int) -> None:
    with pytest.raises(AssertionError, match="must be a positive"):
        WindowRateLimiter(StubBackend(), "k", limit=limit, window=window)


def _try(limiter: RateLimiter) -> bool:
    with limiter.acquire(raise_on_failure=False) as acquired:
        return acquired


# -- Barrier -----------------------------------------------------------------------------


def test_barrier_non_blocking_waits(backend_and_keys: tuple[RateLimiterBackend, Keys]) -> None:
    backend, keys = backend_and_keys
    barrier = Barrier(backend, keys("barrier"), ttl=60_000)
    assert barrier.create(3) is True
    assert barrier.create(3) is False
    assert [barrier.wait(block=False) for _ in range(3)] == [False, False, True]
    # Dramatiq's quirk, kept: the counter stops at 1, so later waits report cleared.
    assert barrier.wait(block=False) is True


def test_barrier_that_does_not_exist_clears_at_once(
    backend_and_keys: tuple[RateLimiterBackend, Keys],
) -> None:
    backend, keys = backend_and_keys
    assert Barrier(backend, keys("never-created")).wait(block=False) is True


def test_barrier_cleared_by_exactly_one_of_many_threads(
    backend_and_keys: tuple[RateLimiterBackend, Keys],
) -> None:
    backend, keys = backend_and_keys
    barriers = [Barrier(backend, keys(f"b{i}"), ttl=60_000) for i in range(25)]
    for b in barriers:
        assert b.create(THREADS)
    clears = [0] * len(barriers)
    lock = threading.Lock()
    start = threading.Barrier(THREADS, timeout=30)

    def worker(_: int) -> None:
        start.wait()
        for i, b in enumerate(barriers):
            if b.wait(block=False):
                with lock:
                    clears[i] += 1

    run_threads(THREADS, worker)  # 16 threads x 25 barriers
    assert clears == [1] * len(barriers)


def test_barrier_blocking_wait_releases_all_parties(
    backend_and_keys: tuple[RateLimiterBackend, Keys],
) -> None:
    backend, keys = backend_and_keys
    parties = 8
    barrier = Barrier(backend, keys("blocking"), ttl=60_000)
    barrier.create(parties)
    results: list[bool] = []
    lock = threading.Lock()

    def party(_: int) -> None:
        outcome = barrier.wait(timeout=20_000)
        with lock:
            results.append(outcome)

    run_threads(parties, party)
    assert results == [True] * parties
    # A late party finds the notification still there.
    assert barrier.wait(timeout=1000) is True


def test_barrier_blocking_wait_times_out_when_parties_are_missing(
    backend_and_keys: tuple[RateLimiterBackend, Keys],
) -> None:
    backend, keys = backend_and_keys
    barrier = Barrier(backend, keys("short"), ttl=60_000)
    barrier.create(2)
    assert barrier.wait(timeout=300) is False


def test_barrier_rejects_non_positive_parties() -> None:
    with pytest.raises(AssertionError, match="parties must be a positive integer, got 0"):
        Barrier(StubBackend(), "k").create(0)


# -- what is on the servers -------------------------------------------------------------


@pytest.mark.redis
def test_redis_keys_and_values_are_dramatiqs(clock: FixedClock) -> None:
    keys = Keys()
    client = redis.Redis.from_url(REDIS_URL)
    backend = RedisBackend(client=client)
    try:
        key = keys("k")
        with ConcurrentRateLimiter(backend, key, limit=2, ttl=50_000).acquire():
            assert client.get(key) == b"1"
            assert 0 < client.pttl(key) <= 50_000
        assert client.get(key) == b"0"
        BucketRateLimiter(backend, key, limit=2, bucket=60_000).acquire().__enter__()
        assert client.get(f"{key}@{clock.now}") == b"1"
        assert 0 < client.pttl(f"{key}@{clock.now}") <= 60_000
        _try(WindowRateLimiter(backend, key, limit=2, window=3))
        assert client.get(f"{key}@{clock.now // 1000}") == b"1"
        assert 0 < client.pttl(f"{key}@{clock.now // 1000}") <= 3000
        barrier = Barrier(backend, keys("b"), ttl=40_000)
        barrier.create(2)
        assert client.get(barrier.key) == b"2"
        barrier.wait(block=False)
        barrier.wait(block=False)
        assert client.get(barrier.key) == b"1"
        assert client.lrange(barrier.key_events, 0, -1) == [b"x"]
        assert 0 < client.pttl(barrier.key_events) <= 40_000
    finally:
        found = list(client.scan_iter(match=f"{keys.prefix}:*", count=1000))
        if found:
            client.delete(*found)
        client.close()


@pytest.mark.redis
def test_redis_refused_increment_writes_nothing() -> None:
    keys = Keys()
    client = redis.Redis.from_url(REDIS_URL)
    backend = RedisBackend(client=client)
    key = keys("k")
    try:
        assert backend.add(key, 2, 100_000)
        client.pexpire(key, 5_000)
        assert backend.incr(key, 1, 2, 100_000) is False
        assert client.get(key) == b"2"
        assert client.pttl(key) <= 5_000  # not refreshed by the refused call
        assert backend.incr(key, 1, 3, 100_000) is True
        assert client.pttl(key) > 5_000  # refreshed by the successful one
        client.set(key, b"abc")
        with pytest.raises(redis.ResponseError, match="non-integer"):
            backend.incr(key, 1, 3, 100_000)
    finally:
        client.delete(key)
        client.close()


def test_redis_wait_rejects_non_positive_timeouts() -> None:
    backend = RedisBackend(url=REDIS_URL)
    with pytest.raises(ValueError, match="wait timeout must be None or > 0 ms, got 0"):
        backend.wait("dq-test-rl-unused", 0)
    backend.client.close()


@pytest.mark.memcached
def test_memcached_counters_carry_pylibmc_integer_flags() -> None:
    keys = Keys()
    seen: dict[str, int] = {}

    class RecordFlags:
        def serialize(self, key: str, value: bytes) -> tuple[bytes, int]:
            return value, 0

        def deserialize(self, key: str, value: bytes, flags: int) -> bytes:
            seen[key] = flags
            return value

    raw = MemcacheClient(MEMCACHED, serde=RecordFlags())
    backend = MemcachedBackend(servers=[MEMCACHED])
    key = keys("k")
    try:
        limiter = ConcurrentRateLimiter(backend, key, limit=3)
        with limiter.acquire(), limiter.acquire():
            assert raw.get(key) == b"2"
            assert seen[key] == 4  # pylibmc's integer flag: Dramatiq reads an int
        assert raw.get(key) == b"0"
        # A counter Dramatiq's server-side INCR moved is read back as an int here.
        assert raw.incr(key, 3) == 3
        assert [_try(limiter) for _ in range(1)] == [False]
        assert raw.get(key) == b"3"  # refused: nothing written
    finally:
        raw.delete(key, noreply=False)
        raw.close()


def test_memcached_builds_clients_from_server_specs() -> None:
    with pytest.raises(ValueError, match="'host' or 'host:port', got 'h:x'"):
        MemcachedBackend(servers=["h:x"])
    assert isinstance(MemcachedBackend(servers=["a:1", ("b", 2)]).pool, object)


def test_backends_package_names_the_extra_for_unknown_names() -> None:
    from dq.rate_limits import backends

    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        getattr(backends, "Nope")  # noqa: B009
    assert backends.__all__ == ["StubBackend", "MemcachedBackend", "RedisBackend"]


# -- inside an actor -----------------------------------------------------------------------


def test_rate_limit_exceeded_in_an_actor_is_retried() -> None:
    previous = dq.broker.global_broker
    broker = StubBroker()
    for m in broker.middleware:
        if isinstance(m, Retries):
            m.min_backoff, m.max_backoff = 10, 20
    dq.set_broker(broker)
    backend = StubBackend()
    mutex = ConcurrentRateLimiter(backend, "mutex", limit=1)
    attempts: list[bool] = []
    first_attempt = threading.Event()

    @dq.actor(max_retries=5)
    def guarded() -> None:
        with mutex.acquire(raise_on_failure=False) as acquired:
            attempts.append(acquired)
            first_attempt.set()
            if not acquired:
                raise RateLimitExceeded("busy")

    worker = dq.Worker(broker, worker_threads=1, worker_timeout=20)
    try:
        with mutex.acquire():
            guarded.send()
            worker.start()
            assert first_attempt.wait(10)
        broker.join("default", timeout=10_000)
    finally:
        worker.stop()
        broker.close()
        dq.broker.global_broker = previous
    assert attempts[0] is False
    assert attempts[-1] is True
    assert attempts.count(True) == 1


@pytest.mark.memcached
def test_memcached_callers_wait_for_a_free_connection_of_a_given_pool() -> None:
    pool = PooledClient(MEMCACHED, max_pool_size=2)
    backend = MemcachedBackend(pool=pool)
    keys = Keys()
    limiter = ConcurrentRateLimiter(backend, keys("k"), limit=3)
    try:
        # 16 threads on 2 connections: pymemcache alone would raise "Too many objects".
        assert contend(limiter, 5) == [3] * 5
    finally:
        pool.delete(keys.used[0], noreply=False)
        pool.close()
