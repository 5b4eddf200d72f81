"""dq's main job: an example app run by the ``dq`` command, with its runner.

    python examples/shop.py                                   # SQLite: no server needed
    DQ_BROKER_URL=redis://127.0.0.1:6379/0 python examples/shop.py   # the same on Redis

Run as a script, it enqueues the work (1,000 word counts, flaky fetches that succeed
after retries, a delayed reminder, pipelines, a group of charges, one of which fails
for good), starts ``python -m dq shop -p 2 -t 4`` on it, shows a progress line while it
drains, stops the workers once everything is settled and prints a summary. On SQLite
it all happens in a fresh temporary directory (``--keep`` keeps it). Imported (by the
workers), it only defines the broker and the actors.

The broker is the one ``$DQ_BROKER_URL`` names, else SQLite in the working directory:
``DQ_BROKER_URL=redis://127.0.0.1:6379/0`` moves the same app to Redis. A `Tally`
middleware counts what happened in a small SQLite file (``$DQ_EXAMPLE_TALLY``) shared
by every worker process, so the runner can show progress and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dq
from dq.broker import Broker, MessageProxy
from dq.brokers import from_url


class Tally(dq.Middleware):
    """Counts processed, retried and dead-lettered messages in a shared SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()

    def _add(self, what: str) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = sqlite3.connect(self.path, timeout=30)
        with conn:
            conn.execute("UPDATE tally SET n = n + 1 WHERE what = ?", (what,))

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            self._add("processed")

    def after_ack(self, broker: Broker, message: MessageProxy) -> None:
        if message.replacement is not None:  # acked because its retry was stored
            self._add("retried")

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        self._add("dead-lettered")


def create_tally(path: str) -> None:
    """Create the tally file, every count at 0."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS tally (what TEXT PRIMARY KEY, n INTEGER)")
        for what in ("processed", "retried", "dead-lettered"):
            conn.execute("INSERT OR REPLACE INTO tally VALUES (?, 0)", (what,))


def read_tally(path: str) -> dict[str, int]:
    """The counts so far."""
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        return dict(conn.execute("SELECT what, n FROM tally").fetchall())


# -- the broker and the actors ----------------------------------------------------------

if __name__ == "__main__":  # the runner: work in a fresh directory
    WORKDIR = Path(tempfile.mkdtemp(prefix="dq-example-"))
    os.chdir(WORKDIR)  # dq.sqlite3 and the tally live here
    os.environ["DQ_EXAMPLE_TALLY"] = str(WORKDIR / "tally.sqlite3")
    create_tally(os.environ["DQ_EXAMPLE_TALLY"])

BROKER_URL = os.environ.get("DQ_BROKER_URL", "sqlite:///dq.sqlite3")
broker = from_url(BROKER_URL)
broker.add_middleware(Tally(os.environ.get("DQ_EXAMPLE_TALLY", "dq-example-tally.sqlite3")))
dq.set_broker(broker)


@dq.actor
def count_words(text: str) -> int:
    """Count the words of a text (most of the work)."""
    return len(text.split())


@dq.actor(max_retries=3, min_backoff=50, max_backoff=200)
def flaky_fetch(url: str, failures: int) -> str:
    """Fail ``failures`` times per url (recorded in the tally file), then succeed:
    retried with backoff."""
    path = os.environ.get("DQ_EXAMPLE_TALLY", "dq-example-tally.sqlite3")
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS attempts (url TEXT PRIMARY KEY, n INTEGER)")
        conn.execute(
            "INSERT INTO attempts VALUES (?, 1) ON CONFLICT(url) DO UPDATE SET n = n + 1",
            (url,),
        )
        (attempt,) = conn.execute("SELECT n FROM attempts WHERE url = ?", (url,)).fetchone()
    if attempt <= failures:
        raise ConnectionError(f"{url} is flaky (attempt {attempt})")
    return f"<html>{url}</html>"


@dq.actor(max_retries=0)
def charge(order: int, amount: int) -> None:
    """Charge an order; a negative amount fails for good (dead-lettered)."""
    if amount < 0:
        raise ValueError(f"order {order}: cannot charge {amount}")
    time.sleep(0.001)


@dq.actor
def add(x: int, y: int) -> int:
    """A pipeline step."""
    return x + y


@dq.actor
def double(x: int) -> int:
    """A pipeline step: the previous step's result is its argument."""
    return x * 2


