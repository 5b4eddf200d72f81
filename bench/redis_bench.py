"""RedisBroker throughput and latency: dq against Dramatiq 2.2.1, side by side on one Redis.

Five measurements; per run, each starts **one fresh subprocess per library**, each in
its **own fresh namespace** (``dq-bench-<library>-<measure>-<hex>``) whose keys are all
deleted afterwards:

* ``enqueue``: ``for i in range(n): add.send(i, 2)``.
* ``bulk``: dq's ``add.send_many([add.message(i, 2) for i in range(n)])`` (building the
  messages is timed too) against Dramatiq's fastest equivalent, the same send loop as
  ``enqueue`` (Dramatiq has no bulk enqueue: ``group(...).run()`` is a send loop).
* ``drain``: M ``noop()`` messages are enqueued untimed on a fresh broker (dq:
  ``broker.enqueue_many``, Dramatiq: a send loop); then an in-process
  ``Worker(broker, worker_threads=8, worker_timeout=100)`` is timed from
  ``worker.start()`` until the actor has run M times (an ``itertools.count`` in the actor;
  the M-th call takes the end time), M = N/drain_slices.
* ``latency_0ms`` and ``latency_100ms``: an idle in-process ``Worker`` (8 threads, the
  library's default ``worker_timeout``); K times, ``t0 = time.perf_counter()`` just before
  ``probe.send(t0)``, and the actor records ``time.perf_counter() - t0`` as it starts;
  the next send follows that start after a 0 ms or 100 ms pause (so does the first
  timed one, after a few untimed samples).

The two subprocesses of a measurement live side by side but take turns: the parent asks
one, then the other, for a timing. ``enqueue`` and ``bulk`` are cut into ``--slices``
timings of N/slices messages each, ``drain`` into ``--drain-slices`` drains, alternated
dq, dramatiq, dramatiq, dq, ... (load from other processes on the machine comes and goes
within seconds, and this way both libraries get the same share of it); their rate is N
over the summed seconds. The latencies are one timing per library and run, dq first in
odd runs and Dramatiq first in even runs.

Both libraries use ``RedisBroker(url=..., namespace=...)`` with their default middleware,
the same redis-py and the same server; the broker is set as the library's global broker
before the actors (queue ``default``) are defined. Before the first timing each
subprocess warms up untimed (a few hundred sends, and a small drain for ``drain``). The
garbage collector stays enabled but is run by hand before each timing. Every timing is
checked: the queue holds exactly the messages sent after enqueueing, and after a drain or
latency timing every message ran exactly once and nothing is left or dead-lettered. Keys
left in the namespace after the broker is flushed and closed are reported (and deleted by
the subprocess), and so are keys written after the subprocess has exited (deleted by the
parent).

Run it through ``bash bench/run.sh redis`` (which provides Dramatiq and redis-py);
``--help`` lists options.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import redis

import harness
from harness import Figures, Progress

DEFAULT_URL = "redis://127.0.0.1:6379/0"
QUEUE = "default"
WORKER_THREADS = 8
#: ms, the drain worker's ``worker_timeout`` for both libraries (as in ``drain.py``).
DRAIN_WORKER_TIMEOUT_MS = 100
#: Untimed sends (and, for dq's bulk, ``send_many``) before the first timing.
WARMUP_SENDS = 500
#: Messages drained untimed before the first drain timing.
WARMUP_DRAIN = 200
#: Untimed samples before each latency timing.
LATENCY_WARMUP = 5
#: Seconds to wait for one latency message to start before calling it lost.
START_TIMEOUT_S = 10.0
#: Seconds one request to a subprocess may take before the parent kills it.
REQUEST_TIMEOUT_S = 300.0
LIBRARY_NAMES = ("dq", "dramatiq")


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    #: ``rate`` (msgs/s, higher is better) or ``latency`` (ms, lower is better).
    kind: str
    #: The option (``slices`` or ``drain_slices``) saying how many alternated timings
    #: the N messages are cut into; None: one timing per library and run.
    sliced: str | None = None
    #: The pause between one latency message's start and the next send, in ms.
    gap_ms: int = 0


MEASURES = (
    Measure("enqueue", "enqueue: N x add.send(i, 2)", "rate", sliced="slices"),
    Measure("bulk", "bulk: dq send_many, dramatiq send loop", "rate", sliced="slices"),
    Measure("drain", "drain: Worker, 8 threads", "rate", sliced="drain_slices"),
    Measure("latency_0ms", "idle worker, 0 ms gap", "latency", gap_ms=0),
    Measure("latency_100ms", "idle worker, 100 ms gap", "latency", gap_ms=100),
)
BY_KEY = {m.key: m for m in MEASURES}
#: ``--only`` names: ``latency`` selects both latency measurements.
GROUPS = {
    "enqueue": ("enqueue",),
    "bulk": ("bulk",),
    "drain": ("drain",),
    "latency": ("latency_0ms", "latency_100ms"),
}

#: What the project must reach: the dq/dramatiq ratio of median rates at least, or dq's
#: median p99 at most (ms).
TARGETS: dict[str, tuple[str, float]] = {
    "enqueue": ("ratio", 1.3),
    "bulk": ("ratio", 10.0),
    "drain": ("ratio", 3.0),
    "latency_100ms": ("p99", 5.0),
}


# The subprocess: one library, one measurement -------------------------------------


@dataclass(frozen=True)
class RedisLibrary:
    """What a timing uses of dq or Dramatiq (typed loosely: they share no classes)."""

    name: str
    #: ``RedisBroker``: called as ``broker(url=..., namespace=...)``.
    broker: Callable[..., Any]
    set_broker: Callable[[Any], None]
    #: ``actor(queue_name=...)``: returns the decorator.
    actor: Callable[..., Callable[[Callable[..., Any]], Any]]
    worker: Callable[..., Any]
    #: The default ``worker_timeout`` (ms).
    worker_timeout: int


def load(name: str) -> RedisLibrary:
    """Import one library's Redis broker (only in the subprocess that times it)."""
    if name == "dq":
        # Imported here: the parent never needs dq's Redis broker.
        import dq  # noqa: PLC0415
        import dq.worker  # noqa: PLC0415
        from dq.brokers.redis import RedisBroker as DqRedisBroker  # noqa: PLC0415

        return RedisLibrary(
            "dq", DqRedisBroker, dq.set_broker, dq.actor, dq.Worker, dq.worker.WORKER_TIMEOUT
        )
    import dramatiq  # noqa: PLC0415
    import dramatiq.worker  # noqa: PLC0415
    from dramatiq.brokers.redis import RedisBroker as DramatiqRedisBroker  # noqa: PLC0415

    return RedisLibrary(
        "dramatiq",
        DramatiqRedisBroker,
        dramatiq.set_broker,
        dramatiq.actor,
        dramatiq.Worker,
        dramatiq.worker.WORKER_TIMEOUT,
    )


