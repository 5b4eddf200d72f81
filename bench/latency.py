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

import gc
import random
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dramatiq.worker

import dq.worker
import harness
from harness import Figures, Library, Progress

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


def sample(library: Library, samples: int, seed: int) -> list[float]:
    """Measure ``samples`` send-to-start latencies (seconds) with ``library``."""
    broker = library.stub_broker()
    library.set_broker(broker)
    latencies: list[float] = []
    started = threading.Event()

    @library.actor
    def probe(t0: float) -> None:
        latencies.append(time.perf_counter() - t0)
        started.set()

    pauses = random.Random(seed)
    worker = library.worker(broker, worker_threads=WORKER_THREADS)
    worker.start()
    gc.collect()
    time.sleep(IDLE_S)
    for k in range(samples):
        started.clear()
        t0 = time.perf_counter()
        probe.send(t0)
        if not started.wait(START_TIMEOUT_S):
            raise _lost(library.name, k, samples)
        time.sleep(pauses.uniform(*PAUSE_S))

    broker.join("default", timeout=int(START_TIMEOUT_S * 1000))
    worker.stop()
    _check(
        library.name,
        len(latencies),
        samples,
        library.left_on(broker.queues["default"]),
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


def summarize(per_run: Sequence[Percentiles]) -> Figures:
    """Median, min and max over the runs of each statistic, and the per-run values."""
    return {stat: harness.spread([getattr(p, stat) for p in per_run], "runs") for stat in STATS}


def run(samples: int, runs: int, progress: Progress) -> Figures:
    """Measure both libraries ``runs`` times, interleaved; return the figures (ms)."""
    for library in harness.LIBRARIES:
        sample(library, WARMUP, seed=0)

    dq_runs: list[Percentiles] = []
    dramatiq_runs: list[Percentiles] = []
    for k in range(1, runs + 1):
        a = Percentiles.of(sample(harness.DQ, samples, seed=k))
        b = Percentiles.of(sample(harness.DRAMATIQ, samples, seed=k))
        dq_runs.append(a)
        dramatiq_runs.append(b)
        progress(
            f"run {k}/{runs}: dq p50 {a.p50:.3f} p99 {a.p99:.3f} max {a.max:.3f} ms   "
            f"dramatiq p50 {b.p50:.3f} p99 {b.p99:.3f} max {b.max:.3f} ms   "
            f"dq/dramatiq p50 {a.p50 / b.p50:.3f} p99 {a.p99 / b.p99:.3f}"
        )
    gc.collect()

    return {
        "benchmark": "stub_broker_send_to_start_latency",
        "unit": "ms",
        **harness.environment(),
        "samples": samples,
        "runs": runs,
        "worker_threads": WORKER_THREADS,
        "dq_worker_timeout_ms": dq.worker.WORKER_TIMEOUT,
        "dramatiq_worker_timeout_ms": dramatiq.worker.WORKER_TIMEOUT,
        **harness.default_middleware(),
        "dq": summarize(dq_runs),
        "dramatiq": summarize(dramatiq_runs),
        "ratios": {
            stat: harness.ratios(
                [getattr(a, stat) for a in dq_runs], [getattr(b, stat) for b in dramatiq_runs]
            )
            for stat in ("p50", "p99")
        },
    }


def format_table(figures: Figures) -> str:
    """Render the figures of `run` as a plain-text table."""
    lo, hi = (round(s * 1000) for s in PAUSE_S)
    lines = [
        "StubBroker send-to-start latency on an idle worker: time.perf_counter() from just",
        "before probe.send(t0) to the start of the actor; one message at a time, "
        f"{lo}-{hi} ms pauses; gc enabled",
        f"Worker: {figures['worker_threads']} threads, default worker_timeout "
        f"(dq {figures['dq_worker_timeout_ms']} ms, "
        f"dramatiq {figures['dramatiq_worker_timeout_ms']} ms), default middleware, in process",
        harness.versions_line(figures, f"samples={figures['samples']:,} per run"),
        *harness.middleware_lines(figures),
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
            f"per-run ratios {harness.ratio_span(r)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = harness.make_parser(
        __doc__, "--samples", 200, "messages (latencies) per library and run", runs_default=3
    )
    args = parser.parse_args(argv)
    samples: int = args.samples
    runs: int = args.runs

    if samples < 2:
        parser.error("--samples must be >= 2 (percentiles need two values)")
    if samples < MIN_REPRESENTATIVE_SAMPLES:
        harness.note(
            f"{samples} samples is below {MIN_REPRESENTATIVE_SAMPLES}; p99 is not representative"
        )
    return harness.report(
        lambda progress: run(samples, runs, progress), format_table, as_json=args.json
    )


if __name__ == "__main__":
    sys.exit(main())
