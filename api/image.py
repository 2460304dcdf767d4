"""image.nubes.io: Glance images."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from .meta import (
    AGE_COLUMN,
    CATEGORY,
    READY_COLUMN,
    REASON_COLUMN,
    ApiModel,
    CrdInfo,
    Immutable,
    PrinterColumn,
    Resource,
    Rule,
    Status,
    cel,
    validations,
)

GROUP = "image.nubes.io"

DiskFormat = Literal["qcow2", "raw"]
Visibility = Literal["private", "shared", "public"]


class ImageSource(ApiModel):
    """Where the image data comes from: exactly one of url and snapshot."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.url) != has(self.snapshot)",
                "give exactly one of url and snapshot",
            ),
        )
    )

    url: Annotated[
        str | None,
        Field(max_length=2048),
        Rule(
            "self.startsWith('http://') || self.startsWith('https://')"
            " || self.startsWith('file:///')",
            "url must be http://, https:// or file:///",
        ),
    ] = None
    """An http(s) URL the controller fetches. The operator decides which
    destinations are allowed: by default only public addresses (no loopback,
    link-local, private or cluster addresses), checked after name resolution
    and on every redirect, with a size limit and a deadline. file:/// URLs
    are for cloud administrators only and read below the operator's import
    directory."""
    snapshot: Annotated[str | None, Field(max_length=253)] = None
    """Name of a Snapshot InstanceAction in this namespace whose disk this
    image holds (set by the controller when a snapshot finishes)."""


class ImageSpec(ApiModel):
    """A disk image instances boot from."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.sharedWith) || self.visibility == 'shared'"
                " || size(self.sharedWith) == 0",
                "sharedWith is only allowed with visibility shared",
                field_path=".sharedWith",
            ),
        )
    )

    source: Annotated[ImageSource, Immutable("source")]
    """Image data location."""
    disk_format: Annotated[DiskFormat, Immutable("diskFormat")]
    """qcow2 or raw. The data must be in this format: images whose inspected
    format differs are rejected."""
    container_format: Literal["bare"] = "bare"
    """Only bare images are supported."""
    sha256: Annotated[
        str | None, Field(pattern=r"^[0-9a-f]{64}$", max_length=64), Immutable("sha256")
    ] = None
    """Expected SHA-256 of the data; the import fails on mismatch."""
    visibility: Visibility = "private"
    """private: this project; shared: also the projects in sharedWith;
    public: every project."""
    shared_with: list[Annotated[str, Field(min_length=1, max_length=63)]] = Field(
        default_factory=list, max_length=256
    )
    """Project names the image is shared with (visibility shared)."""
    protected: bool = False
    """Protected images cannot be deleted."""
    min_disk_gib: int = Field(default=0, ge=0)
    """Smallest root disk the image boots from."""
    min_ram_mib: int = Field(default=0, ge=0)
    """Smallest RAM the image boots with."""
    properties: dict[str, Annotated[str, Field(max_length=255)]] = Field(
        default_factory=dict, json_schema_extra={"maxProperties": 64}
    )
    """Free-form image properties (e.g. hw_disk_bus)."""


class ImageStatus(Status):
    format: str | None = None
    """Format found by inspection."""
    size_bytes: int | None = None
    """Stored size."""
    virtual_size_bytes: int | None = None
    """Size of the disk the image expands to."""
    sha256: str | None = None
    """SHA-256 of the stored data (only once verified)."""


class Image(Resource[ImageSpec, ImageStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Image",
        plural="images",
        short_names=("img",),
        categories=(CATEGORY, "glance"),
        description="A Glance image: a verified, inspected disk image.",
        printer_columns=(
            PrinterColumn("Format", ".spec.diskFormat"),
            PrinterColumn("Visibility", ".spec.visibility"),
            PrinterColumn("Size", ".status.sizeBytes", "integer"),
            PrinterColumn("Protected", ".spec.protected", "boolean", priority=1),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: ImageSpec
    status: ImageStatus = Field(default_factory=ImageStatus)