def keys_under(client: redis.Redis, namespace: str) -> list[str]:
    """Every key of ``namespace`` (SCAN, so safe next to other users of the server)."""
    return sorted(k.decode() for k in client.scan_iter(match=f"{namespace}:*", count=1000))


def delete_namespace(client: redis.Redis, namespace: str) -> list[str]:
    """Delete every key of ``namespace``; return their names (without the namespace)."""
    keys = keys_under(client, namespace)
    if keys:
        client.delete(*keys)
    return [k.removeprefix(namespace + ":") for k in keys]


@dataclass
class Context:
    library: RedisLibrary
    url: str
    client: redis.Redis
    namespace: str
    latency_worker_timeout: int | None
    broker: Any = None

    def new_broker(self) -> Any:
        """Close the current broker (if any) and set a fresh one as the library's global
        broker: actors defined after this use it."""
        if self.broker is not None:
            self.broker.close()
        self.broker = self.library.broker(url=self.url, namespace=self.namespace)
        self.library.set_broker(self.broker)
        return self.broker

    def key(self, suffix: str) -> str:
        return f"{self.namespace}:{suffix}"

    def queue_counts(self) -> tuple[int, int, int, int]:
        """Ids listed and payloads stored on the queue, payloads on its delay queue,
        dead letters."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.key(QUEUE))
        pipe.hlen(self.key(f"{QUEUE}.msgs"))
        pipe.hlen(self.key(f"{QUEUE}.DQ.msgs"))
        pipe.zcard(self.key(f"{QUEUE}.XQ"))
        listed, stored, delayed, dead = (int(x) for x in pipe.execute())
        return listed, stored, delayed, dead

    def check_queued(self, expected: int) -> None:
        listed, stored, delayed, dead = self.queue_counts()
        if (listed, stored, delayed, dead) != (expected, expected, 0, 0):
            raise RuntimeError(
                f"{self.library.name}: {listed} ids listed and {stored} payloads stored on "
                f"{QUEUE!r}, {delayed} delayed, {dead} dead-lettered; expected {expected}, "
                f"{expected}, 0, 0"
            )

    def check_all_ran(self, ran: int, expected: int) -> None:
        listed, stored, delayed, dead = self.queue_counts()
        if (ran, listed, stored, delayed, dead) != (expected, 0, 0, 0, 0):
            raise RuntimeError(
                f"{self.library.name}: {ran} of {expected} messages ran; {listed} ids listed "
                f"and {stored} payloads stored on {QUEUE!r}, {delayed} delayed, "
                f"{dead} dead-lettered (expected {expected} ran and nothing left)"
            )


class Timing:
    """One measurement in a subprocess: set up (and warmed up) on creation, then timed
    ``run(n)`` calls, then ``finish()`` (checks)."""

    def __init__(self, ctx: Context, gap_ms: int) -> None:
        self.ctx = ctx
        self.gap_ms = gap_ms

    def run(self, n: int) -> Figures:
        raise NotImplementedError

    def finish(self) -> None:
        """Check what is left after the last ``run``."""


class Enqueue(Timing):
    """``add.send(i, 2)`` in a loop; the messages stay queued until ``finish``."""

    def __init__(self, ctx: Context, gap_ms: int) -> None:
        super().__init__(ctx, gap_ms)

        @ctx.library.actor(queue_name=QUEUE)
        def add(x: int, y: int) -> int:
            return x + y

        self.add = add
        self.sent = 0
        self.warm_up()
        ctx.broker.flush(QUEUE)
        ctx.check_queued(0)

    def warm_up(self) -> None:
        for i in range(WARMUP_SENDS):
            self.add.send(i, 2)

    def run(self, n: int) -> Figures:
        add = self.add
        gc.collect()
        start = time.perf_counter()
        for i in range(n):
            add.send(i, 2)
        elapsed = time.perf_counter() - start
        self.sent += n
        return {"seconds": elapsed, "how": "send loop"}

    def finish(self) -> None:
        self.ctx.check_queued(self.sent)


class Bulk(Enqueue):
    """dq: ``add.send_many([add.message(i, 2) ...])`` (``broker.enqueue_many`` where the
    actor has no ``send_many``); Dramatiq: `Enqueue`'s send loop."""

    def warm_up(self) -> None:
        super().warm_up()
        if self.ctx.library.name == "dq":
            self.send_many([self.add.message(i, 2) for i in range(WARMUP_SENDS)])

    def send_many(self, messages: list[Any]) -> None:
        send_many = getattr(self.add, "send_many", None)
        if send_many is not None:
            send_many(messages)
        else:
            self.ctx.broker.enqueue_many(messages)

    def run(self, n: int) -> Figures:
        if self.ctx.library.name != "dq":
            return super().run(n)
        add = self.add
        how = "actor.send_many" if hasattr(add, "send_many") else "broker.enqueue_many"
        gc.collect()
        start = time.perf_counter()
        self.send_many([add.message(i, 2) for i in range(n)])
        elapsed = time.perf_counter() - start
        self.sent += n
        return {"seconds": elapsed, "how": how}


