"""Crash and recovery tests for RedisBroker, each against a private ``redis-server``.

Every test starts its own server on a free port (tests/support/redis_server.py), because it
stops, restarts or disconnects it, and kills it in teardown. Each one checks the
at-least-once promise end to end: every message is processed at least once, and at
the end nothing is lost or stuck (the queue list, its ``.msgs`` hash, every ack set
and the delivery counters are gone). Duplicates are counted and printed (run with
``-s`` to see the figures), as are the recovery times measured.

Crashed processes are real: tests/brokers/redis/redis_crash_worker.py runs a consumer or a dq
Worker in a subprocess that the test (or its own actor) SIGKILLs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis

import dq
import dq.worker.tuning
from dq.brokers.redis import RedisBroker
from dq.middleware import CurrentMessage
from tests.brokers.redis.redis_crash_worker import (
    declare_record,
    innocent_starts_key,
    make_broker,
    poison_runs_key,
    processed_key,
)
from tests.support import processes
from tests.support.processes import Child, Outcome
from tests.support.redis_server import RedisServer, keys_under, leftover_keys
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.redis]

WORKER_SCRIPT = Path(__file__).with_name("redis_crash_worker.py")

#: Short enough for recovery within a test, long enough not to declare a live but
#: busy process dead (dq refreshes heartbeats from a timer every timeout // 4).
HEARTBEAT_TIMEOUT = 1000
REQUEUE_INTERVAL = 200
#: Allowed lateness of a recovery beyond heartbeat_timeout + requeue_interval
#: (thread scheduling, the poll of this test).
RECOVERY_SLACK_MS = 600


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def namespace() -> str:
    return f"dq-crash-{uuid4().hex[:12]}"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server without persistence."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.close()


@pytest.fixture
def aof_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server with ``--appendonly yes --appendfsync always``."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True)
    server.start()
    yield server
    server.close()


@dataclass
class Cleanup(processes.Cleanup[RedisBroker]):
    """What a test started, stopped in reverse order in teardown."""

    def broker(self, server: RedisServer, namespace: str, **kwargs: Any) -> RedisBroker:
        kwargs.setdefault("heartbeat_timeout", HEARTBEAT_TIMEOUT)
        kwargs.setdefault("requeue_interval", REQUEUE_INTERVAL)
        broker = make_broker(server.url, namespace, **kwargs)
        self.brokers.append(broker)
        return broker


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    started = Cleanup()
    yield started
    started.close()


# -- subprocesses -----------------------------------------------------------------------


def spawn(
    cleanup: Cleanup,
    server: RedisServer,
    namespace: str,
    mode: str,
    log: Path,
    *args: str,
    ready_timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> Child:
    """Start the worker script and wait for its JSON line."""
    command = [
        sys.executable,
        str(WORKER_SCRIPT),
        mode,
        "--url",
        server.url,
        "--namespace",
        namespace,
        "--heartbeat-timeout",
        str(HEARTBEAT_TIMEOUT),
        "--requeue-interval",
        str(REQUEUE_INTERVAL),
        *args,
    ]
    return cleanup.spawn(command, log, what=f"{mode} child", ready_timeout=ready_timeout, env=env)


# -- recording and checking ---------------------------------------------------------------


class Tally:
    """In-process record of what the actor ran: message_id -> times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, message_id: str) -> None:
        with self._lock:
            self._counts[message_id] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def declare_tally_record(broker: RedisBroker, tally: Tally, *, sleep_ms: int = 0) -> Any:
    """``record(n)`` on ``default`` that tallies its message_id in this process."""

    @dq.actor(broker=broker, actor_name="record", queue_name="default", max_retries=0)
    def record(n: int) -> None:
        message = CurrentMessage.get_current_message()
        assert message is not None
        tally.add(message.message_id)
        if sleep_ms:
            time.sleep(sleep_ms / 1000)

    return record


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_counts(client: redis.Redis, key: str) -> Callable[[], dict[str, int]]:
    def read() -> dict[str, int]:
        return {_text(k): int(v) for k, v in client.hgetall(key).items()}

    return read


def describe(client: redis.Redis, namespace: str) -> dict[str, str]:
    """Every key under the namespace but the heartbeats, with its type and size."""
    sizes: dict[str, Callable[[str], int]] = {
        "list": client.llen,
        "hash": client.hlen,
        "set": client.scard,
        "zset": client.zcard,
    }
    out: dict[str, str] = {}
    for key in leftover_keys(client, namespace):
        kind = _text(client.type(key))
        size = sizes.get(kind)
        out[key] = f"{kind}[{size(key) if size else '?'}]"
    return out


