"""Image: import into the image store (checksum, header inspection, qemu-img
cross-check), and who may use it."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

from nubes.api.compute import InstanceAction
from nubes.api.identity import Project
from nubes.api.image import Image, ImageStatus
from nubes.api.meta import ProjectRef
from nubes.controllers import quota
from nubes.controllers.config import ControllerConfig
from nubes.controllers.image_import import ImportPool
from nubes.controllers.indexes import index_projects
from nubes.drivers.images.cache import ImageCacheError
from nubes.drivers.images.fetch import FetchError
from nubes.drivers.images.store import ImageStore, InvalidStoreRef, StoredImage
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait


def project_of_namespace(op: Operator, namespace: str) -> str:
    """The project owning a namespace (its name), or the namespace itself."""
    for project in op.store(Project).by_index("namespace", namespace):
        name: str = project.name
        return name
    return namespace


def visible(image: Image, namespace: str, project: str) -> bool:
    """Glance's visibility rules for a consumer in `namespace`."""
    if image.namespace == namespace or image.spec.visibility == "public":
        return True
    return image.spec.visibility == "shared" and project in image.spec.shared_with


def resolve_image(op: Operator, ref: ProjectRef, namespace: str) -> Image:
    """The usable image a reference names, or Stall/Wait saying why not."""
    target_ns = ref.namespace or namespace
    image: Image | None = op.store(Image).lookup(ref.name, target_ns)
    if image is None or image.deleting:
        raise Stall("ImageNotFound", f"image {target_ns}/{ref.name} does not exist")
    if not visible(image, namespace, project_of_namespace(op, namespace)):
        raise Stall(
            "ImageNotVisible", f"image {target_ns}/{ref.name} is not shared with this project"
        )
    if image.status.is_true("Stalled"):
        cond = image.status.condition("Stalled")
        why = cond.message if cond else ""
        raise Stall("ImageNotUsable", f"image {target_ns}/{ref.name} failed to import: {why}")
    if not image.status.is_true("Ready"):
        raise Wait("WaitingForImage", f"image {target_ns}/{ref.name} is being imported", 5)
    return image


class ImageReconciler(Reconciler[Image]):
    kind = Image
    finalizer = "image.nubes.io/store"
    workers = 2

    def __init__(self, config: ControllerConfig):
        self.store = ImageStore(config.image_store, SubprocessRunner(), config.fetch_policy())
        self.imports = ImportPool(config.image_import_parallel)
        # Failures only a new Image can fix (the source is immutable): kept,
        # so a refused or oversized source is not fetched again and again.
        self.failed: dict[str, Stall] = {}
        # Sizes of images refused for imageSizeMib once fetched: not fetched
        # again until their project has room for them.
        self.refused_sizes: dict[str, int] = {}

    def setup(self, op: Operator) -> None:
        super().setup(op)
        index_projects(op)
        quota.requeue_refused(op, Image)

    async def converge(self, obj: Image) -> Outcome:
        s = obj.status
        path = self.store.path_of(obj.uid)
        imported = s.is_true("Ready") and s.size_bytes is not None
        if imported and await asyncio.to_thread(_present, path, s.size_bytes or 0):
            # Recorded without a check: the data is in the store already.
            held = quota.image_amounts(s.size_bytes or 0)
            await quota.hold(self.op, obj, held, held=held, what="image")
            return Outcome.ready(message=self._summary(s.format, s.virtual_size_bytes))
        if obj.uid in self.failed:
            raise self.failed[obj.uid]
        finished = self.imports.poll(obj.uid)
        if finished is None:
            if not self.imports.running(obj.uid):
                self._room_for(obj)
                self._start(obj)
            return Outcome.progressing("Importing", "fetching, verifying and inspecting the data")
        if finished.error is not None:
            problem = _problem(finished.error)
            if isinstance(problem, Stall):
                self.failed[obj.uid] = problem
            raise problem from finished.error
        stored = finished.stored
        assert stored is not None
        try:
            await quota.hold(self.op, obj, quota.image_amounts(stored.size), what="image")
        except Stall:
            self.refused_sizes[obj.uid] = stored.size
            await asyncio.to_thread(self.store.delete, obj.uid)
            raise
        self.refused_sizes.pop(obj.uid, None)
        status = ImageStatus(
            format=stored.format,
            size_bytes=stored.size,
            virtual_size_bytes=stored.virtual_size,
            sha256=stored.sha256,
        )
        return Outcome.ready(status, self._summary(stored.format, stored.virtual_size))

    def _room_for(self, obj: Image) -> None:
        """Like Glance, refuse before fetching when the project's image data
        already fills its quota (the data's real size is checked after), or
        leaves too little for the size this image was refused with."""
        project = quota.project_for(self.op, obj.namespace)
        if project is None:
            return
        limit = quota.limit_of(project.spec.quotas, "image_size_mib")
        used = quota.totals(project.status.reservations, without=obj.uid).image_size_mib
        known = self.refused_sizes.get(obj.uid)
        need = 1 if known is None else quota.image_amounts(known).image_size_mib
        if limit is not None and used + need > limit:
            left = "none left for this image" if known is None else f"this image needs {need}"
            raise Stall(quota.REASON, f"imageSizeMib: {used} of {limit} in use, {left}")

    def _start(self, obj: Image) -> None:
        """Start the import (idempotent: data already in the store is
        re-checked, not fetched again)."""
        src = obj.spec.source
        fmt, sha = obj.spec.disk_format, obj.spec.sha256
        if src.snapshot is not None:
            ref, sha = self._snapshot_ref(obj, src.snapshot)
            origin = "store"

            def job() -> StoredImage:
                return self.store.import_internal(obj.uid, ref, fmt, sha)
        else:
            url = src.url or ""
            origin = urlsplit(url).hostname or "file"

            def job() -> StoredImage:
                return self.store.import_url(obj.uid, url, fmt, sha)

        key = obj.key
        self.imports.start(obj.uid, origin, job, lambda: self.op.enqueue(Image, key))

    def _snapshot_ref(self, obj: Image, action_name: str) -> tuple[str, str]:
        action: InstanceAction | None = self.op.store(InstanceAction).lookup(
            action_name, obj.namespace
        )
        if action is None or action.spec.action != "Snapshot":
            raise Stall("SnapshotNotFound", f"no Snapshot action {action_name} in this project")
        transfer = action.status.transfer
        if transfer is None:
            raise Wait("WaitingForSnapshot", f"snapshot {action_name} is not finished", 5)
        return transfer.ref, transfer.sha256

    @staticmethod
    def _summary(fmt: str | None, virtual_size: int | None) -> str:
        gib = (virtual_size or 0) / 2**30
        return f"{fmt}, {gib:.2f} GiB virtual, verified and inspected"

    async def finalize(self, obj: Image) -> Outcome | None:
        self.imports.cancel(obj.uid)
        self.failed.pop(obj.uid, None)
        self.refused_sizes.pop(obj.uid, None)
        await asyncio.to_thread(self.store.delete, obj.uid)
        return None


def _problem(error: Exception) -> Stall | Wait:
    """Policy refusals, bad data and limits stall (only a new image helps);
    network trouble is retried."""
    if isinstance(error, FetchError) and error.retryable:
        return Wait(error.reason, str(error), 30)
    if isinstance(error, FetchError | ImageCacheError | InvalidStoreRef):
        return Stall(error.reason, str(error))
    if isinstance(error, OSError):
        return Wait("ImageFetchFailed", f"cannot read the source: {error.strerror or error}", 30)
    raise error


def _present(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False
