"""The logging of the ``dq`` command's processes: Dramatiq's format, to stderr or
``--log-file``."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["LOG_FORMAT", "setup_logging"]

LOG_FORMAT = (
    "[%(asctime)s] [PID %(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s"
)


def setup_logging(args: argparse.Namespace) -> None:
    if args.skip_logging:
        return
    level = logging.DEBUG if args.verbose else logging.INFO
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
