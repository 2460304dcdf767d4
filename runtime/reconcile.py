"""Reconcilers: one per kind, each an idempotent converge function.

A reconciler looks at the object and the caches of related objects, brings
the world towards the spec, and returns an `Outcome`: the status fields it
owns plus the kstatus state (Ready, or Reconciling/Stalled with a reason).
The runtime (`nubes.runtime.operator`) decides when to call it and writes the status
only when it changed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeAlias, TypeVar

from nubes.api.meta import ApiModel, Condition, Resource, now_rfc3339
from nubes.drivers.problem import Failure

if TYPE_CHECKING:
    from nubes.runtime.operator import Operator

R = TypeVar("R", bound=Resource[Any, Any])

State = Literal["ready", "progressing", "stalled"]
_CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")

StatusFields: TypeAlias = ApiModel | Mapping[str, Any] | None
"""What a writer hands over: its kind's status model with the fields it owns
set explicitly (preferred: a wrong name or type fails at the writer), or the
same fields already in wire form."""


def wire_status(status: StatusFields) -> dict[str, Any]:
    """The wire form of a writer's status fields: camelCase, only the fields
    set explicitly, an explicit None kept (the write clears that field)."""
    if status is None:
        return {}
    if isinstance(status, ApiModel):
        return status.patch()
    return dict(status)


@dataclass(init=False)
class Outcome:
    """What one converge pass found.

    `status` holds only the fields this process owns, in wire form: a status
    model given to the constructor is converted here, once, so the runtime
    always sees a dict. `state` None means the process does not own the
    kstatus conditions (the agent).
    """

    status: dict[str, Any]
    state: State | None
    reason: str
    message: str
    requeue_after: float | None

    def __init__(
        self,
        status: StatusFields = None,
        state: State | None = None,
        reason: str = "",
        message: str = "",
        requeue_after: float | None = None,
    ) -> None:
        if reason and not _CAMEL.match(reason):
            raise ValueError(f"condition reason must be CamelCase: {reason!r}")
        self.status = wire_status(status)
        self.state = state
        self.reason = reason
        self.message = message
        self.requeue_after = requeue_after

    @classmethod
    def ready(
        cls,
        status: StatusFields = None,
        message: str = "",
        *,
        reason: str = "Ready",
        requeue_after: float | None = None,
    ) -> Outcome:
        return cls(status, "ready", reason, message, requeue_after)

    @classmethod
    def progressing(
        cls,
        reason: str,
        message: str,
        status: StatusFields = None,
        *,
        requeue_after: float | None = None,
    ) -> Outcome:
        return cls(status, "progressing", reason, message, requeue_after)

    @classmethod
    def stalled(cls, reason: str, message: str, status: StatusFields = None) -> Outcome:
        return cls(status, "stalled", reason, message)

    @classmethod
    def observed(cls, status: StatusFields, *, requeue_after: float | None = None) -> Outcome:
        """Status fields only, no conditions (node agents)."""
        return cls(status, None, requeue_after=requeue_after)


class Stall(Failure):
    """Raised from deep inside a converge function: the object cannot make
    progress until someone changes it (bad input, exhausted pool)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, reason=reason, retryable=False)


class Wait(Failure):
    """Raised when something the object needs is not there yet."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message, reason=reason, retryable=True)
        self.retry_after = retry_after


def conditions_for(
    outcome: Outcome, current: list[Condition], generation: int
) -> list[dict[str, Any]]:
    """kstatus conditions for an outcome, keeping transition times of
    conditions whose status did not change."""
    assert outcome.state is not None
    ready = outcome.state == "ready"
    wanted: list[tuple[str, str, str, str]] = [
        ("Ready", "True" if ready else "False", outcome.reason, outcome.message)
    ]
    if outcome.state == "progressing":
        wanted.append(("Reconciling", "True", outcome.reason, outcome.message))
    if outcome.state == "stalled":
        wanted.append(("Stalled", "True", outcome.reason, outcome.message))
    previous = {c.type: c for c in current}
    now = now_rfc3339()
    result = []
    for type_, status, reason, message in wanted:
        old = previous.get(type_)
        since = old.last_transition_time if old and old.status == status else None
        result.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": since or now,
            }
        )
    return result


def same_conditions(current: list[Condition], wanted: list[dict[str, Any]]) -> bool:
    def essence(c: dict[str, Any]) -> tuple[Any, ...]:
        return (
            c["type"],
            c["status"],
            c.get("reason", ""),
            c.get("message", ""),
            c.get("observedGeneration"),
        )

    return sorted(essence(c.wire()) for c in current) == sorted(essence(c) for c in wanted)


class Reconciler(Generic[R]):
    """Base of every reconciler. Subclasses set `kind` and implement converge."""

    kind: ClassVar[type[Resource[Any, Any]]]
    finalizer: str | None = None
    """The runtime adds it and removes it once `finalize` returns None. A
    reconciler without one still gets `finalize` called for objects being
    deleted (it may manage finalizers of its own)."""
    workers: ClassVar[int] = 4
    op: Operator

    def setup(self, op: Operator) -> None:
        """Declare the stores, indexes and watches this reconciler reads."""
        self.op = op

    def accepts(self, obj: R) -> bool:
        """Whether this process handles the object: by default the controller
        shard that owns its uid, so each object has exactly one writer even
        with several controller processes (agents filter by node instead)."""
        return self.op.owns_shard(obj.uid)

    async def converge(self, obj: R) -> Outcome:
        raise NotImplementedError

    async def finalize(self, obj: R) -> Outcome | None:
        """Clean up before deletion; None when done (the finalizer goes)."""
        return None

    async def forget(self, key: str) -> None:
        """The object is gone from the API; drop what is left of it."""
