"""Send-to-start latency on an idle worker: dq against Dramatiq 2.2.1, in one process.

Each timing starts an in-process ``Worker`` (8 threads, default ``worker_timeout``) on a
fresh ``StubBroker()`` with its library's default middleware, set as the library's
global broker before the ``probe(t0)`` actor (queue ``default``) is defined, and waits
0.5 s so that the worker is idle. Then, K times: ``t0 = time.perf_counter()`` right
before ``probe.send(t0)``; the actor records ``time.perf_counter() - t0`` as soon as it
starts and sets a `threading.Event`; the benchmark waits for that event, then sleeps a
random 5-20 ms so the worker is idle again before the next send. Each run measures dq and
then Dramatiq, with the same sequence of pauses, so machine drift hits both alike.
After the samples the benchmark joins the queue, stops the worker and checks that every
message ran once, nothing is left and nothing was dead-lettered. The garbage collector
stays enabled, but is run by hand before each timing.

Run it through ``bash bench/run.sh latency`` (which provides Dramatiq); ``--help`` lists
options.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
import dramatiq.worker
from dramatiq.brokers.stub import StubBroker as DramatiqStubBroker

import dq
import dq.worker
from dq.brokers.stub import StubBroker as DqStubBroker

WORKER_THREADS = 8
#: Seconds the worker is left alone after starting, before the first send.
IDLE_S = 0.5
#: Seconds between one message's start and the next send: uniform in this range.
PAUSE_S = (0.005, 0.020)
#: Seconds to wait for one message to start before calling it lost.
START_TIMEOUT_S = 10.0
#: Untimed samples per library before the first run.
WARMUP = 20
MIN_REPRESENTATIVE_SAMPLES = 100


def _lost(library: str, k: int, samples: int) -> RuntimeError:
    return RuntimeError(
        f"{library}: message {k + 1}/{samples} had not started {START_TIMEOUT_S:.0f} s "
        "after its send on an idle worker"
    )


def _check(library: str, ran: int, samples: int, queued: int, dead: int) -> None:
    if ran != samples or queued or dead:
        raise RuntimeError(
            f"{library}: {ran} of {samples} messages ran, {queued} are still queued and "
            f"{dead} were dead-lettered (expected {samples}, 0, 0)"
        )


def sample_dq(samples: int, seed: int) -> list[float]:
    """Measure ``samples`` send-to-start latencies (seconds) with dq."""
    broker = DqStubBroker()
    dq.set_broker(broker)
    latencies: list[float] = []
    started = threading.Event()

    @dq.actor
    def probe(t0: float) -> None:
        latencies.append(time.perf_counter() - t0)
        started.set()

    pauses = random.Random(seed)
    worker = dq.Worker(broker, worker_threads=WORKER_THREADS)
    worker.start()
    gc.collect()
    time.sleep(IDLE_S)
    for k in range(samples):
        started.clear()
        t0 = time.perf_counter()
        probe.send(t0)
        if not started.wait(START_TIMEOUT_S):
            raise _lost("dq", k, samples)
        time.sleep(pauses.uniform(*PAUSE_S))

    broker.join("default", timeout=int(START_TIMEOUT_S * 1000))
    worker.stop()
    _check(
        "dq", len(latencies), samples, broker.queues["default"].qsize(), len(broker.dead_letters)
    )
    broker.flush_all()
    broker.close()
    return latencies


def sample_dramatiq(samples: int, seed: int) -> list[float]:
    """Measure ``samples`` send-to-start latencies (seconds) with Dramatiq."""
    broker = DramatiqStubBroker()
    dramatiq.set_broker(broker)
    latencies: list[float] = []
    started = threading.Event()

    @dramatiq.actor
    def probe(t0: float) -> None:
        latencies.append(time.perf_counter() - t0)
        started.set()

    pauses = random.Random(seed)
    worker = dramatiq.Worker(broker, worker_threads=WORKER_THREADS)
    worker.start()
    gc.collect()
    time.sleep(IDLE_S)
    for k in range(samples):
        started.clear()
        t0 = time.perf_counter()
        probe.send(t0)
        if not started.wait(START_TIMEOUT_S):
            raise _lost("dramatiq", k, samples)
        time.sleep(pauses.uniform(*PAUSE_S))

    broker.join("default", timeout=int(START_TIMEOUT_S * 1000))
    worker.stop()
    _check(
        "dramatiq",
        len(latencies),
        samples,
        broker.queues["default"].unfinished_tasks,
        len(broker.dead_letters),
    )
    broker.flush_all()
    broker.close()
    return latencies


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


def summarize(per_run: Sequence[Percentiles]) -> dict[str, Any]:
    """Median, min and max over the runs of each statistic, and the per-run values."""
    out: dict[str, Any] = {}
    for stat in STATS:
        values = [getattr(p, stat) for p in per_run]
        out[stat] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": values,
        }
    return out


def run(samples: int, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure both libraries ``runs`` times, interleaved; return the figures (ms)."""
    sample_dq(WARMUP, seed=0)
    sample_dramatiq(WARMUP, seed=0)

    dq_runs: list[Percentiles] = []
    dramatiq_runs: list[Percentiles] = []
    for k in range(1, runs + 1):
        a = Percentiles.of(sample_dq(samples, seed=k))
        b = Percentiles.of(sample_dramatiq(samples, seed=k))
        dq_runs.append(a)
        dramatiq_runs.append(b)
        progress(
            f"run {k}/{runs}: dq p50 {a.p50:.3f} p99 {a.p99:.3f} max {a.max:.3f} ms   "
            f"dramatiq p50 {b.p50:.3f} p99 {b.p99:.3f} max {b.max:.3f} ms   "
            f"dq/dramatiq p50 {a.p50 / b.p50:.3f} p99 {a.p99 / b.p99:.3f}"
        )
    gc.collect()

    dq_summary = summarize(dq_runs)
    dramatiq_summary = summarize(dramatiq_runs)
    ratios: dict[str, Any] = {}
    for stat in ("p50", "p99"):
        run_ratios = [
            getattr(a, stat) / getattr(b, stat) for a, b in zip(dq_runs, dramatiq_runs, strict=True)
        ]
        ratios[stat] = {
            "ratio_of_medians": dq_summary[stat]["median"] / dramatiq_summary[stat]["median"],
            "run_ratios": run_ratios,
            "run_ratio_min": min(run_ratios),
            "run_ratio_max": max(run_ratios),
        }
    return {
        "benchmark": "stub_broker_send_to_start_latency",
        "unit": "ms",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "dq_version": dq.__version__,
        "dramatiq_version": dramatiq.__version__,
        "samples": samples,
        "runs": runs,
        "worker_threads": WORKER_THREADS,
        "dq_worker_timeout_ms": dq.worker.WORKER_TIMEOUT,
        "dramatiq_worker_timeout_ms": dramatiq.worker.WORKER_TIMEOUT,
        "dq_middleware": [type(m).__name__ for m in DqStubBroker().middleware],
        "dramatiq_middleware": [type(m).__name__ for m in DramatiqStubBroker().middleware],
        "dq": dq_summary,
        "dramatiq": dramatiq_summary,
        "ratios": ratios,
    }


