"""Shared building blocks of every kind: metadata, conditions, CRD facts.

Conditions follow kstatus: `Ready`, plus the abnormal-true `Reconciling` and
`Stalled`. A reason is a CamelCase token; a message is for people.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, docstrings as docs.

    Unknown fields are ignored when parsing so that an older process can read
    objects written by a newer one.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
    )

    def wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, no unset Nones)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def patch(self) -> dict[str, Any]:
        """The fields set explicitly, for a status write: camelCase, and an
        explicit None kept (a merge patch clears that field)."""
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")


def cel(
    rule: str,
    message: str | None = None,
    *,
    message_expression: str | None = None,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule}
    if message:
        entry["message"] = message
    if message_expression:
        entry["messageExpression"] = message_expression
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """A model's `json_schema_extra` carrying CEL rules on the whole object."""
    return {"x-kubernetes-validations": list(rules)}


@dataclass(frozen=True)
class Rule:
    """CEL rule on a field, as `Annotated` metadata.

    Field rules are metadata rather than `json_schema_extra` so that several of
    them (a reusable type's and the field's own) add up instead of replacing
    one another.
    """

    rule: str
    message: str | None = None
    message_expression: str | None = None
    field_path: str | None = None

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        entry = cel(
            self.rule,
            self.message,
            message_expression=self.message_expression,
            field_path=self.field_path,
        )
        schema.setdefault("x-kubernetes-validations", []).append(entry)
        return schema


def Immutable(name: str) -> Rule:
    """A field that may not change once set."""
    return Rule("self == oldSelf", f"{name} is immutable")


class ObjectMeta(ApiModel):
    """The subset of Kubernetes object metadata the reconcilers read."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    namespace: str | None = None
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    owner_references: list[dict[str, Any]] = Field(default_factory=list)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A kstatus condition."""

    type: str
    """Condition type: Ready, Reconciling, Stalled or a kind-specific one."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(default="", pattern=r"^([A-Z][A-Za-z0-9]*)?$")
    """A CamelCase token a program can match on."""
    message: str = ""
    """What happened, for people."""
    observed_generation: int | None = None
    """The metadata.generation this condition describes."""
    last_transition_time: str | None = None
    """When status last changed."""


class NodeProblem(ApiModel):
    """Written by a node agent: why it cannot do what the object asks. The
    controller shows it in the object's conditions (Reconciling while the
    agent retries, Stalled when it waits for a change). Reasons are listed in
    the README's table of problems."""

    reason: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$")
    """A CamelCase token, one per failure cause, e.g. ImageFetchFailed."""
    message: str
    """What went wrong, for people."""
    retryable: bool = True
    """The agent tries again by itself; false means it waits for a change."""
    node: str | None = None
    """The node whose agent reports it."""


CONDITIONS_SCHEMA_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class Status(ApiModel):
    """Fields every status carries."""

    observed_generation: int | None = None
    """The metadata.generation the controller last acted on."""
    conditions: list[Condition] = Field(
        default_factory=list, json_schema_extra=CONDITIONS_SCHEMA_EXTRA
    )
    """kstatus conditions: Ready, Reconciling, Stalled and kind-specific ones."""

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def is_true(self, type_: str) -> bool:
        found = self.condition(type_)
        return found is not None and found.status == "True"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def now_precise() -> str:
    """RFC 3339 with microseconds, for ordering events within a second."""
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def seconds_since(timestamp: str | None) -> float | None:
    """Age of an RFC 3339 timestamp, None when absent or unreadable."""
    if not timestamp:
        return None
    try:
        then = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt.datetime.now(dt.UTC) - then).total_seconds()


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class CrdInfo:
    """What the CRD generator needs beyond the schema."""

    group: str
    kind: str
    plural: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    scope: Literal["Namespaced", "Cluster"] = "Namespaced"
    printer_columns: tuple[PrinterColumn, ...] = ()
    version: str = "v1alpha1"
    description: str = ""
    # Rules on the whole spec (cross-field checks).
    spec_validations: tuple[dict[str, str], ...] = field(default_factory=tuple)
    # Field selectors the API server answers (JSON paths of scalar fields): the
    # node fields by which node agents watch only their node's objects.
    selectable_fields: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


SpecT = TypeVar("SpecT", bound=ApiModel)
StatusT = TypeVar("StatusT", bound=Status)


class Resource(ApiModel, Generic[SpecT, StatusT]):
    """A custom resource: metadata, the user's spec, our status."""

    crd: ClassVar[CrdInfo]

    api_version: str = ""
    kind: str = ""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: SpecT
    status: StatusT

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace

    @property
    def uid(self) -> str:
        return self.metadata.uid

    @property
    def key(self) -> str:
        """`namespace/name`, or `name` for cluster-scoped kinds."""
        if self.metadata.namespace:
            return f"{self.metadata.namespace}/{self.metadata.name}"
        return self.metadata.name

    @property
    def deleting(self) -> bool:
        return self.metadata.deletion_timestamp is not None

    @property
    def generation(self) -> int:
        return self.metadata.generation


CATEGORY = "nubes"
READY_COLUMN = PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status')
REASON_COLUMN = PrinterColumn("Reason", '.status.conditions[?(@.type=="Ready")].reason', priority=1)
AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


class LocalRef(ApiModel):
    """A reference to an object in the same namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the referenced object."""


class ProjectRef(ApiModel):
    """A reference to an object, optionally in another project's namespace.

    Cross-project references are honoured only where OpenStack allows them
    (shared or external networks, public or shared images); the controller
    checks and reports a Stalled condition otherwise.
    """

    name: str = Field(min_length=1, max_length=253)
    """Name of the referenced object."""
    namespace: str | None = Field(default=None, max_length=63)
    """Namespace of the owning project; defaults to this object's namespace."""
