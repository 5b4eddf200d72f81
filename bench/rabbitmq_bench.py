"""RabbitmqBroker throughput and latency: dq against Dramatiq 2.2.1, side by side on one RabbitMQ.

Six measurements; per run, each starts **one fresh subprocess per library**, each on its
**own fresh queue** (``dqbench_<library>_<measure>_<hex>``), which the subprocess deletes
with its ``.DQ`` and ``.XQ`` at the end (and the parent again after it exited):

* ``enqueue``: ``for i in range(n): add.send(i, 2)`` on ``RabbitmqBroker(url=...)``
  (no publisher confirms: a publish returns once written to the socket).
* ``enqueue_confirm``: the same loop on ``RabbitmqBroker(url=..., confirm_delivery=True)``:
  every publish waits for the server's confirm.
* ``bulk_confirm``: with ``confirm_delivery=True``, dq's
  ``add.send_many([add.message(i, 2) for i in range(n)])`` (building the messages is timed
  too; all publishes of a batch share one wait for confirms) against Dramatiq's only
  confirmed way, the send loop of ``enqueue_confirm`` (Dramatiq has no bulk enqueue).
* ``drain``: M ``noop()`` messages are published untimed on a fresh broker (dq:
  ``broker.enqueue_many``, Dramatiq: a send loop) and counted on the server; then an
  in-process ``Worker(broker, worker_threads=8, worker_timeout=100)`` is timed from
  ``worker.start()`` until the actor has run M times (the M-th call takes the end time),
  M = N/drain_slices.
* ``latency_0ms`` and ``latency_100ms``: an idle in-process ``Worker`` (8 threads, the
  library's default ``worker_timeout``); K times, ``t0 = time.perf_counter()`` just before
  ``probe.send(t0)``, and the actor records ``time.perf_counter() - t0`` as it starts; the
  next send follows that start after a 0 ms or 100 ms pause.

The two subprocesses of a measurement live side by side but take turns: the parent asks
one, then the other, for a timing. The throughput measurements are cut into alternated
slices (``--slices`` for the three enqueues, ``--drain-slices`` drains), dq, dramatiq,
dramatiq, dq, ..., so that load from other processes on the (shared, 2-core) machine hits
both libraries alike; a rate is N over the summed seconds. The latencies are one timing
per library and run, dq first in odd runs and Dramatiq first in even runs.

Both libraries use their ``RabbitmqBroker`` with the same URL and their default
middleware, the same pika and the same server; the broker is set as the library's global
broker before the actors are defined. Before the first timing each subprocess warms up
untimed. The garbage collector stays enabled but is run by hand before each timing.
Every timing is checked on the server through a separate plain pika connection (passive
declares): after enqueueing the queue holds exactly the messages sent (unconfirmed
publishes are waited for), and after a drain or latency timing every message ran exactly
once and nothing is left ready or dead-lettered.

Run it through ``bash bench/run.sh rabbitmq`` (which provides Dramatiq and pika);
``--help`` lists options.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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

import pika
import pika.exceptions

import harness
from harness import Figures, Progress

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
WORKER_THREADS = 8
#: ms, the drain worker's ``worker_timeout`` for both libraries (as in ``drain.py``).
DRAIN_WORKER_TIMEOUT_MS = 100
#: Untimed sends (and, for dq's bulk, one ``send_many`` of as many) before the first timing.
WARMUP_SENDS = 300
#: Messages drained untimed before the first drain timing.
WARMUP_DRAIN = 200
#: Untimed samples before each latency timing.
LATENCY_WARMUP = 5
#: Seconds to wait for one latency message to start before calling it lost.
START_TIMEOUT_S = 10.0
#: Seconds to wait for unconfirmed publishes to show up in the queue's count.
ROUTED_TIMEOUT_S = 60.0
#: Seconds one request to a subprocess may take before the parent kills it.
REQUEST_TIMEOUT_S = 300.0
LIBRARY_NAMES = ("dq", "dramatiq")
#: Lines of a failed subprocess's stderr shown with the error.
STDERR_LINES = 60


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    #: ``rate`` (msgs/s, higher is better) or ``latency`` (ms, lower is better).
    kind: str
    #: The option (``slices`` or ``drain_slices``) saying how many alternated timings
    #: the messages are cut into; None: one timing per library and run.
    sliced: str | None = None
    #: The option giving the number of messages (``n`` or ``confirm_n``).
    size: str = "n"
    #: Whether the broker waits for publisher confirms.
    confirm: bool = False
    #: The pause between one latency message's start and the next send, in ms.
    gap_ms: int = 0


MEASURES = (
    Measure("enqueue", "enqueue, no confirms: send loop", "rate", sliced="slices"),
    Measure(
        "enqueue_confirm",
        "enqueue, confirms: send loop",
        "rate",
        sliced="slices",
        size="confirm_n",
        confirm=True,
    ),
    Measure(
        "bulk_confirm",
        "confirmed batch: dq send_many, dramatiq send loop",
        "rate",
        sliced="slices",
        size="confirm_n",
        confirm=True,
    ),
    Measure("drain", "drain: Worker, 8 threads", "rate", sliced="drain_slices"),
    Measure("latency_0ms", "idle worker, 0 ms gap", "latency", gap_ms=0),
    Measure("latency_100ms", "idle worker, 100 ms gap", "latency", gap_ms=100),
)
BY_KEY = {m.key: m for m in MEASURES}
#: ``--only`` names: ``latency`` selects both latency measurements.
GROUPS = {
    "enqueue": ("enqueue",),
    "enqueue_confirm": ("enqueue_confirm",),
    "bulk_confirm": ("bulk_confirm",),
    "drain": ("drain",),
    "latency": ("latency_0ms", "latency_100ms"),
}

#: What the project must reach (issue 6): the dq/dramatiq ratio of median rates at
#: least, or dq's median p99 at most Dramatiq's (``p99``).
TARGETS: dict[str, tuple[str, float]] = {
    "enqueue": ("ratio", 1.3),
    "bulk_confirm": ("ratio", 5.0),
    "drain": ("ratio", 2.0),
    "latency_0ms": ("p99", 1.0),
    "latency_100ms": ("p99", 1.0),
}


# The subprocess: one library, one measurement -------------------------------------


@dataclass(frozen=True)
class RabbitLibrary:
    """What a timing uses of dq or Dramatiq (typed loosely: they share no classes)."""

    name: str
    #: ``RabbitmqBroker``: called as ``broker(url=..., confirm_delivery=...)``.
    broker: Callable[..., Any]
    set_broker: Callable[[Any], None]
    #: ``actor(queue_name=...)``: returns the decorator.
    actor: Callable[..., Callable[[Callable[..., Any]], Any]]
    worker: Callable[..., Any]
    #: The default ``worker_timeout`` (ms).
    worker_timeout: int


def load(name: str) -> RabbitLibrary:
    """Import one library's RabbitMQ broker (only in the subprocess that times it)."""
    if name == "dq":
        import dq  # noqa: PLC0415
        import dq.worker  # noqa: PLC0415
        from dq.brokers.rabbitmq import RabbitmqBroker as DqRabbitmqBroker  # noqa: PLC0415

        return RabbitLibrary(
            "dq", DqRabbitmqBroker, dq.set_broker, dq.actor, dq.Worker, dq.worker.WORKER_TIMEOUT
        )
    import dramatiq  # noqa: PLC0415
    import dramatiq.worker  # noqa: PLC0415
    from dramatiq.brokers.rabbitmq import (  # noqa: PLC0415
        RabbitmqBroker as DramatiqRabbitmqBroker,
    )

    return RabbitLibrary(
        "dramatiq",
        DramatiqRabbitmqBroker,
        dramatiq.set_broker,
        dramatiq.actor,
        dramatiq.Worker,
        dramatiq.worker.WORKER_TIMEOUT,
    )