class Drain(Timing):
    """N ``noop()`` sent untimed, then timed: ``worker.start()`` until the N-th ran.

    Each drain gets a fresh broker (a Dramatiq worker leaves its middleware on the
    broker after ``stop()``: a second worker on it would run both)."""

    def __init__(self, ctx: Context, gap_ms: int) -> None:
        super().__init__(ctx, gap_ms)
        self.counter = itertools.count(1)
        self.target = 0
        self.finished = threading.Event()
        self.end = 0.0
        self.run(WARMUP_DRAIN)

    def run(self, n: int) -> Figures:
        ctx = self.ctx
        ctx.new_broker()

        @ctx.library.actor(queue_name=QUEUE)
        def noop() -> None:
            if next(self.counter) == self.target:
                self.end = time.perf_counter()
                self.finished.set()

        self.counter = itertools.count(1)
        self.target = n
        self.finished.clear()
        # Untimed: the library's fastest enqueue (dq's bulk path saves seconds per run).
        bulk = getattr(ctx.broker, "enqueue_many", None)
        if bulk is not None:
            bulk([noop.message() for _ in range(n)])
        else:
            for _ in range(n):
                noop.send()
        ctx.check_queued(n)

        worker = ctx.library.worker(
            ctx.broker, worker_threads=WORKER_THREADS, worker_timeout=DRAIN_WORKER_TIMEOUT_MS
        )
        gc.collect()
        start = time.perf_counter()
        worker.start()
        try:
            if not self.finished.wait(60 + n / 1000):
                ran = next(self.counter) - 1
                raise RuntimeError(f"{ctx.library.name}: only {ran} of {n} messages ran in time")
            ctx.broker.join(QUEUE, interval=10, timeout=30_000)
        finally:
            worker.stop()
        ctx.check_all_ran(next(self.counter) - 1, n)
        return {"seconds": self.end - start}