@dq.actor
def remind(who: str) -> None:
    """A delayed task."""


# -- the runner ------------------------------------------------------------------------

#: Word-count tasks enqueued (``--words``).
WORDS = 1000
EXAMPLES = Path(__file__).resolve().parent


def enqueue(words: int) -> tuple[int, int]:
    """Enqueue the work; return (messages enqueued, successful runs expected)."""
    texts = [f"task {i}: the quick brown fox jumps over the lazy dog" for i in range(words)]
    count_words.send_many([count_words.message(t) for t in texts])
    for i in range(5):
        flaky_fetch.send(f"https://example.com/{i}", 2)  # fails twice, then works
    remind.send_with_options(args=("you",), delay=1500)
    for i in range(3):
        (add.message(i, 1) | double.message_with_options()).run()  # gets add's result
    # Order 0 costs -5: its charge fails for good and is dead-lettered.
    dq.group([charge.message(order, 10 * order - 5) for order in range(10)]).run()
    return words + 5 + 1 + 3 + 10, words + 5 + 1 + 3 * 2 + 9


def drain(cli: subprocess.Popen[bytes], expected: int, started: float) -> bool:
    """Show progress until everything is settled; return False if the workers died."""
    tally_path = os.environ["DQ_EXAMPLE_TALLY"]
    interactive = sys.stdout.isatty()
    while True:
        tally = read_tally(tally_path)
        elapsed = time.monotonic() - started
        line = (
            f"processed {tally['processed']:5}/{expected}  retried {tally['retried']:2}  "
            f"dead-lettered {tally['dead-lettered']}  {elapsed:5.1f} s"
        )
        if interactive:
            print(f"\r{line}", end="", flush=True)
        settled = tally["processed"] >= expected and tally["dead-lettered"] >= 1
        if settled and broker.qsize("default") == 0:  # type: ignore[attr-defined]  # SQLite, Redis
            print(f"\r{line}" if interactive else line)
            return True
        if cli.poll() is not None or elapsed > 120:
            print(f"\n{line}\nthe dq command stopped early ({cli.returncode})")
            return False
        time.sleep(0.1)


def main() -> int:
    """Run the example; return the exit code."""
    parser = argparse.ArgumentParser(description="Run dq's example app.")
    parser.add_argument("--words", type=int, default=WORDS, help="word-count tasks")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    broker.flush("default")  # what an earlier run left on a server (Redis)
    print(f"dq example app on {type(broker).__name__} ({BROKER_URL})")
    started = time.monotonic()
    enqueued, expected = enqueue(args.words)
    command = [sys.executable, "-m", "dq", "shop", "--path", str(EXAMPLES)]
    command += ["-p", str(args.processes), "-t", str(args.threads)]
    print(f"enqueued {enqueued} messages; running `dq shop -p {args.processes} -t {args.threads}`")
    with open("dq.log", "wb") as log:
        cli = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            ok = drain(cli, expected, started)
            cli.send_signal(signal.SIGTERM)
            code = cli.wait(60)
        finally:
            if cli.poll() is None:
                cli.kill()
    tally = read_tally(os.environ["DQ_EXAMPLE_TALLY"])
    print(
        f"summary: processed {tally['processed']}, retried {tally['retried']}, "
        f"dead-lettered {tally['dead-lettered']}, elapsed {time.monotonic() - started:.1f} s "
        f"(dq exited with {code})"
    )
    broker.close()
    workdir = Path.cwd()
    if args.keep or not ok:
        print(f"kept {workdir} (the workers' log is dq.log)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
