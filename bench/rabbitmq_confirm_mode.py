"""What publisher-confirm mode costs an idle RabbitMQ queue's latency (dq only).

Why dq's publishing channel is in confirm mode only with ``confirm_delivery`` (as
Dramatiq's): one process, one idle dq ``Worker`` (8 threads), and two publishing
brokers on the same queue, sending one message at a time ``--gap-ms`` apart in
alternating blocks of ``--block`` sends, so both arms meet the same machine noise:

* ``plain``: a broker without ``confirm_delivery`` (the channel is not in confirm mode);
* ``confirm-mode``: the same, with its channel put in confirm mode; it still does not
  wait for the confirms, so the only difference is the server's confirm work.

Prints send-to-start p50/p90/p99/max per arm and run, then medians (min–max) over the
runs and the ratio plain/confirm-mode (of the medians, with the per-run min–max), as
``harness`` computes them for the other benchmarks. Needs RabbitMQ on 127.0.0.1:5672 (or ``--url``).

    bash bench/run.sh rabbitmq-confirm-mode --runs 3 --samples 600
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import pika

import dq
import harness
from dq.brokers.rabbitmq import RabbitmqBroker
from dq.brokers.rabbitmq.publisher import Publisher

ARMS = ("plain", "confirm-mode")


class _ConfirmModeBroker(RabbitmqBroker):
    """Publishes on a channel in confirm mode without waiting for the confirms."""

    def _open_publisher(self) -> Publisher:
        return Publisher(self._connect(), confirming=True)


def one_run(url: str, samples: int, block: int, gap_s: float) -> dict[str, list[float]]:
    queue = f"bench_confirm_mode_{uuid.uuid4().hex[:8]}"
    plain = RabbitmqBroker(url=url)
    confirming = _ConfirmModeBroker(url=url, middleware=[])
    dq.set_broker(plain)
    started = threading.Event()
    latencies: dict[str, list[float]] = {arm: [] for arm in ARMS}
    arm = ["warm-up"]

    @dq.actor(queue_name=queue)
    def probe(t0: float) -> None:
        latencies.setdefault(arm[0], []).append(time.perf_counter() - t0)
        started.set()

    def send(broker: RabbitmqBroker) -> None:
        time.sleep(gap_s)
        started.clear()
        broker.enqueue(probe.message(time.perf_counter()))
        if not started.wait(5):
            raise RuntimeError("a probe had not started 5 s after its send")

    worker = dq.Worker(plain, worker_threads=8, worker_timeout=1000)
    worker.start()
    try:
        for _ in range(20):
            send(plain)
            send(confirming)
        for _ in range(0, samples, block):
            for name, broker in zip(ARMS, (plain, confirming), strict=True):
                arm[0] = name
                for _ in range(block):
                    send(broker)
    finally:
        worker.stop()
        plain.close()
        confirming.close()
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(name)
        connection.close()
    return {name: latencies[name] for name in ARMS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=600, help="sends per arm and run")
    parser.add_argument("--block", type=int, default=20, help="sends per arm in a row")
    parser.add_argument("--gap-ms", type=int, default=100)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {a: {} for a in ARMS}
    for run in range(args.runs):
        result = one_run(args.url, args.samples, args.block, args.gap_ms / 1000)
        for name in ARMS:
            ms = [x * 1000 for x in result[name]]
            # As rabbitmq_bench.py's Percentiles computes them.
            cuts = statistics.quantiles(ms, n=100, method="inclusive")
            row = {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(ms)}
            for key, value in row.items():
                figures[name].setdefault(key, []).append(value)
            shown = "  ".join(f"{k} {v:6.3f}" for k, v in row.items())
            print(f"run {run + 1}/{args.runs} {name:12s} n={len(ms)}  {shown} ms", flush=True)
    print(f"\nsend-to-start ms, median (min – max) of {args.runs} runs, {args.gap_ms} ms gaps")
    for key in ("p50", "p90", "p99", "max"):
        cells = []
        for name in ARMS:
            v = harness.spread(figures[name][key])
            cells.append(f"{name} {v['median']:.3f} ({v['min']:.3f} – {v['max']:.3f})")
        r = harness.ratios(figures["plain"][key], figures["confirm-mode"][key])
        cells.append(
            f"plain/confirm-mode {r['ratio_of_medians']:.2f} "
            f"(per run {r['run_ratio_min']:.2f} – {r['run_ratio_max']:.2f})"
        )
        print(f"{key:4s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
