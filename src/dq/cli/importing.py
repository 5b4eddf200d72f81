"""Resolving the ``dq`` command's ``broker`` argument (and ``--fork-function``
paths): import a module or one of its attributes; the broker when the module set
none."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from dq.broker import Broker, get_broker, set_broker
from dq.brokers import from_url
from dq.cli.parser import CLI

__all__ = ["BROKER_URL_ENV", "DEFAULT_BROKER_URL", "import_broker", "import_object"]

#: The environment variable naming the broker when the module sets none.
BROKER_URL_ENV = "DQ_BROKER_URL"
#: The broker when neither the module nor DQ_BROKER_URL names one: SQLite, here.
DEFAULT_BROKER_URL = "sqlite:///dq.sqlite3"


def import_object(value: str) -> tuple[Any, Any]:
    """Import ``module`` or ``module:a.b``; return (module, attribute or None).

    Raises:
        ImportError: the module cannot be imported, or lacks the attribute.
    """
    module_name, _, path = value.partition(":")
    module = importlib.import_module(module_name)
    if not path:
        return module, None
    target: Any = module
    for name in path.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ImportError(
                f"Module {module_name!r} does not define a {path!r} variable."
            ) from None
    return module, target


def import_broker(value: str) -> tuple[Any, Broker]:
    """Resolve the ``broker`` argument; return (module, broker).

    Raises:
        ImportError: it cannot be imported, names no broker, or the module set none.
    """
    module, target = import_object(value)
    if target is None:
        try:
            return module, get_broker()
        except RuntimeError:
            return module, _default_broker(value)
    if isinstance(target, Broker):
        return module, target
    if callable(target):
        target()
        try:
            return module, get_broker()
        except RuntimeError:
            raise ImportError(f"{value!r} was called but set no broker.") from None
    raise ImportError(f"{value!r} is not a Broker.")


def _default_broker(value: str) -> Broker:
    """The broker for a module that set none: ``$DQ_BROKER_URL``, else SQLite in the
    working directory (logged)."""
    logger = logging.getLogger(f"{CLI}.MainProcess")
    url = os.environ.get(BROKER_URL_ENV)
    if url:
        logger.info("Module %r sets no broker: using %s=%s.", value, BROKER_URL_ENV, url)
    else:
        url = DEFAULT_BROKER_URL
        logger.info(
            "Module %r sets no broker and %s is not set: using SQLite in %s (%s).",
            value,
            BROKER_URL_ENV,
            os.path.join(os.getcwd(), "dq.sqlite3"),
            url,
        )
    try:
        broker = from_url(url)
    except (ValueError, ImportError) as e:
        raise ImportError(f"Cannot make the broker {url!r}: {e}") from e
    set_broker(broker)
    return broker
