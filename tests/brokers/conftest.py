"""Fixtures shared by the broker tests of every server."""

from __future__ import annotations

import pytest

import dq.worker.tuning


@pytest.fixture
def fast_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Worker that lost its connection retries after 0.1 s instead of 3 s / 5 s."""
    monkeypatch.setattr(dq.worker.tuning, "CONSUMER_RESTART_DELAY_SECS", 0.1)
    monkeypatch.setattr(dq.worker.tuning, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.1)
