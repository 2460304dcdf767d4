"""Reading an instance's node intent (status.intent, resolved by the
controller) together with what only the node resolves: the volume exports
meant for this node and their CHAP credentials (a Secret in the components'
namespace, which tenants cannot read), and paths in the image store."""

from __future__ import annotations

import base64
from pathlib import Path

from nubes.agent.compute_plan import Plan, VolumeDisk
from nubes.agent.config import AgentConfig
from nubes.api.compute import ActionResources, Instance, InstanceAction, IntentVolume, StoreSource
from nubes.api.lifecycle import completed
from nubes.api.storage import Volume
from nubes.drivers.images.cache import ImageSource
from nubes.drivers.images.store import internal_path
from nubes.runtime.kube import SECRETS
from nubes.runtime.operator import Operator


class IntentReader:
    op: Operator

    def __init__(self, config: AgentConfig, store_dir: Path) -> None:
        self.node = config.node
        self.secret_namespace = config.secret_namespace
        self.store_dir = store_dir

    async def plan(
        self, inst: Instance, *, resources: ActionResources | None = None
    ) -> Plan | None:
        """The instance's intent with this node's facts; None while the node
        must wait (no intent yet, an action finished that the intent does not
        account for yet, ports or volume exports not there yet). `resources`:
        a Resize's, for the node building the resized instance."""
        intent = inst.status.intent
        if intent is None:
            return None
        actions = self.op.store(InstanceAction).by_index("instance", inst.key)
        done = completed(actions)
        if done and (done[-1].status.completed_at or "") > intent.basis:
            return None  # the controller's next intent follows the action
        if len(intent.nics) < len(inst.spec.networks):
            return None  # boot with every NIC: there is no NIC hot-plug
        boot_volume = None
        if intent.boot_volume is not None:
            boot_volume = await self.volume_disk(inst, intent.boot_volume)
            if boot_volume is None:
                return None  # not exported for us yet
        wanted = resources or intent
        return Plan(
            inst=inst,
            boot_volume=boot_volume,
            vcpus=wanted.vcpus,
            ram_mib=wanted.ram_mib,
            disk_bytes=wanted.disk_bytes,
            root_source=self.store_source(intent.root) if intent.root else None,
            nics=list(intent.nics),
            volumes=await self.volume_disks(inst, intent.volumes),
        )

    def store_source(self, source: StoreSource) -> ImageSource:
        """Where the node reads data the controller named in the store."""
        if "/" in source.ref:
            path = internal_path(str(self.store_dir), source.ref)
        else:  # an imported image, named by its uid
            path = str(self.store_dir / source.ref)
        return ImageSource(path, source.sha256, source.format)

    async def volume_disks(self, inst: Instance, wanted: list[IntentVolume]) -> list[VolumeDisk]:
        disks = []
        for intent in wanted:
            disk = await self.volume_disk(inst, intent)
            if disk is not None:
                disks.append(disk)
        return disks

    async def volume_disk(self, inst: Instance, intent: IntentVolume) -> VolumeDisk | None:
        """The volume's iSCSI export, if it is attached to this instance and
        exported for this node; CHAP credentials from the Volume's Secret."""
        volume: Volume | None = self.op.store(Volume).lookup(intent.volume, inst.namespace)
        if volume is None or volume.status.export is None or volume.status.attachment is None:
            return None
        export = volume.status.export
        if volume.status.attachment.instance_uid != inst.uid:
            return None
        if export.initiator_node not in (None, self.node):
            return None  # still exported for the node the instance left
        # In the components' namespace: tenants never read CHAP credentials.
        secret = await self.op.kube.get_raw(SECRETS, export.chap_secret, self.secret_namespace)
        if secret is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        host, _, port = export.portal.rpartition(":")
        return VolumeDisk(
            volume.name,
            intent.target,
            host,
            int(port or 3260),
            export.iqn,
            export.lun,
            data.get("username", ""),
            data.get("password", ""),
        )