class Latency(Timing):
    """An idle worker; ``probe.send(t0)`` one at a time, ``gap_ms`` after each start."""

    def __init__(self, ctx: Context, gap_ms: int) -> None:
        super().__init__(ctx, gap_ms)
        self.latencies: list[float] = []
        self.started = threading.Event()

        @ctx.library.actor(queue_name=QUEUE)
        def probe(t0: float) -> None:
            self.latencies.append(time.perf_counter() - t0)
            self.started.set()

        self.probe = probe

    def worker_timeout(self) -> int:
        return self.ctx.latency_worker_timeout or self.ctx.library.worker_timeout

    def run(self, n: int) -> Figures:
        ctx = self.ctx
        self.latencies = []
        worker = ctx.library.worker(
            ctx.broker, worker_threads=WORKER_THREADS, worker_timeout=self.worker_timeout()
        )
        worker.start()
        total = LATENCY_WARMUP + n
        try:
            for k in range(total):
                if k == LATENCY_WARMUP:
                    gc.collect()
                time.sleep(self.gap_ms / 1000)
                self.started.clear()
                t0 = time.perf_counter()
                self.probe.send(t0)
                if not self.started.wait(START_TIMEOUT_S):
                    raise RuntimeError(
                        f"{ctx.library.name}: message {k + 1}/{total} had not started "
                        f"{START_TIMEOUT_S:.0f} s after its send on an idle worker"
                    )
            ctx.broker.join(QUEUE, interval=10, timeout=int(START_TIMEOUT_S * 1000))
        finally:
            worker.stop()
        ctx.check_all_ran(len(self.latencies), total)
        return {
            "latencies": self.latencies[LATENCY_WARMUP:],
            "worker_timeout_ms": self.worker_timeout(),
        }


