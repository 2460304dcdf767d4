"""Every kind of the API, in a stable order."""

from __future__ import annotations

from typing import Any

from .compute import Flavor, Hypervisor, Instance, InstanceAction
from .identity import Project
from .image import Image
from .meta import Resource
from .network import Allocation, FloatingIP, Network, Port, Router, SecurityGroup, Subnet
from .storage import Volume, VolumeBackup, VolumeSnapshot, VolumeType

ALL_KINDS: tuple[type[Resource[Any, Any]], ...] = (
    Project,
    Image,
    Flavor,
    Instance,
    InstanceAction,
    Hypervisor,
    Network,
    Subnet,
    Port,
    Router,
    FloatingIP,
    SecurityGroup,
    Allocation,
    VolumeType,
    Volume,
    VolumeSnapshot,
    VolumeBackup,
)
