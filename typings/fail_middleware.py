"""Overriding a hook with an incompatible signature is a type error."""

from __future__ import annotations

from typing import Any

from dq import Broker, MessageProxy
from dq.middleware import Middleware


class Wrong(Middleware):
    def before_ack(self, broker: Broker, message: int) -> None:  # E: override
        pass

    def after_process_message(self, broker: Broker, message: MessageProxy) -> None:  # E: override
        pass

    def before_enqueue(self, broker: Broker, message: Any) -> int:  # E: override
        return 0

    @property
    def actor_options(self) -> list[str]:  # E: override
        return []
