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

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker as DramatiqStubBroker

import dq
from dq.brokers.stub import StubBroker as DqStubBroker

#: Untimed sends per library before the first run (imports, caches, first-call paths).
WARMUP = 1_000
MIN_REPRESENTATIVE_N = 100_000


def time_dq(n: int) -> float:
    """Send ``n`` messages through a fresh dq StubBroker; return the loop's seconds."""
    broker = DqStubBroker()
    dq.set_broker(broker)

    @dq.actor
    def add(x: int, y: int) -> int:
        return x + y

    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        add.send(i, 2)
    elapsed = time.perf_counter() - start

    queued = broker.queues["default"].qsize()
    if queued != n:
        raise RuntimeError(f"dq: {queued} messages queued, expected {n}")
    broker.flush_all()
    broker.close()
    return elapsed


def time_dramatiq(n: int) -> float:
    """Send ``n`` messages through a fresh Dramatiq StubBroker; return the loop's seconds."""
    broker = DramatiqStubBroker()
    dramatiq.set_broker(broker)

    @dramatiq.actor
    def add(x: int, y: int) -> int:
        return x + y

    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        add.send(i, 2)
    elapsed = time.perf_counter() - start

    queued = broker.queues["default"].qsize()
    if queued != n:
        raise RuntimeError(f"dramatiq: {queued} messages queued, expected {n}")
    broker.flush_all()
    broker.close()
    return elapsed


@dataclass(frozen=True)
class Summary:
    """Rates (messages per second) of one library over all runs."""

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
    """Time both libraries ``runs`` times, interleaved; return the figures."""
    time_dq(WARMUP)
    time_dramatiq(WARMUP)

    dq_rates: list[float] = []
    dramatiq_rates: list[float] = []
    for k in range(1, runs + 1):
        dq_rate = n / time_dq(n)
        dramatiq_rate = n / time_dramatiq(n)
        dq_rates.append(dq_rate)
        dramatiq_rates.append(dramatiq_rate)
        progress(
            f"run {k}/{runs}: dq {dq_rate:>10,.0f} msgs/s   dramatiq {dramatiq_rate:>10,.0f} "
            f"msgs/s   dq/dramatiq {dq_rate / dramatiq_rate:.3f}"
        )
    gc.collect()

    # What "default middleware" means for each library (StubBroker() with no arguments).
    dq_middleware = [type(m).__name__ for m in DqStubBroker().middleware]
    dramatiq_middleware = [type(m).__name__ for m in DramatiqStubBroker().middleware]

    dq_summary = Summary(tuple(dq_rates))
    dramatiq_summary = Summary(tuple(dramatiq_rates))
    run_ratios = [a / b for a, b in zip(dq_rates, dramatiq_rates, strict=True)]
    return {
        "benchmark": "stub_broker_enqueue",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "dq_version": dq.__version__,
        "dramatiq_version": dramatiq.__version__,
        "n": n,
        "runs": runs,
        "dq_middleware": dq_middleware,
        "dramatiq_middleware": dramatiq_middleware,
        "dq": dq_summary.as_dict(),
        "dramatiq": dramatiq_summary.as_dict(),
        "ratio_of_medians": dq_summary.median / dramatiq_summary.median,
        "run_ratios": run_ratios,
        "run_ratio_min": min(run_ratios),
        "run_ratio_max": max(run_ratios),
    }


def format_table(figures: dict[str, Any]) -> str:
    """Render the figures of `run` as a plain-text table."""
    lines = [
        "StubBroker enqueue throughput: N x add.send(i, 2), default middleware, gc enabled",
        f"python {figures['python']}   dq {figures['dq_version']}   "
        f"dramatiq {figures['dramatiq_version']}   N={figures['n']:,}   runs={figures['runs']}",
        f"default middleware: dq [{', '.join(figures['dq_middleware'])}]   "
        f"dramatiq [{', '.join(figures['dramatiq_middleware'])}]",
        "",
        f"{'library':<10} {'median msgs/s':>14}   {'min – max msgs/s':>25}",
    ]
    for name in ("dq", "dramatiq"):
        s = figures[name]
        span = f"{s['min']:,.0f} – {s['max']:,.0f}"
        lines.append(f"{name:<10} {s['median']:>14,.0f}   {span:>25}")
    lines += [
        "",
        f"dq/dramatiq, ratio of medians: {figures['ratio_of_medians']:.3f}",
        f"dq/dramatiq, per-run ratios:   {figures['run_ratio_min']:.3f} – "
        f"{figures['run_ratio_max']:.3f}",
    ]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--n", type=positive_int, default=100_000, help="messages per timing (default 100000)"
    )
    parser.add_argument("--runs", type=positive_int, default=5, help="interleaved runs (default 5)")
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
