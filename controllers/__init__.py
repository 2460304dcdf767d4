"""Cluster-wide reconcilers: one module per kind, wired by `build_controller`."""

from __future__ import annotations

from typing import Any

from nubes.controllers.config import ControllerConfig
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Reconciler


async def build_controller(op: Operator, config: ControllerConfig) -> None:
    from nubes.controllers.app_credentials import register as register_app_credentials
    from nubes.controllers.flavor import FlavorReconciler
    from nubes.controllers.floating_ip import FloatingIPReconciler
    from nubes.controllers.hypervisor import HypervisorReconciler
    from nubes.controllers.image import ImageReconciler
    from nubes.controllers.instance import InstanceReconciler
    from nubes.controllers.instance_action import InstanceActionReconciler
    from nubes.controllers.network import NetworkReconciler
    from nubes.controllers.pending import register_pending
    from nubes.controllers.port import PortReconciler
    from nubes.controllers.project import ProjectReconciler
    from nubes.controllers.router import RouterReconciler
    from nubes.controllers.security_group import SecurityGroupReconciler
    from nubes.controllers.subnet import SubnetReconciler
    from nubes.controllers.volume import VolumeReconciler
    from nubes.controllers.volume_backup import VolumeBackupReconciler
    from nubes.controllers.volume_snapshot import VolumeSnapshotReconciler
    from nubes.controllers.volume_type import VolumeTypeReconciler

    reconcilers: list[Reconciler[Any]] = [
        HypervisorReconciler(),
        ProjectReconciler(),
        NetworkReconciler(config),
        SubnetReconciler(),
        PortReconciler(),
        SecurityGroupReconciler(),
        RouterReconciler(),
        FloatingIPReconciler(),
        FlavorReconciler(),
        ImageReconciler(config),
        InstanceReconciler(),
        InstanceActionReconciler(config),
        VolumeTypeReconciler(),
        VolumeReconciler(),
        VolumeSnapshotReconciler(),
        VolumeBackupReconciler(),
    ]
    for reconciler in reconcilers:
        op.register(reconciler)
    register_app_credentials(op)
    register_pending(op, handled={r.kind for r in reconcilers})
