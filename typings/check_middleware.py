"""Middleware hooks are typed: a subclass overriding them with these signatures checks."""

from __future__ import annotations

from typing import Any, assert_type

import dq
from dq import Broker, Message, MessageProxy, Worker
from dq.middleware import Middleware


class Typed(Middleware):
    @property
    def actor_options(self) -> set[str]:
        return {"colour"}

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        assert_type(message.options, dq.core.FrozenDict[str, Any])

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        assert_type(message.message, Message[Any])
        assert_type(message.failed, bool)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is not None:
            message.stuff_exception(exception)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        message.update_message(message.message.copy(options={"skipped": True}))

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        assert_type(worker.worker_threads, int)

    def after_process_boot(self, broker: Broker) -> None:
        pass
