"""Status writes as server-side apply, one field manager per writer.

The controller (every shard) writes as `nubes-controller`, each node agent as
`nubes-agent-<node>`. The API server records which manager owns which status
field, so a writer that strays onto another's field is refused with a
conflict instead of silently overwriting it.

An apply states the writer's whole part: a field it owned and leaves out is
removed. Writers compute changes, not whole parts, so the body is the fields
this manager already owns (from `metadata.managedFields`) with the changes
laid over them; a change to None removes that field, as a merge patch did.
An apply cannot remove a field another manager owns (a node agent clearing
what the node before it wrote, after a move): such a removal follows the
apply as a merge patch, once the owners are checked.
"""

from __future__ import annotations

from typing import Any

from nubes.api.meta import Resource
from nubes.runtime.kube import ApiError, Kube, path_of

CONTROLLER = "nubes-controller"
AGENT_PREFIX = "nubes-agent-"


def stale() -> ApiError:
    """The error of a write from an outdated view, as the API server gives it."""
    return ApiError(409, {"reason": "Conflict", "message": "the object has been modified"})


def owned_fields(managed_fields: list[dict[str, Any]], manager: str) -> set[str]:
    """The top-level status fields `manager` owns through its applies."""
    owned: set[str] = set()
    for entry in managed_fields:
        if entry.get("manager") == manager and entry.get("operation") == "Apply":
            owned |= _status_fields(entry)
    return owned


def owners_of(managed_fields: list[dict[str, Any]], fields: set[str]) -> set[str]:
    """The managers (any operation) owning any of these top-level status fields."""
    return {e.get("manager", "") for e in managed_fields if _status_fields(e) & fields}


def _status_fields(entry: dict[str, Any]) -> set[str]:
    if entry.get("subresource") != "status":
        return set()
    status = (entry.get("fieldsV1") or {}).get("f:status") or {}
    return {key[2:] for key in status if key.startswith("f:")}