def format_table(figures: dict[str, Any]) -> str:
    """Render the figures of `run` as a plain-text table."""
    lo, hi = (round(s * 1000) for s in PAUSE_S)
    lines = [
        "StubBroker send-to-start latency on an idle worker: time.perf_counter() from just",
        "before probe.send(t0) to the start of the actor; one message at a time, "
        f"{lo}-{hi} ms pauses; gc enabled",
        f"Worker: {figures['worker_threads']} threads, default worker_timeout "
        f"(dq {figures['dq_worker_timeout_ms']} ms, "
        f"dramatiq {figures['dramatiq_worker_timeout_ms']} ms), default middleware, in process",
        f"python {figures['python']}   dq {figures['dq_version']}   "
        f"dramatiq {figures['dramatiq_version']}   samples={figures['samples']:,} per run   "
        f"runs={figures['runs']}",
        f"default middleware: dq [{', '.join(figures['dq_middleware'])}]",
        f"                    dramatiq [{', '.join(figures['dramatiq_middleware'])}]",
        "",
        "medians over the runs, (min – max), in ms:",
        f"{'library':<10} {'p50':>22}   {'p99':>22}   {'max':>24}",
    ]
    for name in ("dq", "dramatiq"):
        s = figures[name]
        cells = [
            f"{s[stat]['median']:.3f} ({s[stat]['min']:.3f} – {s[stat]['max']:.3f})"
            for stat in STATS
        ]
        lines.append(f"{name:<10} {cells[0]:>22}   {cells[1]:>22}   {cells[2]:>24}")
    lines += ["", "dq/dramatiq (lower is better for dq: < 1 means dq starts messages sooner)"]
    for stat in ("p50", "p99"):
        r = figures["ratios"][stat]
        lines.append(
            f"{stat}: ratio of medians {r['ratio_of_medians']:.3f}   "
            f"per-run ratios {r['run_ratio_min']:.3f} – {r['run_ratio_max']:.3f}"
        )
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=200,
        help="messages (latencies) per library and run (default 200)",
    )
    parser.add_argument("--runs", type=positive_int, default=3, help="interleaved runs (default 3)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    args = parser.parse_args(argv)
    samples: int = args.samples
    runs: int = args.runs

    if samples < 2:
        parser.error("--samples must be >= 2 (percentiles need two values)")
    if samples < MIN_REPRESENTATIVE_SAMPLES:
        print(
            f"note: {samples} samples is below {MIN_REPRESENTATIVE_SAMPLES}; p99 is not "
            "representative",
            file=sys.stderr,
        )

    def progress(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    figures = run(samples, runs, progress)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print()
        print(format_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
