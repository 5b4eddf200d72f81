"""`dq.brokers.from_url`: a broker by URL."""

from __future__ import annotations

import pytest

from dq.brokers import SCHEMES, from_url
from dq.brokers.redis import RedisBroker


@pytest.mark.redis
def test_redis_urls_make_a_redis_broker_with_the_url() -> None:
    broker = from_url("redis://127.0.0.1:6379/0", namespace="dq-url-test")
    assert isinstance(broker, RedisBroker)
    assert broker.namespace == "dq-url-test"
    kwargs = broker.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6379, 0)
    assert broker.client.ping()
    assert isinstance(from_url("rediss://example.invalid:6380/1"), RedisBroker)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("kafka://broker:9092", "unknown broker URL scheme 'kafka' in 'kafka://broker:9092'"),
        ("127.0.0.1:6379", "looks like 'scheme://"),
        ("sqlite://", "names a file"),
    ],
)
def test_bad_urls_are_refused_naming_what_is_wrong(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_url(url)


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as caught:
        from_url("nats://x")
    for scheme in SCHEMES:
        assert f"{scheme}://" in str(caught.value)
