"""Results: store what actors return, and read it back from a `dq.Message`.

Add the `Results` middleware with a backend to the broker, give actors
``store_results=True``, then ``message.get_result(block=True)``. Keys and values are
Dramatiq's, so Dramatiq and dq processes sharing a backend read each other's results.

The names below are imported on first use: `dq.results.errors` is imported by the
composition that `dq.message` imports, and the backend imports `dq.message`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dq import _lazy_exports

if TYPE_CHECKING:
    from dq.results.backend import Missing as Missing
    from dq.results.backend import ResultBackend as ResultBackend
    from dq.results.errors import ResultError as ResultError
    from dq.results.errors import ResultFailure as ResultFailure
    from dq.results.errors import ResultMissing as ResultMissing
    from dq.results.errors import ResultTimeout as ResultTimeout
    from dq.results.middleware import Results as Results

__all__ = [
    "Missing",
    "ResultBackend",
    "ResultError",
    "ResultFailure",
    "ResultMissing",
    "ResultTimeout",
    "Results",
]

if not TYPE_CHECKING:  # type checkers read the imports above
    __getattr__, __dir__ = _lazy_exports(
        __name__,
        {
            "Missing": "dq.results.backend",
            "ResultBackend": "dq.results.backend",
            "ResultError": "dq.results.errors",
            "ResultFailure": "dq.results.errors",
            "ResultMissing": "dq.results.errors",
            "ResultTimeout": "dq.results.errors",
            "Results": "dq.results.middleware",
        },
    )