TIMINGS: dict[str, type[Timing]] = {
    "enqueue": Enqueue,
    "bulk": Bulk,
    "drain": Drain,
    "latency_0ms": Latency,
    "latency_100ms": Latency,
}


def child(args: argparse.Namespace) -> int:
    """Serve one library and measurement: set up, answer ``{"n": N}`` lines on stdin
    with one timing each and ``{"end": true}`` with the final figures, one JSON line per
    answer on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the answers' stream

    def answer(figures: Figures) -> None:
        out.write(json.dumps(figures) + "\n")
        out.flush()

    library_name, measure = args.child.split(":")
    library = load(library_name)
    client = redis.Redis.from_url(args.url)
    ctx = Context(library, args.url, client, args.namespace, args.latency_worker_timeout)
    broker = ctx.new_broker()
    try:
        timing = TIMINGS[measure](ctx, BY_KEY[measure].gap_ms)
        answer({"ready": True})
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("end"):
                break
            answer(timing.run(int(request["n"])))
        timing.finish()
    finally:
        broker = ctx.broker
        broker.flush_all()
        broker.close()
        left = delete_namespace(client, args.namespace)
    answer({"middleware": [type(m).__name__ for m in broker.middleware], "keys_after_close": left})
    return 0


# The parent: processes, runs, statistics, output ------------------------------------


class Child:
    """A subprocess serving one library and measurement (see `child`)."""

    def __init__(self, args: argparse.Namespace, library: str, measure: str) -> None:
        self.library = library
        self.measure = measure
        self.url: str = args.url
        self.namespace = f"dq-bench-{library}-{measure}-{uuid.uuid4().hex[:12]}"
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            f"{library}:{measure}",
            "--url",
            args.url,
            "--namespace",
            self.namespace,
        ]
        if args.latency_worker_timeout is not None:
            cmd += ["--latency-worker-timeout", str(args.latency_worker_timeout)]
        self.stderr: IO[str] = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (closed in end/kill)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )

    def request(self, request: Figures | None) -> Figures:
        """Send ``request`` (None: only wait) and return the answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        watchdog = threading.Timer(REQUEST_TIMEOUT_S, self.proc.kill)
        watchdog.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            watchdog.cancel()
        if not line:
            self.proc.wait()
            raise RuntimeError(
                f"{self.library} {self.measure}: the subprocess exited with "
                f"{self.proc.returncode} (killed after {REQUEST_TIMEOUT_S:.0f} s if -9)\n"
                + self.stderr_text()
            )
        answer: Figures = json.loads(line)
        return answer

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def end(self) -> Figures:
        """Ask for the final figures, wait for the exit, report stderr and the keys
        written after the broker was closed (deleted here)."""
        final = self.request({"end": True})
        self.proc.wait(REQUEST_TIMEOUT_S)
        final["keys_after_exit"] = self.delete_keys()
        for line in self.stderr_text().strip().splitlines()[-20:]:
            harness.note(f"{self.library} {self.measure}: {line}")
        self.stderr.close()
        if final["keys_after_exit"]:
            harness.note(
                f"{self.library} {self.measure}: keys written after the broker was closed: "
                f"{', '.join(final['keys_after_exit'])}"
            )
        return final

    def kill(self) -> None:
        """Stop a subprocess that is still running (after an error) and clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Best effort: an unreachable Redis must not hide the error being raised.
        with contextlib.suppress(redis.exceptions.RedisError):
            self.delete_keys()
        self.stderr.close()

    def delete_keys(self) -> list[str]:
        client = redis.Redis.from_url(self.url)
        try:
            return delete_namespace(client, self.namespace)
        finally:
            client.close()


@dataclass(frozen=True)
class Percentiles:
    """p50, p99 and max of one timing's latencies, in milliseconds."""

    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, latencies: Sequence[float]) -> Percentiles:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return cls(p50=cuts[49] * 1000, p99=cuts[98] * 1000, max=max(latencies) * 1000)


