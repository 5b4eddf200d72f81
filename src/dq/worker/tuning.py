"""The worker's tuning constants, read once from the environment (Dramatiq's
variables and defaults).

The threads read the delays from this module when they need them, so a test can
shorten them (``monkeypatch.setattr(dq.worker.tuning, ...)``).
"""

from __future__ import annotations

from dq.common import getenv_int

#: Prefetch per queue consumer (0: ``min(2 × threads, 65535)``).
QUEUE_PREFETCH = getenv_int("dramatiq_queue_prefetch") or 0
#: Prefetch per delay-queue consumer (0: ``min(1000 × threads, 65535)``).
DELAY_QUEUE_PREFETCH = getenv_int("dramatiq_delay_queue_prefetch") or 0
#: Consumer idle timeout and worker-thread poll interval (ms).
WORKER_TIMEOUT = getenv_int("dramatiq_worker_timeout") or 1000
#: Pause before a failed consumer restarts (ms).
CONSUMER_RESTART_DELAY = getenv_int("dramatiq_restart_delay") or 3000
CONSUMER_RESTART_DELAY_SECS = CONSUMER_RESTART_DELAY / 1000
#: Pause between attempts to settle a message while the broker connection is down.
POST_PROCESS_MESSAGE_RETRY_DELAY_SECS = 5