def assert_all_processed(
    client: redis.Redis,
    namespace: str,
    expected: set[str],
    counts: Callable[[], Mapping[str, int]],
    *,
    timeout: float,
    label: str,
) -> Outcome:
    """Wait until every expected message ran and nothing is left under the namespace;
    then assert it, with the figures in the messages. Returns the figures."""

    def done() -> bool:
        try:
            return expected <= counts().keys() and not leftover_keys(client, namespace)
        except redis.RedisError:
            return False

    return processes.assert_all_processed(
        expected,
        counts,
        settled=done,
        leftovers=lambda: describe(client, namespace),
        timeout=timeout,
        interval=0.05,
        label=label,
        left_means="keys left behind (stuck messages)",
    )


def ack_set_keys(client: redis.Redis, namespace: str, broker_id: str) -> list[str]:
    return [
        k
        for k in keys_under(client, namespace)
        if k.startswith(f"{namespace}:__acks__.{broker_id}.")
    ]


def heartbeat_ms(client: redis.Redis, namespace: str, broker_id: str) -> float | None:
    score: float | None = client.zscore(f"{namespace}:__heartbeats__", broker_id)
    return score


def spawn_poison_worker(
    cleanup: Cleanup,
    server: RedisServer,
    namespace: str,
    log: Path,
    *,
    threads: int,
    poison_ms: int,
    max_deliveries: int,
    innocent_ms: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Child:
    """A ``work`` child with the poison actors declared (the poison SIGKILLs its process
    after ``poison_ms``; ``innocent`` runs ``innocent_ms``)."""
    innocent = ("--innocent-ms", str(innocent_ms)) if innocent_ms is not None else ()
    return spawn(
        cleanup,
        server,
        namespace,
        "work",
        log,
        "--threads",
        str(threads),
        "--poison",
        str(poison_ms),
        *innocent,
        "--max-deliveries",
        str(max_deliveries),
        env=env,
    )


def wait_recovered(
    parent: RedisBroker, client: redis.Redis, namespace: str, dead: str, what: str
) -> None:
    """Recover from ``parent`` (by hand) until the dead worker ``dead`` holds nothing."""

    def recovered() -> bool:
        parent.recover()
        return not ack_set_keys(client, namespace, dead)

    wait_until(recovered, what, (HEARTBEAT_TIMEOUT + 5000) / 1000, interval=0.1)


# -- 1. a consumer dies between fetch and ack ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("death", ["sigkill", "close"])
def test_messages_of_a_consumer_dead_between_fetch_and_ack_are_recovered_in_time(
    redis_server: RedisServer,
    namespace: str,
    cleanup: Cleanup,
    tmp_path: Path,
    death: str,
) -> None:
    n = 200
    client = redis_server.client()
    live = cleanup.broker(redis_server, namespace)
    tally = Tally()
    record = declare_tally_record(live, tally)
    messages = [record.message(i) for i in range(n)]
    live.enqueue_many(messages)
    expected = {m.message_id for m in messages}

    # The doomed consumer takes all n and acks none.
    die: Callable[[], None]
    if death == "sigkill":
        child = spawn(
            cleanup, redis_server, namespace, "fetch", tmp_path / "fetch.log", "--count", str(n)
        )
        dead_id = child.broker_id
        fetched = len(child.info["redis_ids"])
        die = child.sigkill
    else:
        doomed = cleanup.broker(redis_server, namespace)
        doomed.declare_queue("default")
        consumer = doomed.consume("default", prefetch=n, timeout=200)
        fetched = 0
        deadline = time.monotonic() + 10
        while fetched < n and time.monotonic() < deadline:
            try:
                next(consumer)
            except StopIteration:
                continue
            fetched += 1
        dead_id = doomed.broker_id
        die = doomed.close  # stops its heartbeat; its messages stay unacked
    assert fetched == n
    assert client.llen(f"{namespace}:default") == 0
    assert client.scard(f"{namespace}:__acks__.{dead_id}.default") == n

    # A live Worker on the other broker: its recovery timer runs from now on.
    cleanup.worker(live)
    time.sleep(0.3)  # the dead one's heartbeat is still fresh: nothing may run yet
    assert tally.snapshot() == {}, "a live consumer's messages were taken"

    die()
    killed_ms = time.time() * 1000
    last_beat = heartbeat_ms(client, namespace, dead_id)
    assert last_beat is not None

    wait_until(
        lambda: not ack_set_keys(client, namespace, dead_id),
        "the dead consumer's ack set to be recovered",
        (HEARTBEAT_TIMEOUT + REQUEUE_INTERVAL + 5000) / 1000,  # seconds
        interval=0.005,
    )
    recovered_ms = time.time() * 1000
    since_beat = recovered_ms - last_beat
    since_death = recovered_ms - killed_ms
    bound = HEARTBEAT_TIMEOUT + REQUEUE_INTERVAL
    print(
        f"[consumer {death}] recovered {since_death:.0f} ms after the death, "
        f"{since_beat:.0f} ms after its last heartbeat (bound {bound} + {RECOVERY_SLACK_MS} ms)"
    )
    assert since_beat <= bound + RECOVERY_SLACK_MS, (
        f"recovery took {since_beat:.0f} ms after the last heartbeat (bound {bound} ms)"
    )

    outcome = assert_all_processed(
        client, namespace, expected, tally.snapshot, timeout=15, label=f"consumer {death}"
    )
    # Nothing ran before the recovery, so nothing may run twice.
    assert outcome.duplicates == 0, f"{outcome.duplicates} duplicates"
    wait_until(
        lambda: heartbeat_ms(client, namespace, dead_id) is None,
        "the dead consumer's heartbeat entry to be forgotten",
        5,
    )


# -- 2. Redis restarts (AOF) in the middle of a run ---------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("fast_restarts")
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_worker_survives_a_redis_restart_with_aof(
    aof_redis_server: RedisServer,
    namespace: str,
    cleanup: Cleanup,
    caplog: pytest.LogCaptureFixture,
    stop: str,
) -> None:
    server = aof_redis_server
    n = 1000
    client = server.client()
    # A heartbeat timeout well above the downtime: the worker must not be judged dead.
    broker = cleanup.broker(server, namespace, heartbeat_timeout=10000, requeue_interval=500)
    tally = Tally()
    record = declare_tally_record(broker, tally, sleep_ms=2)
    messages = [record.message(i) for i in range(n)]
    broker.enqueue_many(messages)
    expected = {m.message_id for m in messages}

    caplog.set_level(logging.WARNING)
    cleanup.worker(broker)
    wait_until(lambda: len(tally.snapshot()) >= n // 3, "a third processed", 20)
    before = len(tally.snapshot())
    downtime = server.restart(downtime=0.3, hard=stop == "sigkill")
    restarted = time.monotonic()
    at_restart = len(tally.snapshot())
    assert at_restart < n, "the run was over before the restart; raise n"

    outcome = assert_all_processed(
        client, namespace, expected, tally.snapshot, timeout=10, label=f"redis {stop}"
    )
    lost = [r for r in caplog.records if "lost its connection" in r.getMessage()]
    unsettled = [r for r in caplog.records if "Could not settle" in r.getMessage()]
    print(
        f"[redis {stop}] {before} processed when it stopped, down {downtime:.2f} s, "
        f"drained {time.monotonic() - restarted:.2f} s after the restart, "
        f"{len(lost)} consumer restarts, {len(unsettled)} settle retries, "
        f"{outcome.duplicates} duplicates"
    )
    assert lost or unsettled, "the worker never noticed the restart"


# -- 3. the client connections are killed while a worker drains a batch ------------------


@pytest.mark.slow
@pytest.mark.usefixtures("fast_restarts")
@pytest.mark.parametrize("kills", ["rounds", "storm"])
def test_client_kill_during_a_drain_loses_nothing(
    redis_server: RedisServer,
    namespace: str,
    cleanup: Cleanup,
    caplog: pytest.LogCaptureFixture,
    kills: str,
) -> None:
    # "rounds": kill every normal and pub/sub connection six times, at 10 %, 25 %, ...
    # 85 % of the drain. "storm": kill the normal ones every 5 ms for the whole drain
    # (at most 5 s): some kills land between a fetch and its reply (see
    # test_a_fetch_whose_reply_was_lost_strands_nothing for that case made certain).
    n = 2000
    client = redis_server.client()
    admin = redis_server.client()
    broker = cleanup.broker(redis_server, namespace, heartbeat_timeout=10000, requeue_interval=500)
    tally = Tally()
    record = declare_tally_record(broker, tally, sleep_ms=1 if kills == "rounds" else 5)
    messages = [record.message(i) for i in range(n)]
    broker.enqueue_many(messages)
    expected = {m.message_id for m in messages}

    caplog.set_level(logging.WARNING)
    cleanup.worker(broker)
    killed: list[int] = []
    if kills == "rounds":
        for fraction in (0.1, 0.25, 0.4, 0.55, 0.7, 0.85):
            target = n * fraction

            def reached(target: float = target) -> bool:
                return len(tally.snapshot()) >= target

            wait_until(reached, f"{fraction:.0%} processed", 30)
            killed.append(admin.client_kill_filter(_type="normal", skipme=True))
            killed.append(admin.client_kill_filter(_type="pubsub"))
        assert len(tally.snapshot()) < n, "the drain was over before the last kill; raise n"
    else:
        deadline = time.monotonic() + 5
        while len(tally.snapshot()) < n and time.monotonic() < deadline:
            killed.append(admin.client_kill_filter(_type="normal", skipme=True))
            time.sleep(0.005)

    try:
        outcome = assert_all_processed(
            client, namespace, expected, tally.snapshot, timeout=5, label=f"client kill {kills}"
        )
    finally:
        lost = [r for r in caplog.records if "lost its connection" in r.getMessage()]
        print(
            f"[client kill {kills}] {len(killed)} CLIENT KILLs closed {sum(killed)} connections; "
            f"{len(lost)} consumer restarts"
        )
    print(f"[client kill {kills}] {outcome.duplicates} duplicates")


# -- 3b. a fetch that Redis ran but whose reply the client gave up on ----------------------

#: Keeps the server busy for ARGV[1] µs, then renames KEYS[1] to KEYS[2]: commands
#: sent meanwhile wait, and run after it, when the queue is full again.
STALL_SCRIPT = """
local start = redis.call('TIME')
local t0 = tonumber(start[1]) * 1000000 + tonumber(start[2])
local now
repeat
  now = redis.call('TIME')
until tonumber(now[1]) * 1000000 + tonumber(now[2]) - t0 >= tonumber(ARGV[1])
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""


@pytest.mark.slow
@pytest.mark.usefixtures("fast_restarts")
def test_a_fetch_whose_reply_was_lost_strands_nothing(
    redis_server: RedisServer,
    namespace: str,
    cleanup: Cleanup,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The broker's client gives up on a reply after 0.25 s (socket_timeout). While the
    # server is busy for 1 s, the idle worker's poll fetch times out on its side, and
    # Redis runs it afterwards, when the queue is full again: ids move into this live
    # worker's ack set and nobody reads the reply. A stall like this (a slow command,
    # a failover, a network hiccup, CLIENT KILL between a command and its reply) must
    # not strand messages for as long as the worker lives.
    n = 200
    client = redis_server.client()
    admin = redis_server.client(socket_timeout=10)
    broker = make_broker(
        f"{redis_server.url}?socket_timeout=0.25",
        namespace,
        heartbeat_timeout=10000,
        requeue_interval=500,
    )
    cleanup.brokers.append(broker)
    tally = Tally()
    record = declare_tally_record(broker, tally)
    messages = [record.message(i) for i in range(n)]
    broker.enqueue_many(messages)
    expected = {m.message_id for m in messages}
    queue, stash = f"{namespace}:default", f"{namespace}:stash"
    client.rename(queue, stash)  # stored, but out of the workers' sight for now

    caplog.set_level(logging.WARNING)
    cleanup.worker(broker)
    time.sleep(0.3)  # the worker polls its empty queue
    admin.eval(STALL_SCRIPT, 2, stash, queue, 1_000_000)
    mine = f"{namespace}:__acks__.{broker.broker_id}.default"

    try:
        outcome = assert_all_processed(
            client, namespace, expected, tally.snapshot, timeout=8, label="lost fetch reply"
        )
    finally:
        lost = [r for r in caplog.records if "lost its connection" in r.getMessage()]
        print(
            f"[lost fetch reply] {len(lost)} consumer connection losses; "
            f"{client.scard(mine)} ids left in the live worker's ack set {mine!r}"
        )
    assert outcome.duplicates == 0


# -- 3c. while Redis is down ---------------------------------------------------------------


@pytest.mark.slow
def test_the_heartbeat_thread_waits_between_attempts_while_redis_is_down(
    redis_server: RedisServer,
    namespace: str,
    cleanup: Cleanup,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The heartbeat/recovery thread beats every 250 ms and recovers every 200 ms here.
    # While Redis is unreachable it must keep that pace (or back off), not retry in a
    # busy loop that burns a core and floods the log.
    broker = cleanup.broker(redis_server, namespace)
    broker.declare_queue("default")
    broker.consume("default", timeout=100)  # starts the thread
    caplog.set_level(logging.WARNING)
    redis_server.stop()
    cpu_before = time.process_time()
    time.sleep(1.0)
    cpu = time.process_time() - cpu_before
    failures = [r for r in caplog.records if "Heartbeat or recovery failed" in r.getMessage()]
    caplog.clear()  # keep a failure report readable
    redis_server.start()
    print(
        f"[redis down 1 s] {len(failures)} heartbeat/recovery failures logged, "
        f"{cpu:.2f} s CPU used by this process"
    )
    # 1 s / 200 ms = 5 attempts; a few more for timing.
    assert len(failures) <= 12, f"{len(failures)} failed attempts in 1 s: a busy loop"


# -- 4. a worker process is SIGKILLed in the middle of a run -------------------------------


@pytest.mark.slow
def test_messages_of_a_sigkilled_worker_are_finished_by_a_fresh_one(
    redis_server: RedisServer, namespace: str, cleanup: Cleanup, tmp_path: Path
) -> None:
    n = 1000
    client = redis_server.client()
    fresh = cleanup.broker(redis_server, namespace)
    record = declare_record(fresh, namespace)
    messages = [record.message(i) for i in range(n)]
    fresh.enqueue_many(messages)
    expected = {m.message_id for m in messages}
    processed = redis_counts(client, processed_key(namespace))

    child = spawn(
        cleanup,
        redis_server,
        namespace,
        "work",
        tmp_path / "worker.log",
        "--threads",
        "8",
        "--sleep-ms",
        "5",
    )
    wait_until(lambda: len(processed()) >= n // 3, "a third processed", 20)
    child.sigkill()
    killed = time.monotonic()
    at_kill = len(processed())
    held = sum(int(client.scard(k)) for k in ack_set_keys(client, namespace, child.broker_id))
    assert at_kill < n, "the run was over before the kill; raise n"

    cleanup.worker(fresh)
    wait_until(
        lambda: not ack_set_keys(client, namespace, child.broker_id),
        "the dead worker's ack sets to be recovered",
        (HEARTBEAT_TIMEOUT + REQUEUE_INTERVAL + 5000) / 1000,  # seconds
        interval=0.005,
    )
    recovery = time.monotonic() - killed
    outcome = assert_all_processed(
        client, namespace, expected, processed, timeout=20, label="worker sigkill"
    )
    print(
        f"[worker sigkill] killed with {at_kill} processed and {held} held unacked; "
        f"recovered {recovery * 1000:.0f} ms after the kill; {outcome.duplicates} duplicates"
    )
    assert outcome.duplicates <= held, "more duplicates than messages the dead worker held"
    wait_until(
        lambda: heartbeat_ms(client, namespace, child.broker_id) is None,
        "the dead worker's heartbeat entry to be forgotten",
        5,
    )


# -- 5. a poison message kills its worker every time ----------------------------------------


@pytest.mark.slow
def test_a_message_that_kills_its_worker_is_dead_lettered_after_max_deliveries(
    redis_server: RedisServer,
    namespace: str,
    cleanup: Cleanup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    max_deliveries = 2
    client = redis_server.client()
    # This process does the recovering (recover() by hand), so its log has the line.
    parent = cleanup.broker(redis_server, namespace, max_deliveries=max_deliveries)
    poison = parent.enqueue(dq.Message("poison", "poison", (), {}, {}))
    poison_rid: str = poison.options["redis_message_id"]
    xq = f"{namespace}:poison.XQ"
    poison_runs = redis_counts(client, poison_runs_key(namespace))

    caplog.set_level(logging.INFO)
    deaths = 0
    started = time.monotonic()
    for attempt in range(max_deliveries + 2):
        if client.zscore(xq, poison_rid) is not None:
            break
        child = spawn_poison_worker(
            cleanup,
            redis_server,
            namespace,
            tmp_path / f"worker-{attempt}.log",
            threads=1,
            poison_ms=0,
            max_deliveries=max_deliveries,
        )
        try:
            code = child.process.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"attempt {attempt}: the poison message did not kill its worker; "
                f"state {describe(client, namespace)}\n{child.log_text()}"
            ) from None
        assert code == -signal.SIGKILL, f"worker exited with {code}:\n{child.log_text()}"
        deaths += 1
        # Recover it from this process once the dead worker's heartbeat has expired.
        dead = child.broker_id

        wait_recovered(parent, client, namespace, dead, "the dead worker's poison to be recovered")
    elapsed = time.monotonic() - started
    runs = poison_runs().get(poison.message_id, 0)
    print(
        f"[poison] {deaths} worker deaths, {runs} runs, dead-lettered after {elapsed:.2f} s "
        f"(max_deliveries={max_deliveries})"
    )
    assert client.zscore(xq, poison_rid) is not None, (
        f"not dead-lettered after {deaths} deaths: {describe(client, namespace)}"
    )
    assert deaths == max_deliveries, f"{deaths} deaths for max_deliveries={max_deliveries}"
    assert runs == max_deliveries
    assert client.hexists(f"{xq}.msgs", poison_rid)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("dq")
    ]
    assert any(poison.message_id in line and "max_deliveries" in line for line in lines), (
        f"no warning names the dead-lettered message and the reason: {lines}"
    )
    # Only the dead letter (and its reason) is left: no queue, payload, ack set or
    # delivery counter.
    assert describe(client, namespace) == {
        xq: "zset[1]",
        f"{xq}.msgs": "hash[1]",
        f"{namespace}:__dq__.reasons.poison": "hash[1]",
    }

    # The queue works again: a fresh worker runs ordinary messages and stays alive.
    record = declare_record(parent, namespace)
    messages = [record.message(i) for i in range(50)]
    parent.enqueue_many(messages)
    survivor = spawn_poison_worker(
        cleanup,
        redis_server,
        namespace,
        tmp_path / "worker-last.log",
        threads=1,
        poison_ms=0,
        max_deliveries=max_deliveries,
    )
    processed = redis_counts(client, processed_key(namespace))
    wait_until(
        lambda: {m.message_id for m in messages} <= processed().keys(),
        "the ordinary messages to run",
        15,
    )
    assert survivor.process.poll() is None, "the poison ran again"
    assert poison_runs().get(poison.message_id, 0) == max_deliveries


# -- 5b. messages held beside a poison message ----------------------------------------------


@pytest.mark.slow
def test_messages_prefetched_beside_a_poison_message_are_not_dead_lettered(
    redis_server: RedisServer, namespace: str, cleanup: Cleanup, tmp_path: Path
) -> None:
    # A worker that a poison message kills also held other messages it had prefetched
    # (and never started). Recovery returns them to the tail together with the
    # poison, so the same neighbours are fetched with it again, and each recovery
    # counts a delivery for them too. They must not be dead-lettered without ever
    # having run: only the message that kills its worker is poison.
    max_deliveries = 2
    client = redis_server.client()
    parent = cleanup.broker(redis_server, namespace, max_deliveries=max_deliveries)
    poison = parent.enqueue(dq.Message("poison", "poison", (), {}, {}))
    innocents = parent.enqueue_many(
        [dq.Message("poison", "innocent", (i,), {}, {}) for i in range(20)]
    )
    expected = {m.message_id for m in innocents}
    processed = redis_counts(client, processed_key(namespace))
    xq = f"{namespace}:poison.XQ"
    poison_rid: str = poison.options["redis_message_id"]

    deaths = 0
    for attempt in range(max_deliveries + 2):
        if client.zscore(xq, poison_rid) is not None:
            break
        # One thread and a prefetch of 10: the poison (run first, by priority) waits
        # 300 ms, meanwhile its consumer fills the prefetch, then the process dies.
        child = spawn_poison_worker(
            cleanup,
            redis_server,
            namespace,
            tmp_path / f"worker-{attempt}.log",
            threads=1,
            poison_ms=300,
            max_deliveries=max_deliveries,
            env={"dramatiq_queue_prefetch": "10"},
        )
        code = child.process.wait(15)
        assert code == -signal.SIGKILL, f"worker exited with {code}:\n{child.log_text()}"
        deaths += 1
        dead = child.broker_id

        wait_recovered(parent, client, namespace, dead, "recovery")
    assert client.zscore(xq, poison_rid) is not None, "the poison was not dead-lettered"

    # A last worker runs whatever is left.
    spawn_poison_worker(
        cleanup,
        redis_server,
        namespace,
        tmp_path / "worker-last.log",
        threads=1,
        poison_ms=300,
        max_deliveries=max_deliveries,
    )
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not client.exists(f"{namespace}:poison.msgs"), "drained", 10)
    dead_letters = {_text(rid) for rid in client.zrange(xq, 0, -1) if isinstance(rid, bytes | str)}
    innocent_rids = {m.options["redis_message_id"] for m in innocents}
    collateral = dead_letters & innocent_rids
    never_ran = expected - processed().keys()
    print(
        f"[poison neighbours] {deaths} deaths; {len(collateral)} of {len(innocents)} innocent "
        f"messages dead-lettered with the poison; {len(never_ran)} never ran"
    )
    assert not collateral, (
        f"{len(collateral)} innocent messages that never ran were dead-lettered as poison "
        f"(dead letters: {len(dead_letters)}, never ran: {len(never_ran)})"
    )
    assert not never_ran


# -- 5c. a message that runs beside a poison message ------------------------------------------


@pytest.mark.slow
def test_a_message_running_beside_a_poison_message_is_never_dead_lettered(
    redis_server: RedisServer,
    namespace: str,
    cleanup: Cleanup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each time the poison kills its worker, an innocent message is *running* in the
    # same process (two worker threads). Counting every started message blamed both
    # (the innocent was dead-lettered with the poison). The core's rule
    # (dq.core.policy.deliveries_after_death) charges a death to a suspect only when it
    # ran alone: the worker runs suspects alone, and the Redis consumer records how
    # each suspect started.
    max_deliveries = 2
    client = redis_server.client()
    parent = cleanup.broker(redis_server, namespace, max_deliveries=max_deliveries)
    poison = parent.enqueue(dq.Message("poison", "poison", (), {}, {}))
    innocent = parent.enqueue(dq.Message("poison", "innocent", (0,), {}, {}))
    poison_rid: str = poison.options["redis_message_id"]
    innocent_rid: str = innocent.options["redis_message_id"]
    xq = f"{namespace}:poison.XQ"
    starts = redis_counts(client, innocent_starts_key(namespace))
    processed = redis_counts(client, processed_key(namespace))

    caplog.set_level(logging.INFO)
    beside: list[bool] = []
    for attempt in range(max_deliveries + 1):
        if client.zscore(xq, poison_rid) is not None:
            break
        before = starts().get(innocent.message_id, 0)
        child = spawn_poison_worker(
            cleanup,
            redis_server,
            namespace,
            tmp_path / f"worker-{attempt}.log",
            threads=2,
            poison_ms=300,
            innocent_ms=5000,
            max_deliveries=max_deliveries,
        )
        code = child.process.wait(20)
        assert code == -signal.SIGKILL, f"worker exited with {code}:\n{child.log_text()}"
        beside.append(
            starts().get(innocent.message_id, 0) > before and innocent.message_id not in processed()
        )
        dead = child.broker_id

        wait_recovered(parent, client, namespace, dead, "recovery")

    dead_letters = {_text(r) for r in client.zrange(xq, 0, -1) if isinstance(r, bytes | str)}
    counts = redis_counts(client, f"{namespace}:__dq__.deliveries.poison")()
    print(
        f"[poison beside] {len(beside)} deaths, innocent running beside the poison in "
        f"{sum(beside)}; dead letters {sorted(dead_letters)}; counts {counts}"
    )
    assert beside[0], "the innocent message was not running when the poison struck"
    assert innocent_rid not in dead_letters, "the innocent message was dead-lettered"
    assert client.hexists(f"{namespace}:poison.msgs", innocent_rid)  # still stored
    # Both became suspects at the first death; dq's worker then runs a suspect alone,
    # so the poison's next death is its own and it is dead-lettered at the cap.
    assert poison_rid in dead_letters, (beside, counts)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        poison.message_id in line and poison_rid in line and "max_deliveries" in line
        for line in lines
    ), lines
    assert counts == {innocent_rid: 1}
