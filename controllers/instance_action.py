"""InstanceAction: a one-shot operation kept as a record with its outcome.

The controller validates the action against the instance (lock, state,
flavor, image, a target node chosen by the scheduler for moves) and records
the plan in status; the node agents carry it out and report. A Snapshot ends
with a new Image, created here from the flattened disk the agent left in the
image store. Actions of one instance run one at a time, oldest first.
"""

from __future__ import annotations

import asyncio

from nubes.api.compute import (
    ActionResources,
    Flavor,
    Instance,
    InstanceAction,
    InstanceActionStatus,
)
from nubes.api.image import Image
from nubes.api.meta import ProjectRef
from nubes.controllers.access import index_projects, require_flavor
from nubes.controllers.compute_scheduler import Choice, RequestSpec, schedule
from nubes.controllers.config import ControllerConfig
from nubes.controllers.image import resolve_image
from nubes.controllers.indexes import index_actions
from nubes.controllers.instance import host_states, request_for, root_disk_gib
from nubes.controllers.intent import GIB, image_source
from nubes.controllers.lifecycle import effective
from nubes.controllers.quota import REASON as QUOTA_REASON
from nubes.controllers.quota import (
    Amounts,
    covers,
    hold,
    instance_amounts,
    project_for,
    release,
    requeue_refused,
    resize_amounts,
)
from nubes.drivers.images.store import ImageStore
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import ApiError, path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait

# These move or replace the local root disk, which a volume-backed instance has not.
VOLUME_BACKED_UNSUPPORTED = ("Snapshot", "Rebuild", "Rescue", "Migrate", "Resize")


def queue_of(op: Operator, action: InstanceAction) -> list[InstanceAction]:
    """Unfinished actions of the same instance, oldest first."""
    same = op.store(InstanceAction).by_index(
        "instance", f"{action.namespace}/{action.spec.instance}"
    )
    return sorted(
        (a for a in same if not a.status.completed_at and not a.deleting),
        key=lambda a: (a.metadata.creation_timestamp or "", a.name),
    )


