"""Crash tests' processes: worker scripts run as children, what a test started and must
stop, and the end-to-end check that every message ran and nothing was left behind.

A crash worker script (tests/brokers/*/..._crash_worker.py) prints one JSON line when
it is ready; `Cleanup.spawn` starts it and waits for that line. `assert_all_processed`
waits for a run to settle and asserts the at-least-once promise, printing the figures
(run pytest with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import dq
import dq.broker
from tests.support.waiting import wait_until

B = TypeVar("B", bound=dq.broker.Broker)


@dataclass
class Child:
    """A worker script's process, the JSON line it printed when ready, and its log."""

    process: subprocess.Popen[str]
    log: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def broker_id(self) -> str:
        """The broker id the script printed (the Redis worker script prints one)."""
        broker_id: str = self.info["broker_id"]
        return broker_id

    def sigkill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Cleanup(Generic[B]):
    """What a test started, stopped in reverse order in teardown: children killed,
    then workers stopped, then brokers closed."""

    workers: list[dq.Worker] = field(default_factory=list)
    brokers: list[B] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    def worker(self, broker: B, *, threads: int = 8) -> dq.Worker:
        worker = dq.Worker(broker, worker_threads=threads, worker_timeout=100)
        self.workers.append(worker)
        worker.start()
        return worker

    def spawn(
        self,
        command: Sequence[str],
        log: Path,
        *,
        what: str = "the worker",
        ready_timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start ``command`` (stderr appended to ``log``, consumers restarting after
        0.1 s) and wait for its JSON line."""
        env = dict(os.environ, dramatiq_restart_delay="100", PYTHONUNBUFFERED="1", **(env or {}))
        with log.open("ab") as stderr:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        child = Child(process, log)
        self.children.append(child)
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(ready_timeout):
                raise AssertionError(f"{what} printed nothing:\n{child.log_text()}")
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"{what} exited ({process.wait()}):\n{child.log_text()}")
        child.info = json.loads(line)
        return child

    def close(self) -> None:
        for child in reversed(self.children):
            child.kill()
        for worker in reversed(self.workers):
            worker.stop(timeout=2000)
        for broker in reversed(self.brokers):
            broker.close()


@dataclass
class Outcome:
    processed: int
    runs: int
    duplicates: int
    settled_after: float


def assert_all_processed(
    expected: set[str],
    counts: Callable[[], Mapping[str, int]],
    *,
    settled: Callable[[], bool],
    leftovers: Callable[[], Mapping[str, object]],
    timeout: float,
    interval: float,
    label: str,
    left_means: str,
) -> Outcome:
    """Wait until ``settled()`` (every expected message ran and nothing is left); then
    assert it, with the figures in the messages. Returns the figures.

    Args:
        expected: the ids of the messages sent.
        counts: how many times each message id ran so far.
        leftovers: what is still stored (empty when the run is over), by name.
        left_means: what a leftover is, for the failure message.
    """
    began = time.monotonic()
    with contextlib.suppress(AssertionError):  # the asserts below say what is wrong
        wait_until(settled, label, timeout, interval=interval)
    settled_after = time.monotonic() - began
    final = dict(counts())
    left = dict(leftovers())
    missing = expected - final.keys()
    unexpected = final.keys() - expected
    runs = sum(final.values())
    duplicates = runs - len(final)
    figures = (
        f"[{label}] {len(final)}/{len(expected)} processed, {runs} runs, "
        f"{duplicates} duplicates, settled after {settled_after:.2f} s; leftovers: {left}"
    )
    print(figures)
    assert not missing, f"{len(missing)} messages never processed (lost or stuck): {figures}"
    assert not unexpected, f"{len(unexpected)} unknown messages ran: {figures}"
    assert not left, f"{left_means}: {figures}"
    return Outcome(len(final), runs, duplicates, settled_after)