STATS = ("p50", "p99", "max")


def slice_sizes(n: int, slices: int) -> list[int]:
    """``n`` cut into ``slices`` sizes that differ by at most one."""
    return [n // slices + (1 if i < n % slices else 0) for i in range(slices)]


def order(k: int, libraries: Sequence[str]) -> list[str]:
    """``libraries`` as given for odd ``k``, reversed for even ``k``."""
    return list(libraries) if k % 2 else list(reversed(libraries))


def measure_once(args: argparse.Namespace, k: int, m: Measure) -> dict[str, Figures]:
    """One run of one measurement: a subprocess per library; their figures by library."""
    libraries: list[str] = args.libraries
    children: dict[str, Child] = {}
    try:
        for name in order(k, libraries):
            children[name] = Child(args, name, m.key)
        for child in children.values():
            child.request(None)  # ready
        results: dict[str, Figures] = {name: {"seconds": 0.0} for name in libraries}
        if m.sliced:
            for j, size in enumerate(slice_sizes(args.n, getattr(args, m.sliced))):
                for name in order(k + j, libraries):
                    answer = children[name].request({"n": size})
                    results[name]["seconds"] += answer["seconds"]
                    results[name]["how"] = answer.get("how", "")
        else:
            size = args.n if m.kind == "rate" else args.samples
            for name in order(k, libraries):
                results[name] = children[name].request({"n": size})
        for name in libraries:
            results[name].update(children[name].end())
    finally:
        for child in children.values():
            child.kill()
    for figures in results.values():
        if m.kind == "rate":
            figures["rate"] = args.n / figures["seconds"]
        else:
            figures["percentiles"] = Percentiles.of(figures["latencies"])
    return results


def run_line(k: int, runs: int, m: Measure, values: dict[str, Figures]) -> str:
    """One run's line for one measurement."""
    head = f"run {k}/{runs} {m.key + ':':<15}"
    parts = []
    if m.kind == "rate":
        rates = {name: v["rate"] for name, v in values.items()}
        parts = [f"{name} {rate:>10,.0f} msgs/s" for name, rate in rates.items()]
        if len(rates) == 2:
            parts.append(f"dq/dramatiq {rates['dq'] / rates['dramatiq']:.3f}")
    else:
        for name, v in values.items():
            p: Percentiles = v["percentiles"]
            parts.append(f"{name} p50 {p.p50:7.3f} p99 {p.p99:7.3f} max {p.max:7.3f} ms")
    return head + "   ".join(parts)


def summarize(m: Measure, libraries: list[str], per_run: list[dict[str, Figures]]) -> Figures:
    """The figures of one measurement over the runs."""
    entry: Figures = {"label": m.label, "kind": m.kind}
    if m.kind == "rate":
        rates = {name: [r[name]["rate"] for r in per_run] for name in libraries}
        entry.update({name: harness.spread(rates[name]) for name in libraries})
        if len(libraries) == 2:
            entry.update(harness.ratios(rates["dq"], rates["dramatiq"]))
        entry["how"] = {name: per_run[0][name].get("how", "") for name in libraries}
        return entry
    pcts = {name: [r[name]["percentiles"] for r in per_run] for name in libraries}
    for name in libraries:
        entry[name] = {
            stat: harness.spread([getattr(p, stat) for p in pcts[name]], "runs") for stat in STATS
        }
    if len(libraries) == 2:
        entry["ratios"] = {
            stat: harness.ratios(
                [getattr(p, stat) for p in pcts["dq"]],
                [getattr(p, stat) for p in pcts["dramatiq"]],
            )
            for stat in ("p50", "p99")
        }
    return entry


def measure_all(args: argparse.Namespace, progress: Progress) -> Figures:
    """Every selected measurement ``--runs`` times; return the figures."""
    libraries: list[str] = args.libraries
    measures = [BY_KEY[key] for group in args.only for key in GROUPS[group]]
    per_run: dict[str, list[dict[str, Figures]]] = {m.key: [] for m in measures}
    for k in range(1, args.runs + 1):
        for m in measures:
            values = measure_once(args, k, m)
            per_run[m.key].append(values)
            progress(run_line(k, args.runs, m, values))

    first = {name: per_run[measures[0].key][0][name] for name in libraries}
    leftovers = sorted(
        {
            f"{name} {key} {when}: {left}"
            for key, runs in per_run.items()
            for values in runs
            for name, figures in values.items()
            for when in ("keys_after_close", "keys_after_exit")
            for left in figures[when]
        }
    )
    return {
        "benchmark": "redis_broker",
        **harness.environment(),
        **server_environment(args.url),
        "n": args.n,
        "slices": args.slices,
        "drain_slices": args.drain_slices,
        "samples": args.samples,
        "runs": args.runs,
        "libraries": libraries,
        "worker_threads": WORKER_THREADS,
        "drain_worker_timeout_ms": DRAIN_WORKER_TIMEOUT_MS,
        "latency_worker_timeout_ms": {
            name: per_run[key][0][name]["worker_timeout_ms"]
            for key in per_run
            if BY_KEY[key].kind == "latency"
            for name in libraries
        },
        "middleware": {name: first[name]["middleware"] for name in libraries},
        "leftover_keys": leftovers,
        "measures": {m.key: summarize(m, libraries, per_run[m.key]) for m in measures},
    }


def server_environment(url: str) -> Figures:
    client = redis.Redis.from_url(url)
    info = client.info("server")
    client.close()
    return {
        "redis_server": str(info.get("redis_version")),
        "redis_py": redis.__version__,
        # redis-py parses replies with hiredis when it is installed (neither needs it).
        "hiredis": importlib.util.find_spec("hiredis") is not None,
        "url": url,
        "cpus": os.cpu_count(),
    }


def verdict(key: str, entry: Figures) -> str:
    """The target of a measurement, and whether it is met; ``""`` if it has none."""
    if key not in TARGETS:
        return ""
    what, bound = TARGETS[key]
    if what == "ratio":
        if "ratio_of_medians" not in entry:
            return f">= {bound:g}x"
        ok = entry["ratio_of_medians"] >= bound
        return f">= {bound:g}x: {'met' if ok else 'NOT met'}"
    if "dq" not in entry:
        return f"dq p99 <= {bound:g} ms"
    ok = entry["dq"]["p99"]["median"] <= bound
    return f"dq p99 <= {bound:g} ms: {'met' if ok else 'NOT met'}"


def cell(summary: Figures, fmt: str) -> str:
    return f"{summary['median']:{fmt}} ({summary['min']:{fmt}} – {summary['max']:{fmt}})"


def format_table(figures: Figures) -> str:
    """Render the figures of `measure_all` as a plain-text table."""
    libraries: list[str] = figures["libraries"]
    both = len(libraries) == 2
    size = (
        f"N={figures['n']:,} (in alternated slices: enqueue/bulk {figures['slices']}, "
        f"drain {figures['drain_slices']})   samples={figures['samples']:,}"
    )
    lines = [
        "RedisBroker: dq against Dramatiq, one subprocess and namespace per library, "
        "measurement and run; default middleware; gc enabled",
        f"redis {figures['redis_server']} at {figures['url']}   redis-py {figures['redis_py']} "
        f"(hiredis: {'yes' if figures['hiredis'] else 'no'})   cpus={figures['cpus']}",
        harness.versions_line(figures, size),
    ]
    lines += [f"middleware {name}: [{', '.join(m)}]" for name, m in figures["middleware"].items()]
    timeouts = ", ".join(f"{k} {v} ms" for k, v in figures["latency_worker_timeout_ms"].items())
    lines.append(
        f"Worker: {figures['worker_threads']} threads; drain worker_timeout="
        f"{figures['drain_worker_timeout_ms']} ms; latency worker_timeout: {timeouts or '-'}"
    )

    measures: dict[str, Figures] = figures["measures"]
    rate_keys = [k for k, e in measures.items() if e["kind"] == "rate"]
    lat_keys = [k for k, e in measures.items() if e["kind"] == "latency"]
    if rate_keys:
        lines += ["", "throughput, msgs/s: median (min – max) over the runs"]
        head = f"{'':<38} " + " ".join(f"{name:>28}" for name in libraries)
        if both:
            head += f"   {'dq/dramatiq (per-run)':>24}   target"
        lines.append(head)
        for key in rate_keys:
            e = measures[key]
            row = f"{e['label']:<38} " + " ".join(f"{cell(e[n], ',.0f'):>28}" for n in libraries)
            if both:
                ratio = f"{e['ratio_of_medians']:.2f} ({harness.ratio_span(e)})"
                row += f"   {ratio:>24}   {verdict(key, e)}"
            lines.append(row)
        if "bulk" in measures and "dq" in libraries:
            lines.append(f"(bulk: dq used {measures['bulk']['how']['dq']})")
    if lat_keys:
        lines += [
            "",
            "send-to-start latency, ms: median (min – max) over the runs of each run's "
            "p50 / p99 / max",
        ]
        for key in lat_keys:
            e = measures[key]
            target = verdict(key, e)
            lines.append(e["label"] + (f"   (target {target})" if target else ""))
            for name in libraries:
                cells = "   ".join(f"{stat} {cell(e[name][stat], '.3f')}" for stat in STATS)
                lines.append(f"  {name:<11} {cells}")
            if both:
                r = e["ratios"]
                lines.append(
                    f"  {'dq/dramatiq':<11} p50 {r['p50']['ratio_of_medians']:.3f} "
                    f"({harness.ratio_span(r['p50'])})   p99 {r['p99']['ratio_of_medians']:.3f} "
                    f"({harness.ratio_span(r['p99'])})   (< 1: dq starts messages sooner)"
                )
    if figures["leftover_keys"]:
        lines += ["", "keys left in a namespace after the broker was flushed and closed:"]
        lines += [f"  {line}" for line in figures["leftover_keys"]]
    return "\n".join(lines)


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items or any(item not in choices for item in items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(choices)}"
            )
        return [c for c in choices if c in items]

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.make_parser(__doc__, "--n", 20_000, "messages per throughput timing", 3)
    parser.add_argument(
        "--slices",
        type=harness.positive_int,
        default=10,
        help="alternated timings the N messages of enqueue and bulk are cut into (default 10)",
    )
    parser.add_argument(
        "--drain-slices",
        type=harness.positive_int,
        default=4,
        help="alternated drains (each from worker.start()) the N messages are cut into (default 4)",
    )
    parser.add_argument(
        "--samples",
        type=harness.positive_int,
        default=200,
        help="latencies per latency timing (default 200)",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Redis URL (default {DEFAULT_URL})")
    parser.add_argument(
        "--only",
        type=comma_list(tuple(GROUPS)),
        default=list(GROUPS),
        help=f"measurements to run, comma-separated (default {','.join(GROUPS)})",
    )
    parser.add_argument(
        "--libraries",
        type=comma_list(LIBRARY_NAMES),
        default=list(LIBRARY_NAMES),
        help="libraries to run, comma-separated (default dq,dramatiq; ratios need both)",
    )
    parser.add_argument(
        "--latency-worker-timeout",
        type=harness.positive_int,
        default=None,
        help="worker_timeout (ms) of the latency worker (default: each library's default)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.samples < 2:
        parser.error("--samples must be >= 2 (percentiles need two values)")
    if max(args.slices, args.drain_slices) > args.n:
        parser.error("--slices and --drain-slices must not exceed --n")
    return harness.report(
        lambda progress: measure_all(args, progress), format_table, as_json=args.json
    )


if __name__ == "__main__":
    sys.exit(main())
