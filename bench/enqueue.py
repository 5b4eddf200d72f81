"""StubBroker enqueue throughput: dq against Dramatiq 2.2.1, side by side in one process.

Each run times ``for i in range(n): add.send(i, 2)`` once with dq and then once with
Dramatiq (dq, dramatiq, dq, dramatiq, ...), so machine drift hits both libraries alike.
Every timing gets a fresh ``StubBroker()`` with its library's default middleware, set
as that library's global broker before the ``add(x, y)`` actor (queue ``default``) is
defined. Only the send loop is timed, with `time.perf_counter`; the garbage collector
stays enabled while it runs (as users have it), but is run by hand between timings so
that no run pays for the previous one's garbage. Brokers are flushed and dropped after
each timing.

Run it through ``bash bench/run.sh`` (which provides Dramatiq); ``--help`` lists options.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Sequence

import harness
from harness import Figures, Library, Progress

#: Untimed sends per library before the first run (imports, caches, first-call paths).
WARMUP = 1_000
MIN_REPRESENTATIVE_N = 100_000


def time_sends(library: Library, n: int) -> float:
    """Send ``n`` messages through a fresh StubBroker of ``library``; return the loop's
    seconds."""
    broker = library.stub_broker()
    library.set_broker(broker)

    @library.actor
    def add(x: int, y: int) -> int:
        return x + y

    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        add.send(i, 2)
    elapsed = time.perf_counter() - start

    queued = broker.queues["default"].qsize()
    if queued != n:
        raise RuntimeError(f"{library.name}: {queued} messages queued, expected {n}")
    broker.flush_all()
    broker.close()
    return elapsed


def run(n: int, runs: int, progress: Progress) -> Figures:
    """Time both libraries ``runs`` times, interleaved; return the figures."""
    for library in harness.LIBRARIES:
        time_sends(library, WARMUP)

    dq_rates: list[float] = []
    dramatiq_rates: list[float] = []
    for k in range(1, runs + 1):
        dq_rate = n / time_sends(harness.DQ, n)
        dramatiq_rate = n / time_sends(harness.DRAMATIQ, n)
        dq_rates.append(dq_rate)
        dramatiq_rates.append(dramatiq_rate)
        progress(harness.rates_line(f"run {k}/{runs}:", dq_rate, dramatiq_rate, 10))
    gc.collect()

    return {
        "benchmark": "stub_broker_enqueue",
        **harness.environment(),
        "n": n,
        "runs": runs,
        **harness.default_middleware(),
        **harness.compare(dq_rates, dramatiq_rates),
    }


def format_table(figures: Figures) -> str:
    """Render the figures of `run` as a plain-text table."""
    lines = [
        "StubBroker enqueue throughput: N x add.send(i, 2), default middleware, gc enabled",
        harness.versions_line(figures, f"N={figures['n']:,}"),
        *harness.middleware_lines(figures, one_line=True),
        "",
        harness.rates_header(25),
    ]
    lines += [harness.rates_row(name, figures[name], 25) for name in ("dq", "dramatiq")]
    lines += [
        "",
        f"dq/dramatiq, ratio of medians: {figures['ratio_of_medians']:.3f}",
        f"dq/dramatiq, per-run ratios:   {harness.ratio_span(figures)}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return harness.throughput_main(
        __doc__,
        argv,
        default_n=100_000,
        default_runs=5,
        representative_n=MIN_REPRESENTATIVE_N,
        run=run,
        format_table=format_table,
    )


if __name__ == "__main__":
    sys.exit(main())
