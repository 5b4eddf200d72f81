"""Drain through the command line on Redis: ``dq`` against ``dramatiq``, one run.

For each library and run: N no-op messages are stored on a fresh namespace, then the
library's CLI (``python -m dq app -p 2 -t 8`` / ``python -m dramatiq app -p 2 -t 8``)
is started on an app module that declares the actor on a ``RedisBroker`` with default
middleware. The benchmark polls Redis every 2 ms and records when the first message
was settled (the workers booted) and when the queue and its message hash were empty
(all settled), then reads the resident memory (VmRSS) of every worker process, stops
the CLI with SIGTERM and deletes the namespace. Libraries alternate (dq first in odd
runs). Reported: the drain rate after boot (N / (drained - first settled)), the time
from launch to drained, and the RSS per worker process, as medians with min–max.

    bash bench/run.sh cli [--n 10000] [--runs 3] [--processes 2] [--threads 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

import dq
from dq.brokers.redis import RedisBroker
from dq.brokers.sqlite import SqliteBroker

URL = "redis://127.0.0.1:6379/0"
QUEUE = "bench"

APP = {
    "dq": """\
import os
import dq
from dq.brokers.redis import RedisBroker

dq.set_broker(RedisBroker(url={url!r}, namespace=os.environ["BENCH_NS"]))


@dq.actor(queue_name={queue!r})
def noop():
    pass
""",
    "dq-sqlite": """\
import dq


@dq.actor(queue_name={queue!r})
def noop():
    pass
""",
    "dramatiq": """\
import os
import dramatiq
from dramatiq.brokers.redis import RedisBroker

dramatiq.set_broker(RedisBroker(url={url!r}, namespace=os.environ["BENCH_NS"]))


@dramatiq.actor(queue_name={queue!r})
def noop():
    pass
""",
}


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True, check=False
    ).stdout
    return [int(line) for line in out.split()]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _uss_mb(pid: int) -> float:
    """Memory only this process uses (private pages: what a forked worker adds)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def _fill(namespace: str, n: int) -> None:
    """Store N messages for ``noop`` (dq's bulk enqueue: the same bytes either library
    would store, each under its own redis_message_id)."""
    broker = RedisBroker(url=URL, namespace=namespace, middleware=[])
    broker.enqueue_many(dq.Message(QUEUE, "noop", (), {}, {}) for _ in range(n))
    broker.close()


def _cleanup(conn: redis.Redis, namespace: str, workdir: Path) -> None:
    """Delete every key of ``namespace`` and its SQLite files."""
    keys = list(conn.scan_iter(match=f"{namespace}:*"))
    if keys:
        conn.delete(*keys)
    for stale in workdir.glob(f"{namespace}.sqlite3*"):
        stale.unlink()


