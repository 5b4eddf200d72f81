"""The backend names the results, rate-limit and composition tests run against.

Each server-backed name carries its server's marker, so that
``pytest -m "not redis and not memcached"`` keeps the stub case and deselects the rest.
"""

from __future__ import annotations

import pytest

BACKENDS = [
    pytest.param("stub", id="stub"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("memcached", id="memcached", marks=pytest.mark.memcached),
]
