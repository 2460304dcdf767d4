"""Controller settings (command-line flags, with environment fallbacks)."""

from __future__ import annotations

import argparse
import os

from pydantic import BaseModel, Field

from nubes.drivers.images.fetch import FetchPolicy, parse_networks


def _env(name: str, default: str) -> str:
    return os.environ.get(f"NUBES_{name}", default)


class SegmentRange(BaseModel):
    """An inclusive range of segmentation ids tenants allocate from."""

    first: int
    last: int
    physical_network: str | None = None

    @classmethod
    def parse(cls, text: str, *, with_physnet: bool = False) -> SegmentRange:
        parts = text.split(":")
        if with_physnet:
            if len(parts) != 3:
                raise argparse.ArgumentTypeError(f"expected PHYSNET:FIRST:LAST, got {text!r}")
            return cls(physical_network=parts[0], first=int(parts[1]), last=int(parts[2]))
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected FIRST:LAST, got {text!r}")
        return cls(first=int(parts[0]), last=int(parts[1]))


class ControllerConfig(BaseModel):
    shard: int = 0
    """This worker's shard (objects are split by uid hash)."""
    shards: int = 1
    """Number of controller workers."""
    vxlan_ranges: list[SegmentRange] = Field(
        default_factory=lambda: [SegmentRange(first=1000, last=1999)]
    )
    gre_ranges: list[SegmentRange] = Field(
        default_factory=lambda: [SegmentRange(first=1000, last=1999)]
    )
    vlan_ranges: list[SegmentRange] = Field(default_factory=list)
    underlay_mtu: int = 1500
    """MTU of the physical network carrying tunnels (Neutron's global_physnet_mtu)."""
    physnet_mtus: dict[str, int] = Field(default_factory=dict)
    """Per provider network MTU, when not the underlay MTU."""
    image_store: str = "/var/lib/nubes/images"
    """Directory the controller imports images into (Glance filesystem store)."""
    image_import_dir: str | None = None
    """The only directory file:// image sources may read below (None: none)."""
    image_import_schemes: list[str] = Field(default_factory=lambda: ["http", "https"])
    image_import_ports: list[int] = Field(default_factory=list)
    """Ports image URLs may name; empty allows any."""
    image_import_allow_networks: list[str] = Field(default_factory=list)
    """Non-public networks image URLs may reach (an internal mirror)."""
    image_import_deny_networks: list[str] = Field(default_factory=list)
    """Networks never reached, even when allowed (the cluster's service and pod ranges)."""
    image_max_bytes: int = 64 * 2**30
    image_import_deadline: float = 3600.0
    image_import_stall_timeout: float = 60.0
    image_import_parallel: int = 4

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            allowed_schemes=frozenset(self.image_import_schemes),
            allowed_ports=frozenset(self.image_import_ports),
            allowed_networks=parse_networks(self.image_import_allow_networks),
            disallowed_networks=parse_networks(self.image_import_deny_networks),
            file_import_dir=self.image_import_dir,
            max_bytes=self.image_max_bytes,
            stall_timeout=self.image_import_stall_timeout,
            deadline=self.image_import_deadline,
        )

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--shard",
            default=_env("SHARD", "0/1"),
            help="I/N: handle the I-th of N shards (default 0/1)",
        )
        p.add_argument(
            "--vxlan-range",
            action="append",
            default=[],
            help="FIRST:LAST VNIs for tenant vxlan networks (repeatable)",
        )
        p.add_argument(
            "--gre-range",
            action="append",
            default=[],
            help="FIRST:LAST keys for tenant gre networks (repeatable)",
        )
        p.add_argument(
            "--vlan-range",
            action="append",
            default=[],
            help="PHYSNET:FIRST:LAST VLAN ids for tenant vlan networks",
        )
        p.add_argument("--underlay-mtu", type=int, default=int(_env("UNDERLAY_MTU", "1500")))
        p.add_argument("--physnet-mtu", action="append", default=[], help="PHYSNET:MTU")
        p.add_argument("--image-store", default=_env("IMAGE_STORE", "/var/lib/nubes/images"))
        i = p.add_argument_group("image import policy (tenants' URLs are hostile input)")
        i.add_argument(
            "--image-import-dir",
            default=os.environ.get("NUBES_IMAGE_IMPORT_DIR"),
            help="directory file:// sources may read below (cloud admins only); unset: no file://",
        )
        i.add_argument(
            "--image-import-scheme",
            action="append",
            choices=["http", "https"],
            help="allowed URL scheme (repeatable; default http and https)",
        )
        i.add_argument(
            "--image-import-port", action="append", type=int, default=[], help="allowed port"
        )
        i.add_argument(
            "--image-import-allow-network",
            action="append",
            default=[],
            help="CIDR of a non-public network image URLs may reach (repeatable)",
        )
        i.add_argument(
            "--image-import-deny-network",
            action="append",
            default=[],
            help="CIDR never reached, e.g. the service and pod ranges (repeatable)",
        )
        i.add_argument("--image-max-bytes", type=int, default=64 * 2**30)
        i.add_argument("--image-import-deadline", type=float, default=3600.0, help="seconds")
        i.add_argument(
            "--image-import-stall-timeout",
            type=float,
            default=60.0,
            help="seconds without data before a fetch is abandoned",
        )
        i.add_argument("--image-import-parallel", type=int, default=4)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControllerConfig:
        shard, _, shards = args.shard.partition("/")
        config = cls(
            shard=int(shard),
            shards=int(shards or 1),
            underlay_mtu=args.underlay_mtu,
            physnet_mtus={k: int(v) for k, v in (s.split(":", 1) for s in args.physnet_mtu)},
            image_store=args.image_store,
            image_import_dir=args.image_import_dir,
            image_import_schemes=args.image_import_scheme or ["http", "https"],
            image_import_ports=args.image_import_port,
            image_import_allow_networks=args.image_import_allow_network,
            image_import_deny_networks=args.image_import_deny_network,
            image_max_bytes=args.image_max_bytes,
            image_import_deadline=args.image_import_deadline,
            image_import_stall_timeout=args.image_import_stall_timeout,
            image_import_parallel=args.image_import_parallel,
        )
        try:
            config.fetch_policy()
        except ValueError as e:
            raise SystemExit(f"image import policy: {e}") from e
        if args.vxlan_range:
            config.vxlan_ranges = [SegmentRange.parse(r) for r in args.vxlan_range]
        if args.gre_range:
            config.gre_ranges = [SegmentRange.parse(r) for r in args.gre_range]
        if args.vlan_range:
            config.vlan_ranges = [SegmentRange.parse(r, with_physnet=True) for r in args.vlan_range]
        if not 0 <= config.shard < config.shards:
            raise SystemExit(f"--shard {args.shard}: shard must be within 0..N-1")
        return config
