"""Node agent settings."""

from __future__ import annotations

import argparse
import os
import socket

from pydantic import BaseModel, Field


def _env(name: str, default: str) -> str:
    return os.environ.get(f"NUBES_{name}", default)


NODE_LABEL = "nubes.io/node"
"""Label of the ConfigMaps and Secrets a node agent makes, naming its node:
the nubes-agent-node admission policy lets only that node's agent change or
delete them."""


class AgentConfig(BaseModel):
    node: str
    """Name of this node (Hypervisor object, port bindings)."""
    state_dir: str = "/var/lib/nubes"
    """Instance disks, image cache, volumes, DHCP files."""
    run_dir: str = "/run/nubes"
    """Pid files and sockets."""
    ovs_db: str = "unix:/var/run/openvswitch/db.sock"
    """OVSDB to manage."""
    ovs_rundir: str = "/var/run/openvswitch"
    """Where ovs-vswitchd keeps its bridge management sockets."""
    node_netns: str | None = None
    """Network namespace the node's switch lives in (None: the host's).
    Lets several agents act as separate nodes on one machine."""
    netns_prefix: str = "nubes"
    """Prefix of the network namespaces the agent makes."""
    integration_bridge: str = "br-int"
    tunnel_bridge: str = "br-tun"
    tunnel_ip: str | None = None
    """Local tunnel endpoint (vxlan/gre); None disables tunnels."""
    bridge_mappings: dict[str, str] = Field(default_factory=dict)
    """Provider network to bridge, e.g. physnet1: br-provider."""
    availability_zone: str = "nova"
    image_store: str = "/var/lib/nubes/images"
    """The image store the controller imports into (a shared filesystem): read
    for image data, written for snapshots and shelved disks."""
    virt_type: str = "auto"
    """kvm, qemu (TCG) or auto: probe whether KVM really works."""
    volume_backends: list[str] = Field(default_factory=list)
    """Volume pools, NAME:file:DIR or NAME:lvm:VG[/THINPOOL]; none means one
    file backend named "file" in STATE_DIR/volumes."""
    backup_store: str | None = None
    """Directory of volume backups; None means STATE_DIR/backups."""
    iscsi_portal: str = "127.0.0.1:3260"
    """HOST[:PORT] of this node's tgtd, as compute nodes reach it."""
    secret_namespace: str = "nubes-system"
    """Namespace of the Secrets the agents keep (CHAP credentials of volume
    exports): the components' own, which no tenant can read."""
    port_binding_timeout: float = 30.0
    """Seconds a guest waits for its ports to be bound on the node (Nova's
    vif_plugging_timeout). Past it, the instance reports PortBindingTimeout and
    still does not start on an unbound port; it starts once they are bound."""
    l3: bool = False
    """Host routers (Neutron's L3 agent role); shown on the Hypervisor as
    status.l3Agent, where the controller places routers."""
    image_cache_grace: float = 86400.0
    """Seconds a cached base image no local disk uses is kept before pruning
    (Nova's remove_unused_original_minimum_age_seconds)."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node", default=_env("NODE", socket.gethostname()))
        p.add_argument("--state-dir", default=_env("STATE_DIR", "/var/lib/nubes"))
        p.add_argument("--run-dir", default=_env("RUN_DIR", "/run/nubes"))
        p.add_argument("--ovs-db", default=_env("OVS_DB", "unix:/var/run/openvswitch/db.sock"))
        p.add_argument("--ovs-rundir", default=_env("OVS_RUNDIR", "/var/run/openvswitch"))
        p.add_argument("--node-netns", default=os.environ.get("NUBES_NODE_NETNS"))
        p.add_argument("--netns-prefix", default=_env("NETNS_PREFIX", "nubes"))
        p.add_argument("--integration-bridge", default=_env("INTEGRATION_BRIDGE", "br-int"))
        p.add_argument("--tunnel-bridge", default=_env("TUNNEL_BRIDGE", "br-tun"))
        p.add_argument("--tunnel-ip", default=os.environ.get("NUBES_TUNNEL_IP"))
        p.add_argument("--bridge-mapping", action="append", default=[], help="PHYSNET:BRIDGE")
        p.add_argument("--availability-zone", default=_env("AVAILABILITY_ZONE", "nova"))
        p.add_argument("--image-store", default=_env("IMAGE_STORE", "/var/lib/nubes/images"))
        p.add_argument(
            "--virt-type", choices=["auto", "kvm", "qemu"], default=_env("VIRT_TYPE", "auto")
        )
        p.add_argument(
            "--volume-backend",
            action="append",
            default=[],
            help="NAME:file:DIR or NAME:lvm:VG[/THINPOOL] (repeatable;"
            " default file:file:STATE_DIR/volumes)",
        )
        p.add_argument("--backup-store", default=os.environ.get("NUBES_BACKUP_STORE"))
        p.add_argument("--iscsi-portal", default=_env("ISCSI_PORTAL", "127.0.0.1:3260"))
        p.add_argument(
            "--secret-namespace",
            default=_env("SECRET_NAMESPACE", "nubes-system"),
            help="namespace of the CHAP Secrets (the components' namespace)",
        )
        p.add_argument(
            "--port-binding-timeout",
            type=float,
            default=float(_env("PORT_BINDING_TIMEOUT", "30")),
            help="seconds before an instance reports ports not bound (it never boots unbound)",
        )
        p.add_argument(
            "--l3",
            action="store_true",
            default=_env("L3", "") in ("1", "true"),
            help="host routers (the controller places routers on such nodes)",
        )
        p.add_argument(
            "--image-cache-grace",
            type=float,
            default=float(_env("IMAGE_CACHE_GRACE", "86400")),
            help="seconds an unused cached image is kept",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentConfig:
        return cls(
            node=args.node,
            state_dir=args.state_dir,
            run_dir=args.run_dir,
            ovs_db=args.ovs_db,
            ovs_rundir=args.ovs_rundir,
            node_netns=args.node_netns,
            netns_prefix=args.netns_prefix,
            integration_bridge=args.integration_bridge,
            tunnel_bridge=args.tunnel_bridge,
            tunnel_ip=args.tunnel_ip,
            bridge_mappings=dict(m.split(":", 1) for m in args.bridge_mapping),
            availability_zone=args.availability_zone,
            image_store=args.image_store,
            virt_type=args.virt_type,
            volume_backends=args.volume_backend,
            backup_store=args.backup_store,
            iscsi_portal=args.iscsi_portal,
            image_cache_grace=args.image_cache_grace,
            l3=args.l3,
            port_binding_timeout=args.port_binding_timeout,
            secret_namespace=args.secret_namespace,
        )