class InstanceActionReconciler(Reconciler[InstanceAction]):
    kind = InstanceAction
    workers = 4

    def __init__(self, config: ControllerConfig):
        # Only to remove the agent's snapshot file once its image is imported.
        self.store = ImageStore(config.image_store, SubprocessRunner())

    def setup(self, op: Operator) -> None:
        super().setup(op)
        actions = op.store(InstanceAction)
        index_actions(op)
        actions.add_index("flavor", lambda a: [a.spec.flavor] if a.spec.flavor else [])
        op.store(Flavor)
        index_projects(op)
        requeue_refused(op, InstanceAction)
        # A Resize refused for its flavor's access list goes on once it is granted.
        op.watch(
            Flavor,
            InstanceAction,
            lambda f: [a.key for a in actions.by_index("flavor", f.name) if not a.status.flavor],
        )
        op.watch(
            Instance, InstanceAction, lambda i: [a.key for a in actions.by_index("instance", i.key)]
        )
        op.watch(
            Image,
            InstanceAction,
            lambda img: [
                a.key
                for a in actions
                if a.namespace == img.namespace and a.spec.image_name == img.name
            ],
        )
        # The next action in line starts when the one before it finishes.
        op.watch(
            InstanceAction,
            InstanceAction,
            lambda a: [
                x.key for x in actions.by_index("instance", f"{a.namespace}/{a.spec.instance}")
            ],
            when=lambda old, new: (
                (old and old.status.completed_at) != (new and new.status.completed_at)
            ),
        )

    async def converge(self, obj: InstanceAction) -> Outcome:
        if obj.status.completed_at:
            if not self._handed_over(obj):
                return Outcome.progressing(
                    "HandingOverQuota",
                    "the instance takes over the cores and RAM this resize reserved",
                    requeue_after=1,
                )
            await release(self.op, obj)
            return await self._finished(obj)
        inst: Instance | None = self.op.store(Instance).lookup(obj.spec.instance, obj.namespace)
        if inst is None or inst.deleting:
            await release(self.op, obj)
            raise Stall("InstanceNotFound", f"instance {obj.spec.instance} does not exist")
        plan = self._plan(obj, inst)
        if obj.spec.action == "Resize":
            # The growth is reserved before the Resize is accepted (Nova's upsize
            # check); once accepted it is held until the action completes.
            old = self.op.store(Flavor).lookup(inst.status.flavor or inst.spec.flavor)
            new = self.op.store(Flavor).lookup(plan.flavor or "")
            assert new is not None  # _plan checked it
            grow = resize_amounts(old, new)
            held = grow if obj.status.flavor else Amounts()
            await hold(self.op, obj, grow, held=held, what="resize")
        queue = queue_of(self.op, obj)
        if queue and queue[0].uid != obj.uid:
            return Outcome.progressing("Queued", f"waiting behind action {queue[0].name}", plan)
        what = f"{obj.spec.action} of {inst.name}"
        if obj.status.started_at:
            return Outcome.progressing(
                "InProgress", f"{what} is running on {plan.source_node}", plan
            )
        return Outcome.progressing("Pending", f"{what} handed to node {plan.source_node}", plan)

    def _handed_over(self, obj: InstanceAction) -> bool:
        """What a done Resize reserved is the instance's own once its ledger
        entry covers the new flavor: given back before, another instance
        waiting for quota could take it while the resized one then records
        its new size unchecked (it runs with it already)."""
        if obj.spec.action != "Resize" or obj.status.error is not None or not obj.status.flavor:
            return True
        project = project_for(self.op, obj.namespace)
        inst = self.op.store(Instance).lookup(obj.spec.instance, obj.namespace)
        flavor = self.op.store(Flavor).lookup(obj.status.flavor)
        if project is None or inst is None or inst.deleting or flavor is None:
            return True
        if obj.uid not in project.status.reservations:
            return True  # given back already
        actions = self.op.store(InstanceAction).by_index("instance", inst.key)
        if effective(inst, actions).flavor != flavor.name:
            return True  # a later resize took over
        # What the instance holds with it (nothing when shelved and offloaded).
        want, _ = instance_amounts(inst, flavor)
        return covers(project.status.reservations, inst.uid, want)

    def _plan(self, obj: InstanceAction, inst: Instance) -> InstanceActionStatus:
        """Validate and fix the plan (sticky once recorded)."""
        s = obj.status
        if inst.spec.locked and not s.source_node:
            raise Stall(
                "InstanceLocked",
                f"instance {inst.name} is locked"
                + (f" ({inst.spec.lock_reason})" if inst.spec.lock_reason else "")
                + "; unlock it to act on it",
            )
        source = s.source_node or inst.status.node
        if source is None:
            raise Wait("InstanceNotPlaced", f"instance {inst.name} is not on a node", 5)
        if inst.spec.power_state == "Shelved":
            raise Stall("InstanceShelved", f"instance {inst.name} is shelved; unshelve it first")
        if inst.spec.boot_volume is not None and obj.spec.action in VOLUME_BACKED_UNSUPPORTED:
            raise Stall(
                "NotSupportedForVolumeBackedInstances",
                f"{obj.spec.action} is not supported for instances booted from a volume yet;"
                " snapshot or back up the volume instead",
            )
        plan = InstanceActionStatus(
            source_node=source, target_node=s.target_node or source, flavor=s.flavor, image=s.image
        )
        action = obj.spec.action
        if action == "Resize":
            assert obj.spec.flavor is not None
            flavor = self.op.store(Flavor).lookup(obj.spec.flavor)
            if flavor is None:
                raise Stall("FlavorNotFound", f"flavor {obj.spec.flavor} does not exist")
            if not s.flavor:  # not yet accepted
                require_flavor(self.op, flavor, inst.namespace or "")
            if flavor.name == inst.status.flavor:
                raise Stall("SameFlavor", f"instance {inst.name} already has flavor {flavor.name}")
            plan.flavor = flavor.name
            # What the node builds from: the new flavor, resolved here once.
            disk_gib = root_disk_gib(flavor, self._image_of(inst))
            plan.resources = ActionResources(
                vcpus=flavor.spec.vcpus, ram_mib=flavor.spec.ram_mib, disk_bytes=disk_gib * GIB
            )
            if not s.target_node:
                plan.target_node = self._target(inst, flavor, allow_same=True)
        elif action == "Migrate":
            if not s.target_node:
                flavor = self.op.store(Flavor).lookup(inst.status.flavor or inst.spec.flavor)
                if flavor is None:
                    raise Stall("FlavorNotFound", f"flavor {inst.status.flavor} does not exist")
                plan.target_node = self._target(
                    inst, flavor, allow_same=False, only=obj.spec.target_node
                )
        elif action in ("Rebuild", "Rescue"):
            ref = obj.spec.image
            if ref is None and inst.status.image:
                namespace, _, name = inst.status.image.partition("/")
                ref = ProjectRef(name=name, namespace=namespace)
            if ref is None:
                raise Stall("ImageRequired", f"{action} needs an image")
            image = resolve_image(self.op, ref, inst.namespace or "")
            plan.image = image.key
            plan.image_source = image_source(image)
        elif action == "Unrescue" and not inst.status.rescued:
            raise Stall("NotRescued", f"instance {inst.name} is not in rescue mode")
        elif action == "Snapshot":
            assert obj.spec.image_name is not None
            existing = self.op.store(Image).lookup(obj.spec.image_name, obj.namespace)
            if existing is not None and existing.spec.source.snapshot != obj.name:
                raise Stall(
                    "ImageNameTaken", f"an image named {obj.spec.image_name} already exists"
                )
        return plan

    def _image_of(self, inst: Instance) -> Image | None:
        """The image in effect (the root disk's size when the flavor has none)."""
        if not inst.status.image:
            return None
        found: Image | None = self.op.store(Image).get(inst.status.image)
        return found

    def _target(
        self, inst: Instance, flavor: Flavor, *, allow_same: bool, only: str | None = None
    ) -> str:
        image = None
        if inst.status.image:
            image = self.op.store(Image).get(inst.status.image)
        request = request_for(
            flavor, image, root_disk_gib(flavor, image), inst.spec.availability_zone
        )
        hosts = host_states(self.op, inst.uid)
        exclude = frozenset() if allow_same else frozenset({inst.status.node or ""})
        # Resize prefers to stay; the scheduler moves it only when it must.
        if allow_same and inst.status.node:
            here = schedule(hosts, RequestSpec(**{**request.__dict__, "only": inst.status.node}))
            if isinstance(here, Choice):
                return here.host
        result = schedule(
            hosts, RequestSpec(**{**request.__dict__, "exclude": exclude, "only": only})
        )
        if not isinstance(result, Choice):
            raise Stall("NoValidHost", result.explanation)
        return result.host

    async def _finished(self, obj: InstanceAction) -> Outcome:
        if obj.status.error is not None:
            raise Stall(obj.status.error.reason, obj.status.error.message)
        if obj.spec.action != "Snapshot":
            return Outcome.ready(
                message=obj.status.result or f"{obj.spec.action} done", reason="Succeeded"
            )
        transfer = obj.status.transfer
        assert obj.spec.image_name is not None
        if transfer is None:
            raise Stall("SnapshotMissing", "the agent finished without a snapshot file")
        image: Image | None = self.op.store(Image).lookup(obj.spec.image_name, obj.namespace)
        store = self.store
        exists = await asyncio.to_thread(store.internal_exists, transfer.ref)
        if image is None and (obj.status.is_true("Ready") or not exists):
            # Created and imported once; deleting that image later is the user's call.
            return Outcome.ready(
                message=f"image {obj.spec.image_name} was created", reason="Succeeded"
            )
        if image is None:
            await self._create_snapshot_image(obj, transfer.sha256)
            return Outcome.progressing("ImportingSnapshot", f"image {obj.spec.image_name} created")
        if image.status.is_true("Ready"):
            # Imported into the store under its own id: the transfer copy can go.
            await asyncio.to_thread(store.delete_internal, transfer.ref)
            return Outcome.ready(message=f"image {image.name} is ready", reason="Succeeded")
        if image.status.is_true("Stalled"):
            why = image.status.condition("Stalled")
            raise Stall(
                "SnapshotImportFailed",
                f"image {image.name} could not be imported"
                + (f": {why.reason}: {why.message}" if why else ""),
            )
        return Outcome.progressing("ImportingSnapshot", f"image {obj.spec.image_name} is importing")

    async def _create_snapshot_image(self, obj: InstanceAction, sha256: str) -> None:
        try:
            await self.op.kube.apply_raw(
                path_of(Image),
                {
                    "apiVersion": Image.crd.api_version,
                    "kind": "Image",
                    "metadata": {
                        "name": obj.spec.image_name,
                        "namespace": obj.namespace,
                        "labels": {"nubes.io/snapshot-of": obj.spec.instance},
                    },
                    "spec": {
                        "source": {"snapshot": obj.name},
                        "diskFormat": "qcow2",
                        "sha256": sha256,
                    },
                },
            )
        except ApiError as e:
            if e.status == 403 and "exceeded quota" in str(e):
                raise Stall(
                    QUOTA_REASON,
                    f"images: the project's image quota is used up ({e}); the snapshot is"
                    " kept until this action is deleted",
                ) from e
            raise