def queue_names(queue: str) -> tuple[str, str, str]:
    return (queue, f"{queue}.DQ", f"{queue}.XQ")


class Server:
    """A plain pika connection (no dq, no Dramatiq) to count and delete queues."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            if self.connection.is_open:
                self.connection.close()

    def ready(self, queue: str) -> int:
        """Ready messages on ``queue``; 0 if it does not exist."""
        channel = self.connection.channel()
        try:
            method = channel.queue_declare(queue, passive=True).method
            return int(method.message_count)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:
                return 0
            raise
        finally:
            if channel.is_open:
                channel.close()

    def counts(self, queue: str) -> tuple[int, int, int]:
        """Ready messages on the queue, its ``.DQ`` and its ``.XQ``."""
        q, dq_, xq = (self.ready(name) for name in queue_names(queue))
        return q, dq_, xq

    def delete(self, queue: str) -> list[str]:
        """Delete the queue, its DQ and its XQ; return the names of those that held
        messages."""
        left = [name for name in queue_names(queue) if self.ready(name)]
        channel = self.connection.channel()
        for name in queue_names(queue):
            channel.queue_delete(name)
        channel.close()
        return left


@dataclass
class Context:
    library: RabbitLibrary
    url: str
    server: Server
    queue: str
    confirm: bool
    latency_worker_timeout: int | None
    broker: Any = None

    def new_broker(self) -> Any:
        """Close the current broker (if any) and set a fresh one as the library's global
        broker: actors defined after this use it."""
        if self.broker is not None:
            self.broker.close()
        self.broker = self.library.broker(url=self.url, confirm_delivery=self.confirm)
        self.library.set_broker(self.broker)
        return self.broker

    def wait_queued(self, expected: int) -> None:
        """Wait until the queue holds ``expected`` ready messages and nothing is delayed
        or dead; raise if it holds more, or not in time."""
        deadline = time.monotonic() + ROUTED_TIMEOUT_S
        while True:
            counts = self.server.counts(self.queue)
            if counts == (expected, 0, 0):
                return
            if counts[0] > expected or counts[1:] != (0, 0) or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.library.name}: the queue holds {counts[0]} ready, {counts[1]} "
                    f"delayed, {counts[2]} dead-lettered messages; expected {expected}, 0, 0"
                )
            time.sleep(0.01)

    def check_all_ran(self, ran: int, expected: int) -> None:
        counts = self.server.counts(self.queue)
        if (ran, *counts) != (expected, 0, 0, 0):
            raise RuntimeError(
                f"{self.library.name}: {ran} of {expected} messages ran; the queue holds "
                f"{counts[0]} ready, {counts[1]} delayed, {counts[2]} dead-lettered "
                f"(expected {expected} ran and nothing left)"
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

        @ctx.library.actor(queue_name=ctx.queue)
        def add(x: int, y: int) -> int:
            return x + y

        self.add = add
        self.sent = 0
        warmed = self.warm_up()
        ctx.wait_queued(warmed)
        ctx.broker.flush(ctx.queue)
        ctx.wait_queued(0)

    def warm_up(self) -> int:
        for i in range(WARMUP_SENDS):
            self.add.send(i, 2)
        return WARMUP_SENDS

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
        self.ctx.wait_queued(self.sent)


class Bulk(Enqueue):
    """dq: ``add.send_many([add.message(i, 2) ...])`` (``broker.enqueue_many`` where the
    actor has no ``send_many``); Dramatiq: `Enqueue`'s send loop."""

    def warm_up(self) -> int:
        sent = super().warm_up()
        if self.ctx.library.name == "dq":
            self.send_many([self.add.message(i, 2) for i in range(WARMUP_SENDS)])
            sent += WARMUP_SENDS
        return sent

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
    """N ``noop()`` published untimed, then timed: ``worker.start()`` until the N-th ran.

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

        @ctx.library.actor(queue_name=ctx.queue)
        def noop() -> None:
            if next(self.counter) == self.target:
                self.end = time.perf_counter()
                self.finished.set()

        self.counter = itertools.count(1)
        self.target = n
        self.finished.clear()
        # Untimed: the library's fastest enqueue.
        bulk = getattr(ctx.broker, "enqueue_many", None)
        if bulk is not None:
            bulk([noop.message() for _ in range(n)])
        else:
            for _ in range(n):
                noop.send()
        ctx.wait_queued(n)

        worker = ctx.library.worker(
            ctx.broker, worker_threads=WORKER_THREADS, worker_timeout=DRAIN_WORKER_TIMEOUT_MS
        )
        gc.collect()
        start = time.perf_counter()
        worker.start()
        try:
            if not self.finished.wait(60 + n / 200):
                ran = next(self.counter) - 1
                raise RuntimeError(f"{ctx.library.name}: only {ran} of {n} messages ran in time")
            ctx.broker.join(ctx.queue, timeout=30_000)
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

        @ctx.library.actor(queue_name=ctx.queue)
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
            ctx.broker.join(ctx.queue, timeout=int(START_TIMEOUT_S * 1000))
        finally:
            worker.stop()
        ctx.check_all_ran(len(self.latencies), total)
        return {
            "latencies": self.latencies[LATENCY_WARMUP:],
            "worker_timeout_ms": self.worker_timeout(),
        }


TIMINGS: dict[str, type[Timing]] = {
    "enqueue": Enqueue,
    "enqueue_confirm": Enqueue,
    "bulk_confirm": Bulk,
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
    m = BY_KEY[measure]
    library = load(library_name)
    server = Server(args.url)
    ctx = Context(library, args.url, server, args.queue, m.confirm, args.latency_worker_timeout)
    broker = ctx.new_broker()
    try:
        timing = TIMINGS[measure](ctx, m.gap_ms)
        answer({"ready": True})
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("end"):
                break
            answer(timing.run(int(request["n"])))
        timing.finish()
    finally:
        broker = ctx.broker
        broker.flush(args.queue)
        broker.close()
        left = server.delete(args.queue)
        server.close()
    answer({"middleware": [type(m).__name__ for m in broker.middleware], "left": left})
    return 0


# The parent: processes, runs, statistics, output ------------------------------------


class Child:
    """A subprocess serving one library and measurement (see `child`)."""

    def __init__(self, args: argparse.Namespace, library: str, measure: str) -> None:
        self.library = library
        self.measure = measure
        self.url: str = args.url
        self.queue = f"dqbench_{library}_{measure}_{uuid.uuid4().hex[:12]}"
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            f"{library}:{measure}",
            "--url",
            args.url,
            "--queue",
            self.queue,
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
                f"{self.proc.returncode} (killed after {REQUEST_TIMEOUT_S:.0f} s if -9); the "
                f"end of its stderr:\n" + "\n".join(self.stderr_text().splitlines()[-STDERR_LINES:])
            )
        answer: Figures = json.loads(line)
        return answer

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def end(self) -> Figures:
        """Ask for the final figures, wait for the exit, report stderr, delete the queues
        (again)."""
        final = self.request({"end": True})
        self.proc.wait(REQUEST_TIMEOUT_S)
        final["left_after_exit"] = self.delete_queues()
        for line in self.stderr_text().strip().splitlines()[-20:]:
            harness.note(f"{self.library} {self.measure}: {line}")
        self.stderr.close()
        return final

    def kill(self) -> None:
        """Stop a subprocess that is still running (after an error) and clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Best effort: an unreachable server must not hide the error being raised.
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.delete_queues()
        self.stderr.close()

    def delete_queues(self) -> list[str]:
        server = Server(self.url)
        try:
            return server.delete(self.queue)
        finally:
            server.close()


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
    n: int = getattr(args, m.size)
    try:
        for name in order(k, libraries):
            children[name] = Child(args, name, m.key)
        for child_ in children.values():
            child_.request(None)  # ready
        results: dict[str, Figures] = {name: {"seconds": 0.0} for name in libraries}
        if m.sliced:
            for j, size in enumerate(slice_sizes(n, getattr(args, m.sliced))):
                for name in order(k + j, libraries):
                    answer = children[name].request({"n": size})
                    results[name]["seconds"] += answer["seconds"]
                    results[name]["how"] = answer.get("how", "")
        else:
            for name in order(k, libraries):
                results[name] = children[name].request({"n": args.samples})
        for name in libraries:
            results[name].update(children[name].end())
    finally:
        for child_ in children.values():
            child_.kill()
    for figures in results.values():
        if m.kind == "rate":
            figures["rate"] = n / figures["seconds"]
        else:
            figures["percentiles"] = Percentiles.of(figures["latencies"])
    return results


