"""The contract every volume backend keeps (Cinder's volume-driver split).

A backend is a small required core (`VolumeBackend`) plus optional
capabilities, each its own protocol (`ImageImport`, `SnapshotRevert`), so a
caller asks `isinstance(backend, ImageImport)` instead of catching
NotImplementedError. Creating a volume never exports it; exporting is the
iSCSI target driver's job (nubes.drivers.iscsi.tgt), fed by `volume_path`.

Ids are caller-given strings (the agent passes Kubernetes uids); backends map
them to their own names and never hand out other ids. Every verb is
idempotent: create returns the existing object, delete succeeds when it is
already gone, so an interrupted call can simply be repeated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from nubes.drivers.problem import Failure

GIB = 1024**3
MIB = 1024**2

# Safe as a file name, an LV name and part of an IQN: no '/', no leading '.'
# or '-', bounded length (LV names stop at 127 characters with our prefixes).
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class StorageError(Failure):
    """Base of every typed storage error; `str(e)` is a message for people."""

    reason = "StorageFailed"


class InvalidId(StorageError, ValueError):
    reason = "InvalidId"
    retryable = False

    def __init__(self, kind: str, value: str) -> None:
        self.kind = kind
        self.value = value
        super().__init__(
            f"{kind} id {value!r} is not usable: use 1-100 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )


class NotFound(StorageError):
    """What the work needs (a source snapshot or volume) is not there."""

    reason = "SourceMissing"

    def __init__(self, kind: str, ident: str, where: str = "") -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident} does not exist" + (f" in {where}" if where else ""))


class VolumeBusy(StorageError):
    reason = "VolumeBusy"

    def __init__(self, volume_id: str, why: str) -> None:
        self.volume_id = volume_id
        self.why = why
        super().__init__(f"volume {volume_id} is busy: {why}")


class NoSpace(StorageError):
    reason = "InsufficientSpace"
    retryable = False

    def __init__(self, what: str, needed_gib: float, free_gib: float, pool: str) -> None:
        self.needed_gib = needed_gib
        self.free_gib = free_gib
        super().__init__(
            f"not enough space in pool {pool} for {what}: needs {needed_gib:.2f} GiB,"
            f" {free_gib:.2f} GiB free"
        )


class ShrinkRefused(StorageError):
    reason = "ShrinkRefused"
    retryable = False

    def __init__(self, volume_id: str, current_gib: int, requested_gib: int) -> None:
        self.current_gib = current_gib
        self.requested_gib = requested_gib
        super().__init__(
            f"volume {volume_id} is {current_gib} GiB; shrinking to {requested_gib} GiB"
            " would lose data, so volumes only grow"
        )


class ImageRejected(StorageError):
    """An image that must not be copied into a volume (unsafe or too large)."""

    reason = "ImageRejected"
    retryable = False


class BackendUnavailable(StorageError):
    """The backend cannot work on this node (missing kernel feature, tool, pool)."""

    reason = "BackendUnavailable"


def check_id(kind: str, value: str) -> str:
    if not _ID.fullmatch(value):  # fullmatch: `$` would let a trailing "\n" through
        raise InvalidId(kind, value)
    return value


def check_size(size_gib: int) -> int:
    if isinstance(size_gib, bool) or not isinstance(size_gib, int) or size_gib < 1:
        raise StorageError(f"size must be a whole number of GiB, at least 1 (got {size_gib!r})")
    return size_gib


@dataclass(frozen=True)
class VolumeInfo:
    id: str
    size_gib: int
    path: str
    """Where the data is: a file or a block device, for export and copies."""
    allocated_bytes: int | None = None
    """Space the volume really uses (thin backends); None when unknown."""


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    volume_id: str
    size_gib: int
    path: str
    allocated_bytes: int | None = None


Capability = bool | int | float | str


@dataclass(frozen=True)
class PoolStats:
    """What the scheduler's capacity and capabilities filters look at."""

    backend_name: str
    """`volume_backend_name` a VolumeType may ask for."""
    pool_name: str
    total_gib: float
    free_gib: float
    provisioned_gib: float
    """Sum of the sizes of all volumes and snapshots (thin: may exceed total)."""
    total_volumes: int
    capabilities: dict[str, Capability] = field(default_factory=dict)
    """Cinder-style capability keys, e.g. thin_provisioning_support: True."""


@runtime_checkable
class VolumeBackend(Protocol):
    """The required core. Sizes are whole GiB; ids are caller-given."""

    backend_name: str
    pool_name: str

    def create_volume(self, volume_id: str, size_gib: int) -> VolumeInfo:
        """A blank (all-zero) volume. Idempotent: an existing one is returned as is.

        Raises NoSpace when the pool cannot hold it."""
        ...

    def delete_volume(self, volume_id: str) -> None:
        """Overwrite the volume's data with zeros, then free it.

        Succeeds when the volume is already gone (and finishes a wipe an
        earlier call left half done). Raises VolumeBusy while the volume is
        open elsewhere (exported, attached) or still has snapshots."""
        ...

    def extend_volume(self, volume_id: str, new_size_gib: int) -> VolumeInfo:
        """Grow to new_size_gib; the same size is a no-op.

        Raises ShrinkRefused for a smaller size, VolumeBusy while in use."""
        ...

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        """A point-in-time copy of the volume. Idempotent."""
        ...

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Wipe and free a snapshot; succeeds when already gone."""
        ...

    def create_volume_from_snapshot(
        self, volume_id: str, snapshot_id: str, size_gib: int | None = None
    ) -> VolumeInfo:
        """A new volume with the snapshot's data, grown to size_gib if larger."""
        ...

    def clone_volume(
        self, volume_id: str, source_volume_id: str, size_gib: int | None = None
    ) -> VolumeInfo:
        """A new volume with another volume's current data."""
        ...

    def volume_path(self, volume_id: str) -> str:
        """The file or device holding the volume's data; raises NotFound."""
        ...

    def get_volume(self, volume_id: str) -> VolumeInfo | None: ...

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo | None: ...

    def list_volumes(self) -> list[VolumeInfo]:
        """Everything the backend holds, read from the backend itself, so a
        restarted agent re-adopts what exists."""
        ...

    def list_snapshots(self) -> list[SnapshotInfo]: ...

    def pool_stats(self) -> PoolStats: ...


@runtime_checkable
class ImageImport(Protocol):
    """Optional: fill a volume from an image file (`qemu-img convert -f FMT -O raw`)."""

    def copy_image_to_volume(
        self, volume_id: str, image_path: str, image_format: str
    ) -> VolumeInfo:
        """Copy an image of the given qemu format ("raw", "qcow2", ...) into the
        volume. The caller declares the format after inspecting the image;
        the backend re-checks with qemu-img and raises ImageRejected when the
        image is unsafe or larger than the volume."""
        ...


@runtime_checkable
class SnapshotRevert(Protocol):
    """Optional: put a volume back to a snapshot's contents in place."""

    def revert_to_snapshot(self, volume_id: str, snapshot_id: str) -> VolumeInfo:
        """Raises VolumeBusy while the volume is in use."""
        ...
