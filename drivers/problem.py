"""One error channel: every failure Nubes reports carries a `Problem`.

A Problem is a CamelCase `reason` (one per cause, the same in every kind:
see the README's table), a `message` for people and whether the writer
retries by itself (`retryable`). Drivers raise subclasses of `Failure` that
set `reason`/`retryable` per class; the node agent reports
`problem_of(error)` in an object's `status.nodeProblem`, the controller folds
that into the object's conditions, and the controller's own `Stall`/`Wait`
(nubes.runtime.reconcile) are Failures too.

It lives in the drivers package because drivers may import nothing else of
Nubes (import contracts), and every tier may import drivers' plain types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")


@dataclass(frozen=True)
class Problem:
    reason: str
    """CamelCase, one per failure cause across kinds."""
    message: str
    """What went wrong, for people."""
    retryable: bool = True
    """The writer tries again by itself; false: it waits for a change."""

    def __post_init__(self) -> None:
        if not _CAMEL.match(self.reason):
            raise ValueError(f"problem reason must be CamelCase: {self.reason!r}")


class Failure(Exception):
    """Base of every typed failure: class attributes give the default reason
    and retryability, an instance may override both. `str(e)` is the message."""

    reason: str = "NodeError"
    retryable: bool = True

    def __init__(
        self, message: str = "", *, reason: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self) -> str:
        return str(self)


# Reasons for errors that are not Failures (the standard library's).
_FOREIGN: dict[type[BaseException], tuple[str, bool]] = {
    FileNotFoundError: ("FileMissing", True),
    TimeoutError: ("NodeTimeout", True),
}


def problem_of(error: BaseException, what: str = "") -> Problem:
    """The Problem an error reports, its message prefixed with `what`."""
    prefix = f"{what}: " if what else ""
    if isinstance(error, Failure):
        text = error.message or type(error).__name__
        return Problem(error.reason, prefix + text, error.retryable)
    for kind, (reason, retryable) in _FOREIGN.items():
        if isinstance(error, kind):
            return Problem(reason, prefix + (str(error) or kind.__name__), retryable)
    return Problem("NodeError", prefix + (str(error) or type(error).__name__), True)


def fail(reason: str, message: str, *, retryable: bool = True) -> Failure:
    """A Failure with an explicit reason: `raise fail("SourceMissing", ...)`."""
    return Failure(message, reason=reason, retryable=retryable)
