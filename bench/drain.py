"""StubBroker drain throughput: dq against Dramatiq 2.2.1, side by side in one process.

Each timing enqueues N no-op messages (actor ``noop()`` on queue ``default``) on a fresh
``StubBroker``, untimed, then times an in-process ``Worker`` (8 threads,
``worker_timeout=100``) from ``worker.start()`` until ``broker.join("default")`` returns.
Two configurations: the broker's default middleware (``StubBroker()``) and none
(``StubBroker(middleware=[])``). Each run times, per configuration, dq and then Dramatiq,
so machine drift hits both libraries alike. The broker is set as the library's global
broker before the actor is defined. The worker is stopped after the timer (untimed),
and the benchmark checks that nothing is left on the queue and nothing was
dead-lettered. The garbage collector stays enabled, but is run by hand before each
timing. Before the first run, every library and configuration drains a small batch of
recording messages untimed (warm-up), checking that each message ran exactly once.

Run it through ``bash bench/run.sh drain`` (which provides Dramatiq); ``--help`` lists
options.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
import dramatiq.errors
from dramatiq.brokers.stub import StubBroker as DramatiqStubBroker

import dq
import dq.errors
from dq.brokers.stub import StubBroker as DqStubBroker

#: Messages per library and configuration drained untimed before the first run.
WARMUP = 2_000
MIN_REPRESENTATIVE_N = 50_000
WORKER_THREADS = 8
#: ms, for both libraries: how long consumers wait for a message (or a free prefetch slot)
#: and worker threads for work before polling again. The default is 1000 ms; 100 ms is
#: what Dramatiq's own ``stub_worker`` test fixture uses.
WORKER_TIMEOUT_MS = 100
#: Configurations: (key, label, whether StubBroker() keeps its default middleware).
CONFIGS = (("default", "default middleware", True), ("none", "no middleware", False))


def join_timeout_ms(n: int) -> int:
    """How long ``join`` may take before the benchmark calls it a hang (1 ms/message + 60 s)."""
    return 60_000 + n


def _stuck(
    library: str, n: int, queued: int, dead: int, threads: Sequence[threading.Thread]
) -> RuntimeError:
    alive = sum(t.is_alive() for t in threads)
    return RuntimeError(
        f"{library}: broker.join('default') did not return within {join_timeout_ms(n):,} ms "
        f"draining {n:,} messages: {queued} still queued, {dead} dead-lettered, "
        f"{alive}/{len(threads)} worker and consumer threads alive"
    )


def _check_drained(library: str, queued: int, delayed: int, dead: int) -> None:
    if queued or delayed or dead:
        raise RuntimeError(
            f"{library}: after the drain {queued} messages are still queued, {delayed} "
            f"delayed and {dead} dead-lettered (expected none)"
        )


def drain_dq(n: int, *, default_middleware: bool, record: list[int] | None = None) -> float:
    """Drain ``n`` messages with a dq Worker on a fresh StubBroker; return the seconds.

    With ``record``, the actor appends its argument to it instead of doing nothing.
    """
    broker = DqStubBroker() if default_middleware else DqStubBroker(middleware=[])
    dq.set_broker(broker)

    @dq.actor
    def noop() -> None:
        pass

    @dq.actor
    def recorder(i: int) -> None:
        assert record is not None
        record.append(i)

    if record is None:
        for _ in range(n):
            noop.send()
    else:
        for i in range(n):
            recorder.send(i)
    queued = broker.queues["default"].qsize()
    if queued != n:
        raise RuntimeError(f"dq: {queued} messages queued, expected {n}")

    worker = dq.Worker(broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_TIMEOUT_MS)
    gc.collect()
    start = time.perf_counter()
    worker.start()
    try:
        broker.join("default", timeout=join_timeout_ms(n))
    except dq.errors.QueueJoinTimeout:
        threads = [*worker.workers, *worker.consumers.values()]
        raise _stuck(
            "dq", n, broker.queues["default"].qsize(), len(broker.dead_letters), threads
        ) from None
    elapsed = time.perf_counter() - start

    worker.stop()
    _check_drained(
        "dq",
        broker.queues["default"].qsize(),
        broker.queues["default.DQ"].qsize(),
        len(broker.dead_letters),
    )
    broker.flush_all()
    broker.close()
    return elapsed


def drain_dramatiq(n: int, *, default_middleware: bool, record: list[int] | None = None) -> float:
    """Drain ``n`` messages with a Dramatiq Worker on a fresh StubBroker; return the seconds.

    With ``record``, the actor appends its argument to it instead of doing nothing.
    """
    broker = DramatiqStubBroker() if default_middleware else DramatiqStubBroker(middleware=[])
    dramatiq.set_broker(broker)

    @dramatiq.actor
    def noop() -> None:
        pass

    @dramatiq.actor
    def recorder(i: int) -> None:
        assert record is not None
        record.append(i)

    if record is None:
        for _ in range(n):
            noop.send()
    else:
        for i in range(n):
            recorder.send(i)
    queued = broker.queues["default"].qsize()
    if queued != n:
        raise RuntimeError(f"dramatiq: {queued} messages queued, expected {n}")

    worker = dramatiq.Worker(
        broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_TIMEOUT_MS
    )
    gc.collect()
    start = time.perf_counter()
    worker.start()
    try:
        broker.join("default", timeout=join_timeout_ms(n))
    except dramatiq.errors.QueueJoinTimeout:
        threads: list[threading.Thread] = [*worker.workers, *worker.consumers.values()]
        raise _stuck(
            "dramatiq", n, broker.queues["default"].qsize(), len(broker.dead_letters), threads
        ) from None
    elapsed = time.perf_counter() - start

    worker.stop()
    _check_drained(
        "dramatiq",
        broker.queues["default"].unfinished_tasks,
        broker.queues["default.DQ"].unfinished_tasks,
        len(broker.dead_letters),
    )
    broker.flush_all()
    broker.close()
    return elapsed


def warm_up() -> None:
    """Drain ``WARMUP`` recording messages per library and configuration, untimed, and
    check that every message ran exactly once."""
    for _, label, default_middleware in CONFIGS:
        for library, drain in (("dq", drain_dq), ("dramatiq", drain_dramatiq)):
            record: list[int] = []
            drain(WARMUP, default_middleware=default_middleware, record=record)
            if sorted(record) != list(range(WARMUP)):
                missing = WARMUP - len(set(record))
                extra = len(record) - len(set(record))
                raise RuntimeError(
                    f"{library}, {label}: of {WARMUP:,} messages, {missing} never ran and "
                    f"{extra} ran more than once"
                )


@dataclass(frozen=True)
class Summary:
    """Rates (messages per second) of one library in one configuration over all runs."""

    rates: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": min(self.rates),
            "max": max(self.rates),
            "rates": list(self.rates),
        }


def run(n: int, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Time both libraries in both configurations ``runs`` times, interleaved."""
    warm_up()

    rates: dict[str, dict[str, list[float]]] = {
        key: {"dq": [], "dramatiq": []} for key, _, _ in CONFIGS
    }
    for k in range(1, runs + 1):
        for key, label, default_middleware in CONFIGS:
            dq_rate = n / drain_dq(n, default_middleware=default_middleware)
            dramatiq_rate = n / drain_dramatiq(n, default_middleware=default_middleware)
            rates[key]["dq"].append(dq_rate)
            rates[key]["dramatiq"].append(dramatiq_rate)
            progress(
                f"run {k}/{runs}, {label + ':':<19} dq {dq_rate:>9,.0f} msgs/s   "
                f"dramatiq {dramatiq_rate:>9,.0f} msgs/s   "
                f"dq/dramatiq {dq_rate / dramatiq_rate:.3f}"
            )
    gc.collect()

    # What "default middleware" means for each library (StubBroker() with no arguments).
    dq_middleware = [type(m).__name__ for m in DqStubBroker().middleware]
    dramatiq_middleware = [type(m).__name__ for m in DramatiqStubBroker().middleware]

    configs: dict[str, Any] = {}
    for key, label, _ in CONFIGS:
        dq_summary = Summary(tuple(rates[key]["dq"]))
        dramatiq_summary = Summary(tuple(rates[key]["dramatiq"]))
        run_ratios = [a / b for a, b in zip(dq_summary.rates, dramatiq_summary.rates, strict=True)]
        configs[key] = {
            "label": label,
            "dq": dq_summary.as_dict(),
            "dramatiq": dramatiq_summary.as_dict(),
            "ratio_of_medians": dq_summary.median / dramatiq_summary.median,
            "run_ratios": run_ratios,
            "run_ratio_min": min(run_ratios),
            "run_ratio_max": max(run_ratios),
        }
    return {
        "benchmark": "stub_broker_drain",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "dq_version": dq.__version__,
        "dramatiq_version": dramatiq.__version__,
        "n": n,
        "runs": runs,
        "worker_threads": WORKER_THREADS,
        "worker_timeout_ms": WORKER_TIMEOUT_MS,
        "dq_middleware": dq_middleware,
        "dramatiq_middleware": dramatiq_middleware,
        "configs": configs,
    }


