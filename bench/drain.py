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

import gc
import sys
import threading
import time
from collections.abc import Sequence

import harness
from harness import Figures, Library, Progress

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


def drain(
    library: Library, n: int, *, default_middleware: bool, record: list[int] | None = None
) -> float:
    """Drain ``n`` messages with a Worker of ``library`` on a fresh StubBroker; return the
    seconds.

    With ``record``, the actor appends its argument to it instead of doing nothing.
    """
    broker = library.stub_broker() if default_middleware else library.stub_broker(middleware=[])
    library.set_broker(broker)

    @library.actor
    def noop() -> None:
        pass

    @library.actor
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
        raise RuntimeError(f"{library.name}: {queued} messages queued, expected {n}")

    worker = library.worker(broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_TIMEOUT_MS)
    gc.collect()
    start = time.perf_counter()
    worker.start()
    try:
        broker.join("default", timeout=join_timeout_ms(n))
    except library.join_timeout:
        threads: list[threading.Thread] = [*worker.workers, *worker.consumers.values()]
        raise _stuck(
            library.name, n, broker.queues["default"].qsize(), len(broker.dead_letters), threads
        ) from None
    elapsed = time.perf_counter() - start

    worker.stop()
    _check_drained(
        library.name,
        library.left_on(broker.queues["default"]),
        library.left_on(broker.queues["default.DQ"]),
        len(broker.dead_letters),
    )
    broker.flush_all()
    broker.close()
    return elapsed


def warm_up() -> None:
    """Drain ``WARMUP`` recording messages per library and configuration, untimed, and
    check that every message ran exactly once."""
    for _, label, default_middleware in CONFIGS:
        for library in harness.LIBRARIES:
            record: list[int] = []
            drain(library, WARMUP, default_middleware=default_middleware, record=record)
            if sorted(record) != list(range(WARMUP)):
                missing = WARMUP - len(set(record))
                extra = len(record) - len(set(record))
                raise RuntimeError(
                    f"{library.name}, {label}: of {WARMUP:,} messages, {missing} never ran "
                    f"and {extra} ran more than once"
                )


def run(n: int, runs: int, progress: Progress) -> Figures:
    """Time both libraries in both configurations ``runs`` times, interleaved."""
    warm_up()

    rates: dict[str, dict[str, list[float]]] = {
        key: {"dq": [], "dramatiq": []} for key, _, _ in CONFIGS
    }
    for k in range(1, runs + 1):
        for key, label, default_middleware in CONFIGS:
            dq_rate = n / drain(harness.DQ, n, default_middleware=default_middleware)
            dramatiq_rate = n / drain(harness.DRAMATIQ, n, default_middleware=default_middleware)
            rates[key]["dq"].append(dq_rate)
            rates[key]["dramatiq"].append(dramatiq_rate)
            prefix = f"run {k}/{runs}, {label + ':':<19}"
            progress(harness.rates_line(prefix, dq_rate, dramatiq_rate, 9))
    gc.collect()

    return {
        "benchmark": "stub_broker_drain",
        **harness.environment(),
        "n": n,
        "runs": runs,
        "worker_threads": WORKER_THREADS,
        "worker_timeout_ms": WORKER_TIMEOUT_MS,
        **harness.default_middleware(),
        "configs": {
            key: {"label": label, **harness.compare(rates[key]["dq"], rates[key]["dramatiq"])}
            for key, label, _ in CONFIGS
        },
    }


def format_table(figures: Figures) -> str:
    """Render the figures of `run` as a plain-text table."""
    lines = [
        "StubBroker drain throughput: N no-op messages (noop() on 'default') enqueued untimed,",
        'then timed from worker.start() until broker.join("default") returns; gc enabled',
        f"Worker: {figures['worker_threads']} threads, "
        f"worker_timeout={figures['worker_timeout_ms']} ms (both libraries), in process",
        harness.versions_line(figures, f"N={figures['n']:,}"),
        *harness.middleware_lines(figures),
        "",
        f"{'configuration':<20} {harness.rates_header(23)}",
    ]
    for config in figures["configs"].values():
        for i, name in enumerate(("dq", "dramatiq")):
            label = config["label"] if i == 0 else ""
            lines.append(f"{label:<20} {harness.rates_row(name, config[name], 23)}")
    lines += [
        "",
        f"{'dq/dramatiq':<20} {'ratio of medians':>16}   {'per-run ratios':>15}",
    ]
    for config in figures["configs"].values():
        span = harness.ratio_span(config)
        lines.append(f"{config['label']:<20} {config['ratio_of_medians']:>16.3f}   {span:>15}")
    lines.append("(> 1 means dq drains faster)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return harness.throughput_main(
        __doc__,
        argv,
        default_n=50_000,
        default_runs=3,
        representative_n=MIN_REPRESENTATIVE_N,
        run=run,
        format_table=format_table,
    )


if __name__ == "__main__":
    sys.exit(main())
