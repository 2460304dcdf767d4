"""Network namespaces and links, through iproute2 and ethtool."""

from __future__ import annotations

import json
import os

from nubes.drivers.runner import CommandError, Runner

NETNS_DIR = "/run/netns"


def ip_argv(netns: str | None, *args: str) -> list[str]:
    return ["ip", *(["-n", netns] if netns else []), *args]


class Links:
    def __init__(self, runner: Runner):
        self.run = runner

    # --- namespaces --------------------------------------------------------------

    @staticmethod
    def netns_exists(name: str) -> bool:
        return os.path.exists(os.path.join(NETNS_DIR, name))

    def ensure_netns(self, name: str) -> None:
        if not self.netns_exists(name):
            self.run(["ip", "netns", "add", name])
        self.run(ip_argv(name, "link", "set", "lo", "up"))

    def delete_netns(self, name: str) -> None:
        if self.netns_exists(name):
            self.run(["ip", "netns", "delete", name])

    @staticmethod
    def list_netns(prefix: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
        except FileNotFoundError:
            return []

    # --- links ---------------------------------------------------------------------

    def exists(self, name: str, netns: str | None = None) -> bool:
        result = self.run(ip_argv(netns, "link", "show", "dev", name), check=False)
        return result.returncode == 0

    def addresses(self, name: str, netns: str | None = None) -> list[str]:
        out = self.run(ip_argv(netns, "-j", "addr", "show", "dev", name)).stdout
        result = []
        for link in json.loads(out or "[]"):
            for a in link.get("addr_info", []):
                if a.get("scope") == "global":
                    result.append(f"{a['local']}/{a['prefixlen']}")
        return result

    def ensure_veth(
        self,
        name: str,
        netns: str | None,
        peer: str,
        peer_netns: str | None,
        *,
        mtu: int | None = None,
        mac: str | None = None,
    ) -> None:
        """A veth pair with each end in its namespace, both up, checksum
        offload off (the userspace datapath does not complete partial
        checksums, and guests then drop DHCP offers)."""
        if not self.exists(name, netns):
            args = ["link", "add", name]
            if netns:
                args += ["netns", netns]
            args += ["type", "veth", "peer", "name", peer]
            if peer_netns:
                args += ["netns", peer_netns]
            self.run(["ip", *args])
        for dev, ns in ((name, netns), (peer, peer_netns)):
            if mtu:
                self.run(ip_argv(ns, "link", "set", "dev", dev, "mtu", str(mtu)))
            self.tx_offload_off(dev, ns)
            self.run(ip_argv(ns, "link", "set", "dev", dev, "up"))
        if mac:
            self.run(ip_argv(netns, "link", "set", "dev", name, "address", mac))

    def ensure_bridge(self, name: str, *, mtu: int | None = None) -> None:
        if not self.exists(name):
            self.run(["ip", "link", "add", name, "type", "bridge"])
        if mtu:
            self.run(["ip", "link", "set", "dev", name, "mtu", str(mtu)])
        self.run(["ip", "link", "set", "dev", name, "up"])

    def set_master(self, name: str, bridge: str) -> None:
        self.run(["ip", "link", "set", "dev", name, "master", bridge])

    def tx_offload_off(self, name: str, netns: str | None = None) -> None:
        argv = ["ethtool", "-K", name, "tx", "off"]
        self.run(["ip", "netns", "exec", netns, *argv] if netns else argv, check=False)

    def replace_addresses(self, name: str, netns: str | None, wanted: list[str]) -> None:
        present = self.addresses(name, netns)
        for cidr in wanted:
            if cidr not in present:
                self.run(ip_argv(netns, "addr", "replace", cidr, "dev", name))
        for cidr in present:
            if cidr not in wanted:
                self.run(ip_argv(netns, "addr", "del", cidr, "dev", name))

    def delete(self, name: str, netns: str | None = None) -> None:
        try:
            self.run(ip_argv(netns, "link", "delete", "dev", name))
        except CommandError as e:
            if "Cannot find device" not in e.stderr and "does not exist" not in e.stderr:
                raise