def format_table(figures: dict[str, Any]) -> str:
    """Render the figures of `run` as a plain-text table."""
    lines = [
        "StubBroker drain throughput: N no-op messages (noop() on 'default') enqueued untimed,",
        'then timed from worker.start() until broker.join("default") returns; gc enabled',
        f"Worker: {figures['worker_threads']} threads, "
        f"worker_timeout={figures['worker_timeout_ms']} ms (both libraries), in process",
        f"python {figures['python']}   dq {figures['dq_version']}   "
        f"dramatiq {figures['dramatiq_version']}   N={figures['n']:,}   runs={figures['runs']}",
        f"default middleware: dq [{', '.join(figures['dq_middleware'])}]",
        f"                    dramatiq [{', '.join(figures['dramatiq_middleware'])}]",
        "",
        f"{'configuration':<20} {'library':<10} {'median msgs/s':>14}   {'min – max msgs/s':>23}",
    ]
    for config in figures["configs"].values():
        for i, name in enumerate(("dq", "dramatiq")):
            s = config[name]
            span = f"{s['min']:,.0f} – {s['max']:,.0f}"
            label = config["label"] if i == 0 else ""
            lines.append(f"{label:<20} {name:<10} {s['median']:>14,.0f}   {span:>23}")
    lines += [
        "",
        f"{'dq/dramatiq':<20} {'ratio of medians':>16}   {'per-run ratios':>15}",
    ]
    for config in figures["configs"].values():
        span = f"{config['run_ratio_min']:.3f} – {config['run_ratio_max']:.3f}"
        lines.append(f"{config['label']:<20} {config['ratio_of_medians']:>16.3f}   {span:>15}")
    lines.append("(> 1 means dq drains faster)")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--n", type=positive_int, default=50_000, help="messages per timing (default 50000)"
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="interleaved runs (default 3)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    args = parser.parse_args(argv)
    n: int = args.n
    runs: int = args.runs

    if n < MIN_REPRESENTATIVE_N:
        print(
            f"note: N={n:,} is below {MIN_REPRESENTATIVE_N:,}; figures are not representative",
            file=sys.stderr,
        )

    def progress(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    figures = run(n, runs, progress)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print()
        print(format_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