def run_line(k: int, runs: int, m: Measure, values: dict[str, Figures]) -> str:
    """One run's line for one measurement."""
    head = f"run {k}/{runs} {m.key + ':':<17}"
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
            for when in ("left", "left_after_exit")
            for left in figures[when]
        }
    )
    return {
        "benchmark": "rabbitmq_broker",
        **harness.environment(),
        **server_environment(args.url),
        "n": args.n,
        "confirm_n": args.confirm_n,
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
        "leftovers": leftovers,
        "measures": {m.key: summarize(m, libraries, per_run[m.key]) for m in measures},
    }


def server_environment(url: str) -> Figures:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        # pika keeps the server's properties on the connection implementation only.
        impl = getattr(connection, "_impl", None)
        properties = getattr(impl, "server_properties", None) or {}
        version = properties.get("version", b"?")
    finally:
        connection.close()
    return {
        "rabbitmq_server": version.decode() if isinstance(version, bytes) else str(version),
        "pika": pika.__version__,
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
    if "ratios" not in entry:
        return "dq p99 <= dramatiq p99"
    ok = entry["ratios"]["p99"]["ratio_of_medians"] <= bound
    return f"dq p99 <= dramatiq p99: {'met' if ok else 'NOT met'}"


def cell(summary: Figures, fmt: str) -> str:
    return f"{summary['median']:{fmt}} ({summary['min']:{fmt}} – {summary['max']:{fmt}})"


def format_table(figures: Figures) -> str:
    """Render the figures of `measure_all` as markdown tables."""
    libraries: list[str] = figures["libraries"]
    both = len(libraries) == 2
    lines = [
        "RabbitmqBroker: dq against Dramatiq, one subprocess and queue per library, "
        "measurement and run; default middleware; gc enabled",
        f"rabbitmq {figures['rabbitmq_server']} at {figures['url']}   pika {figures['pika']}   "
        f"cpus={figures['cpus']}",
        harness.versions_line(
            figures,
            f"N={figures['n']:,}, confirmed N={figures['confirm_n']:,} (in alternated slices: "
            f"enqueues {figures['slices']}, drain {figures['drain_slices']})   "
            f"samples={figures['samples']:,}",
        ),
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
        lines += ["", "Throughput, msgs/s: median (min – max) over the runs", ""]
        head = "| measurement | " + " | ".join(libraries) + " |"
        rule = "| --- | " + " | ".join("---:" for _ in libraries) + " |"
        if both:
            head += " dq/dramatiq (per-run min – max) | target |"
            rule += " ---: | --- |"
        lines += [head, rule]
        for key in rate_keys:
            e = measures[key]
            row = f"| {e['label']} | " + " | ".join(cell(e[n], ",.0f") for n in libraries) + " |"
            if both:
                ratio = f"{e['ratio_of_medians']:.2f}x ({harness.ratio_span(e)})"
                row += f" {ratio} | {verdict(key, e)} |"
            lines.append(row)
        if "bulk_confirm" in measures and "dq" in libraries:
            lines += ["", f"(confirmed batch: dq used {measures['bulk_confirm']['how']['dq']})"]
    if lat_keys:
        lines += [
            "",
            "Send-to-start latency, ms: median (min – max) over the runs of each run's "
            "p50 / p99 / max",
            "",
            "| gap | library | p50 | p99 | max (ratio rows: target) |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for key in lat_keys:
            e = measures[key]
            for name in libraries:
                cells = " | ".join(cell(e[name][stat], ".3f") for stat in STATS)
                lines.append(f"| {e['label']} | {name} | {cells} |")
            if both:
                r = e["ratios"]
                lines.append(
                    f"| {e['label']} | dq/dramatiq | {r['p50']['ratio_of_medians']:.3f} "
                    f"({harness.ratio_span(r['p50'])}) | {r['p99']['ratio_of_medians']:.3f} "
                    f"({harness.ratio_span(r['p99'])}) | {verdict(key, e)} |"
                )
    if figures["leftovers"]:
        lines += ["", "queues that still held messages after the broker's flush:"]
        lines += [f"  {line}" for line in figures["leftovers"]]
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
    parser = harness.make_parser(
        __doc__, "--n", 20_000, "messages per unconfirmed enqueue and drain timing", 3
    )
    parser.add_argument(
        "--confirm-n",
        type=harness.positive_int,
        default=5_000,
        help="messages per confirmed enqueue timing (default 5000)",
    )
    parser.add_argument(
        "--slices",
        type=harness.positive_int,
        default=10,
        help="alternated timings the messages of each enqueue are cut into (default 10)",
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
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"AMQP URL (default {DEFAULT_URL.replace('%', '%%')})"
    )
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
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.samples < 2:
        parser.error("--samples must be >= 2 (percentiles need two values)")
    if max(args.slices, args.drain_slices) > min(args.n, args.confirm_n):
        parser.error("--slices and --drain-slices must not exceed --n or --confirm-n")
    return harness.report(
        lambda progress: measure_all(args, progress), format_table, as_json=args.json
    )


if __name__ == "__main__":
    sys.exit(main())