def present(value: Any) -> Any:
    """`value` without None members: in an apply a null is no value (a merge
    patch read it as "remove"); leaving a member out removes it here."""
    if isinstance(value, dict):
        return {k: present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [present(v) for v in value]
    return value


def own_status_entry(manager: str, fields: set[str]) -> dict[str, Any]:
    """A managedFields entry saying `manager` owns these status fields (the
    compact form a cache keeps; see runtime.informer.compact)."""
    return {
        "manager": manager,
        "operation": "Apply",
        "subresource": "status",
        "fieldsV1": {"f:status": {f"f:{name}": {} for name in sorted(fields)}},
    }


def apply_body(obj: dict[str, Any], manager: str, changes: dict[str, Any]) -> dict[str, Any] | None:
    """The apply request for `changes` to the status of `obj` (a wire-form
    object as last read), with its resourceVersion as a precondition; None
    when the writer would own nothing afterwards and had nothing before."""
    meta = obj["metadata"]
    current = obj.get("status") or {}
    owned = owned_fields(meta.get("managedFields") or [], manager)
    status = {key: current[key] for key in owned if key in current}
    for key, value in changes.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = present(value)
    if not status and not owned:
        return None
    body_meta = {"name": meta["name"], "resourceVersion": meta["resourceVersion"]}
    if meta.get("namespace"):
        body_meta["namespace"] = meta["namespace"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": body_meta,
        "status": status,
    }


def conflicting_managers(error: ApiError) -> list[str] | None:
    """The managers named by a field-ownership conflict; None when `error` is
    another kind of failure (a stale resourceVersion is a 409 too)."""
    if error.status != 409 or not isinstance(error.body, dict):
        return None
    causes = (error.body.get("details") or {}).get("causes") or []
    conflicts = [c for c in causes if c.get("reason") == "FieldManagerConflict"]
    if not conflicts:
        return None
    managers = []
    for cause in conflicts:
        # 'conflict with "nubes-controller" using compute.nubes.io/v1alpha1'
        message = str(cause.get("message", ""))
        name = message.split('"')[1] if message.count('"') >= 2 else message
        if name not in managers:
            managers.append(name)
    return managers


class OwnedElsewhere(Exception):
    """A status write touched a field that another writer owns."""

    def __init__(self, owners: list[str], error: object):
        self.owners = owners
        super().__init__(f"status field owned by {', '.join(owners)}: {error}")


async def apply_status(
    kube: Kube,
    obj: Resource[Any, Any],
    changes: dict[str, Any],
    *,
    refresh_when_stale: bool = False,
) -> bool:
    """Write `changes` to the status of `obj` under this client's field
    manager; False when the object is gone. `obj` as cached may be stale:
    the write then fails with a 409 (the caller reconciles the newer
    version), or with `refresh_when_stale` is redone on the object as read
    now. Raises OwnedElsewhere rather than take a field from another
    writer that may not be taken over."""
    kind = type(obj)
    wire = {**obj.wire(), "apiVersion": kind.crd.api_version, "kind": kind.crd.kind}
    manager = kube.field_manager
    for attempt in range(3):
        body = apply_body(wire, manager, changes)
        current = wire.get("status") or {}
        owned = owned_fields(wire["metadata"].get("managedFields") or [], manager)
        foreign = {k for k, v in changes.items() if v is None and k in current and k not in owned}
        try:
            written = await _apply(kube, kind, body) if body is not None else wire
            if foreign:
                await _remove(kube, kind, written, foreign)
            return True
        except ApiError as e:
            if e.not_found:
                return False
            stale = e.conflict and conflicting_managers(e) is None
            if not (refresh_when_stale and stale and attempt < 2):
                raise
        fresh = await kube.get_raw(path_of(kind), obj.name, obj.namespace)
        if fresh is None:
            return False
        wire = fresh
    raise AssertionError("unreachable")


async def _remove(
    kube: Kube, kind: type[Resource[Any, Any]], seen: dict[str, Any], fields: set[str]
) -> None:
    """Remove status fields other managers own, as of the version `seen`
    (what this writer decided from): read again for the owners (a cache
    keeps only its own), refuse owners that may not be taken over, and
    merge-patch them away with that version as a precondition."""
    meta = seen["metadata"]
    fresh = await kube.get_raw(path_of(kind), meta["name"], meta.get("namespace"))
    if fresh is None:
        return
    version = meta["resourceVersion"]
    if fresh["metadata"]["resourceVersion"] != version:
        raise stale()
    owners = owners_of(fresh["metadata"].get("managedFields") or [], fields)
    refused = sorted(m for m in owners if not may_take_over(kube.field_manager, m))
    if refused:
        raise OwnedElsewhere(refused, f"may not remove {', '.join(sorted(fields))}")
    patch = {"metadata": {"resourceVersion": version}, "status": dict.fromkeys(fields)}
    await kube.patch_raw(
        path_of(kind), meta["name"], patch, meta.get("namespace"), subresource="status"
    )


async def _apply(
    kube: Kube, kind: type[Resource[Any, Any]], body: dict[str, Any]
) -> dict[str, Any]:
    try:
        return await kube.apply_status(kind, body, force=False)
    except ApiError as e:
        others = conflicting_managers(e)
        if others is None:
            raise
        # The API server judges ownership before the resourceVersion: a
        # conflict may come from a stale view, which must not be forced.
        meta = body["metadata"]
        now = await kube.get_raw(path_of(kind), meta["name"], meta.get("namespace"))
        if now is None or now["metadata"]["resourceVersion"] != meta["resourceVersion"]:
            raise stale() from e
        refused = [m for m in others if not may_take_over(kube.field_manager, m)]
        if refused:
            raise OwnedElsewhere(refused, e) from e
        return await kube.apply_status(kind, body, force=True)


def role(manager: str) -> str:
    if manager == CONTROLLER or manager.startswith(CONTROLLER + "-"):
        return "controller"
    if manager.startswith(AGENT_PREFIX):
        return "agent"
    return "other"


def may_take_over(manager: str, other: str) -> bool:
    """Whether `manager` may force its write over a field `other` owns: an
    agent takes over from another node's agent (the object moved), a writer
    from its own earlier form (shard names, merge patches) and from people
    and tools editing status by hand; never the controller from an agent or
    an agent from the controller."""
    return role(other) in (role(manager), "other")
