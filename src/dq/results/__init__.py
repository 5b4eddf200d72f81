"""Results: store what actors return, and read it back from a `dq.Message`.

Add the `Results` middleware with a backend to the broker, give actors
``store_results=True``, then ``message.get_result(block=True)``. Keys and values are
Dramatiq's, so Dramatiq and dq processes sharing a backend read each other's results.
"""

from __future__ import annotations

from dq.results.backend import Missing, ResultBackend
from dq.results.errors import ResultError, ResultFailure, ResultMissing, ResultTimeout
from dq.results.middleware import Results

__all__ = [
    "Missing",
    "ResultBackend",
    "ResultError",
    "ResultFailure",
    "ResultMissing",
    "ResultTimeout",
    "Results",
]
