"""The RabbitMQ broker's connection parameters: its ``url``, ``parameters`` and keyword
arguments turned into pika's parameters, in fail-over order, and opening a connection
on them."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from dq.brokers.rabbitmq import _pika
from dq.brokers.rabbitmq.errors import RabbitmqConnectionFailed

__all__ = ["Parameters", "addresses", "connect", "from_arguments"]

#: pika's parameters of one address.
Parameters = pika.ConnectionParameters | pika.URLParameters

_PARAMETER_NAMES = frozenset(
    name
    for name in inspect.signature(pika.ConnectionParameters.__init__).parameters
    if name not in ("self", "_DEFAULT")
)


def connect(parameters: Sequence[Parameters], *, reading: bool = False) -> BlockingConnection:
    """Open a connection, trying each address in order (each with its own
    ``connection_attempts`` and ``retry_delay``); with ``reading``, a consumer's (see
    `dq.brokers.rabbitmq._pika.ReadingConnection`).

    Raises:
        RabbitmqConnectionFailed: none could be opened.
    """
    try:
        return _pika.connect(parameters, reading=reading)
    except pika.exceptions.AMQPError as e:
        raise RabbitmqConnectionFailed(
            f"could not connect to RabbitMQ at {addresses(parameters)}: {e!r}"
        ) from e


def addresses(parameters: Sequence[Parameters]) -> str:
    """``host:port`` of each address, for messages."""
    return ", ".join(f"{p.host}:{p.port}" for p in parameters)


def from_arguments(
    url: str | list[str] | None,
    parameters: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
) -> list[Parameters]:
    """The connection parameters of the constructor's arguments (see `RabbitmqBroker`)."""
    unknown = sorted(set(kwargs) - _PARAMETER_NAMES)
    if unknown:
        raise TypeError(
            f"RabbitmqBroker got unexpected keyword argument(s) {unknown}: they are not "
            f"pika.ConnectionParameters keywords ({sorted(_PARAMETER_NAMES)})"
        )
    if url is not None:
        if parameters is not None:
            raise RuntimeError(
                "RabbitmqBroker takes 'url' or 'parameters', not both: give the addresses "
                "as a list of URLs, or as a list of parameter dicts"
            )
        given: list[object] = list(url.split(";") if isinstance(url, str) else url)
        if not all(isinstance(u, str) for u in given):
            raise TypeError(f"url must be a string or a list of strings, got {url!r}")
        urls = [str(u).strip() for u in given if str(u).strip()]
        if not urls:
            raise ValueError(f"url names no address: {url!r}")
        result: list[Parameters] = []
        for u in urls:
            params = pika.URLParameters(u)
            for key, value in kwargs.items():
                setattr(params, key, value)  # pika validates each value
            result.append(params)
        return result
    if parameters is not None:
        if kwargs:
            raise RuntimeError(
                f"RabbitmqBroker takes 'parameters' or connection keywords, not both (got "
                f"{sorted(kwargs)})"
            )
        given_parameters: list[object] = list(parameters)
        if not all(isinstance(p, dict) for p in given_parameters):
            raise TypeError(
                f"parameters must be a list of dicts of pika.ConnectionParameters keywords, "
                f"got {parameters!r}"
            )
        return [pika.ConnectionParameters(**p) for p in parameters]
    return [pika.ConnectionParameters(**{"host": "127.0.0.1", **kwargs})]
