"""Waiting in tests: poll a condition until it holds, or fail naming what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable

#: How long `wait_until` waits when the caller names no timeout, in seconds.
WAIT = 15.0


def _no_details() -> str:
    return ""


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout: float = WAIT,
    *,
    interval: float = 0.02,
    details: Callable[[], str] = _no_details,
) -> float:
    """Poll ``condition()`` every ``interval`` s until it is true; return the seconds
    it took.

    Raises:
        AssertionError: not true within ``timeout`` seconds; the message names
            ``what`` and adds ``details()`` (a log tail, say) when there are any.
    """
    began = time.monotonic()
    deadline = began + timeout
    while not condition():
        if time.monotonic() > deadline:
            extra = details()
            message = f"timed out after {timeout} s waiting for {what}"
            raise AssertionError(f"{message}\n{extra}" if extra else message)
        time.sleep(interval)
    return time.monotonic() - began
