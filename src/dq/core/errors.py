"""Errors raised by the pure core."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dq.core.commands import Command
    from dq.core.subjects import Status


class CoreError(Exception):
    """Base class of the core's errors."""


class InvalidTransition(CoreError):
    """A command was applied to a subject in a state that has no such transition.

    Attributes:
        status: the state of the subject the command addressed.
        command: the command.
    """

    def __init__(self, status: Status, command: Command, reason: str | None = None) -> None:
        self.status = status
        self.command = command
        super().__init__(
            reason
            or f"no transition for {type(command).__name__} when the subject is "
            f"{status.name}: {command!r}"
        )


class InvalidValue(CoreError, ValueError):
    """A value given to a policy function is out of its domain."""
