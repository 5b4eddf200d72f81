"""The ``dq`` command's main process: start the worker processes, wait for them to
boot, start the forks, then watch them until they stop, restarting a worker process
that died (with a backoff) or recycled itself, and relay signals to them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import time
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from dq.cli.codes import (
    RET_CONNECT,
    RET_IMPORT,
    RET_KILLED,
    RET_OK,
    RET_RECYCLE,
    describe_status,
    exit_code,
)
from dq.cli.parser import CLI
from dq.cli.processes import HANDLED, fork_process, worker_process

__all__ = ["RESTART_BACKOFF_SECS", "RESTART_RESET_SECS", "Supervisor", "start_blocked"]

#: Backoff before restarting a worker process that died (s): doubles up to the cap,
#: and starts again from the first once a process lived for RESTART_RESET_SECS.
RESTART_BACKOFF_SECS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RESTART_RESET_SECS = 60.0


class Supervisor:
    """Starts, watches and restarts the worker processes."""

    def __init__(self, args: argparse.Namespace, context: BaseContext) -> None:
        self.args = args
        self.context = context
        self.logger = logging.getLogger(f"{CLI}.MainProcess")
        # A SimpleQueue: a pipe, no feeder thread in every worker process.
        self.events: Any = context.SimpleQueue()
        self.workers: list[BaseProcess | None] = [None] * args.processes
        self.started_at = [0.0] * args.processes
        self.restarts = [0] * args.processes
        self.restart_due: dict[int, float] = {}
        self.forks: list[BaseProcess] = []
        self.signals = 0
        self.stopping = False
        self.reloading = False
        self.result = RET_OK

    def start_worker(self, index: int) -> None:
        process = self.context.Process(  # type: ignore[attr-defined]  # every context has it
            target=worker_process,
            args=(self.args, index, self.events),
            name=f"{CLI}-worker-{index}",
        )
        start_blocked(process)
        self.workers[index] = process
        self.started_at[index] = time.monotonic()

    def start_fork(self, path: str) -> None:
        index = len(self.forks)
        process = self.context.Process(  # type: ignore[attr-defined]  # every context has it
            target=fork_process,
            args=(self.args, index, path),
            name=f"{CLI}-fork-{index}",
            daemon=True,
        )
        start_blocked(process)
        self.forks.append(process)

    def signal_children(self, signum: int) -> None:
        for process in [*self.workers, *self.forks]:
            if process is not None and process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            if self.stopping:
                # A second change (an editor saves twice) or a reload while stopping:
                # the workers are already stopping gracefully; a second SIGHUP would
                # make them stop at once.
                self.logger.info(
                    "Already %s; ignoring SIGHUP.", "reloading" if self.reloading else "stopping"
                )
                return
            self.logger.info("Reloading: stopping the workers gracefully, then restarting.")
            self.reloading = True
            self.stopping = True
            self.signal_children(signal.SIGHUP)
            return
        self.signals += 1
        self.stopping = True
        if self.signals == 1:
            self.logger.info("Stopping gracefully (send the signal again to stop at once).")
        else:
            self.logger.warning("Stopping at once.")
            self.result = RET_KILLED
        self.signal_children(signal.SIGTERM)

    def boot(self) -> int | None:
        """Start the workers, wait for them to boot, start the forks; return an exit
        code if booting failed."""
        for index in range(self.args.processes):
            self.start_worker(index)
        deadline = time.monotonic() + self.args.worker_fork_timeout / 1000
        ready: set[int] = set()
        forks: list[str] = []
        while len(ready) < self.args.processes and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.logger.warning(
                    "Not every worker booted within %d ms; starting the forks anyway.",
                    self.args.worker_fork_timeout,
                )
                break
            if self.events.empty():
                time.sleep(min(remaining, 0.02))
                for index, process in enumerate(self.workers):
                    if process is not None and not process.is_alive() and index not in ready:
                        code = process.exitcode
                        return RET_IMPORT if code is None else exit_code(code)
                continue
            kind, index, payload = self.events.get()
            if kind == "failed":
                return int(payload)
            ready.add(index)
            if not forks:
                forks = list(payload)
        for path in [*self.args.forks, *forks]:
            self.start_fork(path)
        return None

    def supervise(self) -> int:
        """Watch the processes until every worker stopped; return the exit code."""
        while True:
            self._drain_events()
            alive = False
            now = time.monotonic()
            for index, process in enumerate(self.workers):
                if process is None:
                    if not self.stopping and self.restart_due.get(index, 0) <= now:
                        self.restart_due.pop(index, None)
                        self.start_worker(index)
                        alive = True
                    elif not self.stopping:
                        alive = True
                    continue
                if process.is_alive():
                    alive = True
                    continue
                process.join()
                code = process.exitcode
                self.workers[index] = None
                if self.stopping:
                    if code not in (RET_OK, RET_RECYCLE, None) and self.result == RET_OK:
                        self.result = exit_code(code)
                    continue
                alive = True
                self._restart_later(index, code)
            if not alive:
                for fork in self.forks:
                    fork.join(5)
                return self.result
            time.sleep(0.1)

    def _drain_events(self) -> None:
        while not self.events.empty():
            self.events.get()

    def _restart_later(self, index: int, code: int | None) -> None:
        if code == RET_RECYCLE:
            self.logger.info("Worker process %d recycled itself; starting its replacement.", index)
            self.restart_due[index] = 0.0
            self.restarts[index] = 0
            return
        if code in (RET_IMPORT, RET_CONNECT):
            # It cannot boot: restarting would fail the same way.
            self.logger.critical("Worker process %d exited with code %d; stopping.", index, code)
            self.result = code
            self.stopping = True
            self.signal_children(signal.SIGTERM)
            return
        lived = time.monotonic() - self.started_at[index]
        if lived >= RESTART_RESET_SECS:
            self.restarts[index] = 0
        delay = RESTART_BACKOFF_SECS[min(self.restarts[index], len(RESTART_BACKOFF_SECS) - 1)]
        self.restarts[index] += 1
        self.logger.error(
            "Worker process %d died unexpectedly (%s) after %.1f s; restarting it in %.1f s. "
            "The other processes keep working; what it held comes back through the broker.",
            index,
            describe_status(code),
            lived,
            delay,
        )
        self.restart_due[index] = time.monotonic() + delay


def start_blocked(process: BaseProcess) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