def _drain(library: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    conn = redis.Redis.from_url(URL)
    namespace = f"dq-bench-cli-{library}-{uuid.uuid4().hex}"
    env = dict(os.environ, BENCH_NS=namespace)
    # Both libraries run from compiled bytecode, as installed packages do (Dramatiq's
    # wheel ships .pyc files; dq, editable here, writes its own on the first run).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if library == "dq-sqlite":
        # The app sets no broker: the CLI takes DQ_BROKER_URL (SQLite in workdir).
        database = workdir / f"{namespace}.sqlite3"
        sqlite = SqliteBroker(str(database), middleware=[])
        sqlite.enqueue_many(dq.Message(QUEUE, "noop", (), {}, {}) for _ in range(args.n))
        env["DQ_BROKER_URL"] = f"sqlite:///{database}"

        def left() -> int:
            return sqlite.qsize(QUEUE)

    else:
        _fill(namespace, args.n)
        msgs = f"{namespace}:{QUEUE}.msgs"

        def left() -> int:  # a message leaves the hash when it is acked
            return int(conn.hlen(msgs))

    if left() != args.n:
        _cleanup(conn, namespace, workdir)
        raise RuntimeError(f"{library}: {left()} messages stored, expected {args.n}")
    module = "dq" if library.startswith("dq") else library
    command = [sys.executable, "-m", module, "app", "-p", str(args.processes)]
    command += ["-t", str(args.threads)]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = drained = 0.0
    try:
        deadline = started + args.timeout
        while time.perf_counter() < deadline:
            remaining = left()
            now = time.perf_counter()
            if not first and remaining < args.n:
                first = now
            if remaining == 0:
                drained = now
                break
            time.sleep(0.002)
        if not drained:
            raise RuntimeError(f"{library}: not drained within {args.timeout} s")
        workers = _children(proc.pid)
        rss = [_rss_mb(pid) for pid in workers]
        uss = [_uss_mb(pid) for pid in workers]
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _cleanup(conn, namespace, workdir)
    return {
        "rate": args.n / (drained - first),
        "launch_to_drained": drained - started,
        "boot": first - started,
        "rss_mb": statistics.median(rss) if rss else 0.0,
        "uss_mb": statistics.median(uss) if uss else 0.0,
        "processes": float(len(rss)),
    }


def _enqueue_rate(library: str, n: int, workdir: Path) -> float:
    """Messages per second of a ``send`` loop (default middleware, one thread)."""
    namespace = f"dq-bench-cli-send-{library}-{uuid.uuid4().hex}"
    conn = redis.Redis.from_url(URL)
    try:
        if library == "dramatiq":
            import dramatiq  # noqa: PLC0415 - only the benchmark venv has it
            from dramatiq.brokers.redis import RedisBroker as DramatiqRedis  # noqa: PLC0415

            broker: Any = DramatiqRedis(url=URL, namespace=namespace)
            send = dramatiq.actor(lambda i: None, actor_name="noop", broker=broker).send
        else:
            if library == "dq-sqlite":
                broker = SqliteBroker(str(workdir / f"{namespace}.sqlite3"))
            else:
                broker = RedisBroker(url=URL, namespace=namespace)
            send = dq.actor(lambda i: None, actor_name="noop", broker=broker).send
        for i in range(200):  # warm up
            send(i)
        began = time.perf_counter()
        for i in range(n):
            send(i)
        rate = n / (time.perf_counter() - began)
        broker.close()
        return rate
    finally:
        keys = list(conn.scan_iter(match=f"{namespace}:*"))
        if keys:
            conn.delete(*keys)
        for stale in workdir.glob(f"{namespace}.sqlite3*"):
            stale.unlink()


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f} – {max(values):,.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--sends", type=int, default=5000, help="messages of the send loop")
    parser.add_argument(
        "--libraries",
        default="dq,dramatiq,dq-sqlite",
        help="dq (RedisBroker), dramatiq (its RedisBroker), dq-sqlite (SqliteBroker by "
        "DQ_BROKER_URL, the broker a new user gets)",
    )
    args = parser.parse_args()
    libraries = args.libraries.split(",")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in libraries}
    # Compile dq's bytecode once, untimed (an editable install has none yet).
    subprocess.run(
        [sys.executable, "-c", "import dq, dq.cli, dq.brokers.redis, dq.brokers.sqlite"],
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        check=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for library, source in APP.items():
            workdir = Path(tmp) / library
            workdir.mkdir()
            (workdir / "app.py").write_text(source.format(url=URL, queue=QUEUE))
            dirs[library] = workdir
        for run in range(1, args.runs + 1):
            order = libraries if run % 2 else libraries[::-1]
            for library in order:
                result = _drain(library, args, dirs[library])
                result["send"] = _enqueue_rate(library, args.sends, dirs[library])
                results[library].append(result)
                print(
                    f"run {run}/{args.runs} {library:8}  drain {result['rate']:8,.0f} msgs/s  "
                    f"launch->drained {result['launch_to_drained']:6.2f} s  "
                    f"boot {result['boot']:5.2f} s  "
                    f"send {result['send']:7,.0f}/s  RSS/worker {result['rss_mb']:6.1f} MB  "
                    f"USS/worker {result['uss_mb']:6.1f} MB "
                    f"({result['processes']:.0f} workers)",
                    flush=True,
                )
    print()
    print(
        f"CLI drain (Redis; SQLite for dq-sqlite): N={args.n:,}, {args.processes} processes "
        f"x {args.threads} threads, default middleware; medians (min – max) of {args.runs} runs"
    )
    header = (
        f"{'':10}{'drain msgs/s':>28}{'launch->drained s':>26}{'RSS/worker MB':>24}"
        f"{'USS/worker MB':>24}{'send msgs/s':>30}"
    )
    print(header)
    for library, runs in results.items():
        print(
            f"{library:10}{_summary([r['rate'] for r in runs]):>28}"
            f"{_summary([r['launch_to_drained'] for r in runs]):>26}"
            f"{_summary([r['rss_mb'] for r in runs]):>24}"
            f"{_summary([r['uss_mb'] for r in runs]):>24}"
            f"{_summary([r['send'] for r in runs]):>30}"
        )
    if "dramatiq" not in results:
        return
    for name, target in (("dq", "2.5x"), ("dq-sqlite", "1.0x")):
        if name not in results:
            continue
        pairs = list(zip(results[name], results["dramatiq"], strict=True))
        ratios = [d["rate"] / m["rate"] for d, m in pairs]
        rss = [d["rss_mb"] / m["rss_mb"] for d, m in pairs]
        sends = [d["send"] / m["send"] for d, m in pairs]
        print(
            f"{name}/dramatiq drain {statistics.median(ratios):.2f}x (per run "
            f"{min(ratios):.2f}–{max(ratios):.2f}; target >= {target})   RSS "
            f"{statistics.median(rss):.2f}x (target <= 1.0x)   send "
            f"{statistics.median(sends):.2f}x ({min(sends):.2f}–{max(sends):.2f})"
        )


if __name__ == "__main__":
    main()
