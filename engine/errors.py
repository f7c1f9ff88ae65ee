"""The engine's exceptions, and the one way to turn any exception into a one-line reason. A leaf: imports nothing
of the project, so every layer can raise and catch these."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input: reported as one line, never as a traceback.

    `field` names the setting at fault where there is one, in the engine's own names (`height`, `steps`,
    `guidance`, `fis`, ...): the HTTP schema maps them to its JSON names instead of parsing the message."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class FieldError(UserError):
    """A bad value in one field of a JSON request (HTTP body or manifest line); `field` is its JSON name, dotted
    inside objects ('fis.stride')."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field)


class Cancelled(Exception):
    """Raised inside a running generation when its caller cancels it."""


class GroupFailed(RuntimeError):
    """A rank of a worker group died, or failed in a way that may leave the others waiting in a collective: the
    job fails with this reason and the group is rebuilt."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message' (bounded): what a record, a table cell or a log line shows of an error."""
    text = str(e).strip()
    line = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


__all__ = ["Cancelled", "FieldError", "GroupFailed", "UserError", "one_line"]
