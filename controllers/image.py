"""Image: import into the image store (checksum, header inspection, qemu-img
cross-check), and who may use it."""

from __future__ import annotations

import asyncio
import os

from nubes.api.identity import Project
from nubes.api.image import Image
from nubes.api.meta import ProjectRef
from nubes.controllers.config import ControllerConfig
from nubes.drivers.images.cache import ImageCacheError, ImageFetchError
from nubes.drivers.images.store import ImageStore
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
        self.store = ImageStore(config.image_store, SubprocessRunner())

    def setup(self, op: Operator) -> None:
        super().setup(op)
        op.store(Project).add_index("namespace", lambda p: [p.status.namespace or p.name])

    def accepts(self, obj: Image) -> bool:
        return self.op.owns_shard(obj.uid)

    async def converge(self, obj: Image) -> Outcome:
        s = obj.status
        imported = s.is_true("Ready") and s.store_path and s.size_bytes is not None
        if imported and await asyncio.to_thread(_present, s.store_path or "", s.size_bytes or 0):
            return Outcome.ready(message=self._summary(s.format, s.virtual_size_bytes))
        try:
            # Idempotent: an image already in the store is re-checked, not re-fetched.
            stored = await asyncio.to_thread(
                self.store.import_image,
                obj.uid,
                obj.spec.source.url,
                obj.spec.disk_format,
                obj.spec.sha256,
            )
        except ImageFetchError as e:
            raise Wait(e.reason, str(e), 30) from e
        except ImageCacheError as e:
            raise Stall(e.reason, str(e)) from e
        status = {
            "format": stored.format,
            "sizeBytes": stored.size,
            "virtualSizeBytes": stored.virtual_size,
            "sha256": stored.sha256,
            "storePath": stored.path,
        }
        return Outcome.ready(status, self._summary(stored.format, stored.virtual_size))

    @staticmethod
    def _summary(fmt: str | None, virtual_size: int | None) -> str:
        gib = (virtual_size or 0) / 2**30
        return f"{fmt}, {gib:.2f} GiB virtual, verified and inspected"

    async def finalize(self, obj: Image) -> Outcome | None:
        await asyncio.to_thread(self.store.delete, obj.uid)
        return None


def _present(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False
