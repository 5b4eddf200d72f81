"""``--watch``: reload the ``dq`` command when a source file changes, by sending the
main process SIGHUP.

This module needs watchdog (``dq[watch]``), an optional dependency: the command
imports it only for ``--watch``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable

from watchdog.events import FileSystemEvent, PatternMatchingEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

__all__ = ["start_watcher"]


class _Reloader(PatternMatchingEventHandler):
    """Sends SIGHUP to the main process on a change to a watched file."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        patterns: list[str],
        ignore_patterns: list[str] | None,
    ) -> None:
        super().__init__(patterns=patterns, ignore_patterns=ignore_patterns, case_sensitive=True)
        self.logger = logger
        self.main_pid = os.getpid()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        self.logger.info("Detected a change in %r: reloading.", event.src_path)
        os.kill(self.main_pid, signal.SIGHUP)


def start_watcher(args: argparse.Namespace, logger: logging.Logger) -> Callable[[], None] | None:
    """Start the file watcher; return its stopper, or None if it cannot run."""
    if not os.path.isdir(args.watch):
        logger.critical("--watch %r is not a directory.", args.watch)
        return None
    observer = PollingObserver() if args.watch_use_polling else Observer()
    handler = _Reloader(
        logger, patterns=args.watch_include, ignore_patterns=args.watch_exclude or None
    )
    observer.schedule(handler, args.watch, recursive=True)
    observer.start()

    def stop() -> None:
        observer.stop()
        observer.join(5)

    return stop
