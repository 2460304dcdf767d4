"""One dnsmasq per network, in its own namespace, plugged into br-int.

Host entries (MAC, IP, hostname) live in a hosts file that dnsmasq re-reads
on SIGHUP, so adding or removing ports never restarts the server; subnet and
option changes (rare) do.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from nubes.drivers.network.netns import Links, one_socket_per_namespace
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.runner import CommandError, Runner

log = structlog.get_logger()


class DhcpError(Exception):
    """A network's DHCP server could not be set up."""


@dataclass(frozen=True)
class DhcpSubnet:
    cidr: str
    gateway_ip: str | None = None
    dns_nameservers: tuple[str, ...] = ()
    host_routes: tuple[tuple[str, str], ...] = ()
    """(destination CIDR, next hop) pairs, sent as option 121."""


@dataclass(frozen=True)
class DhcpHost:
    mac: str
    ip: str
    hostname: str


@dataclass(frozen=True)
class DhcpConfig:
    network_uid: str
    port_uid: str
    """The network's DHCP Port (its MAC and addresses are the server's)."""
    mac: str
    addresses: tuple[str, ...]
    """Server addresses with prefix length, one per subnet (e.g. 10.0.0.2/24)."""
    local_vlan: int
    mtu: int
    subnets: tuple[DhcpSubnet, ...]
    hosts: tuple[DhcpHost, ...] = field(default=())
    lease_seconds: int = 86400


def names_for(network_uid: str, prefix: str) -> tuple[str, str, str]:
    """(namespace, device inside it, device on br-int)."""
    short = network_uid.replace("-", "")
    return f"{prefix}-dhcp-{short[:13]}", f"ns-{short[:11]}", f"dh{short[:12]}"


def hosts_file(hosts: tuple[DhcpHost, ...]) -> str:
    lines = []
    for h in sorted(hosts, key=lambda h: (h.mac, h.ip)):
        ip = f"[{h.ip}]" if ":" in h.ip else h.ip
        lines.append(f"{h.mac},{h.hostname},{ip}")
    return "\n".join(lines) + ("\n" if lines else "")


def parse_hosts_file(text: str) -> set[tuple[str, str]]:
    """(MAC, IP) of each entry of a hosts file written by `hosts_file`."""
    entries = set()
    for line in text.splitlines():
        mac, _, ip = line.split(",", 2)
        entries.add((mac, ip.strip("[]")))
    return entries


def dnsmasq_args(cfg: DhcpConfig, device: str, files: dict[str, str]) -> list[str]:
    """The dnsmasq command line: everything but the hosts, which are re-read on SIGHUP."""
    args = [
        "dnsmasq",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--no-resolv",
        "--port=0",  # DHCP only; guests get the subnet's DNS servers
        "--user=root",
        "--bind-interfaces",
        f"--interface={device}",
        "--except-interface=lo",
        "--leasefile-ro",
        "--dhcp-authoritative",
        f"--pid-file={files['pid']}",
        f"--dhcp-hostsfile={files['hosts']}",
        f"--log-facility={files['log']}",
        "--log-dhcp",
    ]
    for index, subnet in enumerate(cfg.subnets):
        net = ipaddress.ip_network(subnet.cidr)
        if net.version != 4:
            continue  # DHCPv6 needs router advertisements; IPv6 is IPAM-only for now
        tag = f"s{index}"
        args.append(
            f"--dhcp-range=set:{tag},{net.network_address},static,{net.netmask},"
            f"{cfg.lease_seconds}s"
        )
        args.append(f"--dhcp-option-force=tag:{tag},option:mtu,{cfg.mtu}")
        if subnet.gateway_ip:
            args.append(f"--dhcp-option=tag:{tag},option:router,{subnet.gateway_ip}")
        else:
            args.append(f"--dhcp-option=tag:{tag},option:router")
        if subnet.dns_nameservers:
            args.append(
                f"--dhcp-option=tag:{tag},option:dns-server," + ",".join(subnet.dns_nameservers)
            )
        if subnet.host_routes:
            # Clients that take option 121 ignore the router option, so the
            # default route goes into it too.
            routes = [f"{dest},{hop}" for dest, hop in subnet.host_routes]
            if subnet.gateway_ip:
                routes.append(f"0.0.0.0/0,{subnet.gateway_ip}")
            args.append(
                f"--dhcp-option-force=tag:{tag},option:classless-static-route," + ",".join(routes)
            )
    return args


def _write_atomic(path: Path, text: str) -> bool:
    """Write if different; True when the content changed."""
    if path.exists() and path.read_text() == text:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def _alive(pid: int, needle: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "dnsmasq" in cmdline and needle in cmdline


class DhcpServers:
    """The DHCP servers of one node."""

    def __init__(
        self,
        runner: Runner,
        links: Links,
        switch: NodeSwitch,
        *,
        state_dir: str,
        netns_prefix: str,
        node_netns: str | None,
    ):
        self.run = runner
        self.links = links
        self.switch = switch
        self.root = Path(state_dir) / "dhcp"
        self.prefix = netns_prefix
        self.node_netns = node_netns

    def _files(self, network_uid: str) -> dict[str, str]:
        d = self.root / network_uid
        return {k: str(d / k) for k in ("pid", "hosts", "log", "config")}

    def _pid(self, network_uid: str) -> int | None:
        files = self._files(network_uid)
        try:
            pid = int(Path(files["pid"]).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, files["pid"]) else None

    @one_socket_per_namespace
    def _ensure_device(self, cfg: DhcpConfig, netns: str, device: str, outer: str) -> None:
        self.links.ensure_netns(netns)
        self.links.ensure_veth(device, netns, outer, self.node_netns, mtu=cfg.mtu, mac=cfg.mac)
        self.links.replace_addresses(device, netns, list(cfg.addresses))

    def ensure(self, cfg: DhcpConfig) -> None:
        netns, device, outer = names_for(cfg.network_uid, self.prefix)
        files = self._files(cfg.network_uid)
        Path(files["pid"]).parent.mkdir(parents=True, exist_ok=True)
        self._ensure_device(cfg, netns, device, outer)
        self.switch.add_vif(outer, cfg.port_uid, cfg.mac, cfg.local_vlan)

        hosts_path = Path(files["hosts"])
        before = parse_hosts_file(hosts_path.read_text()) if hosts_path.exists() else set()
        hosts_changed = _write_atomic(hosts_path, hosts_file(cfg.hosts))
        args = dnsmasq_args(cfg, device, files)
        digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()
        config_changed = _write_atomic(Path(files["config"]), digest + "\n")
        pid = self._pid(cfg.network_uid)
        if pid is not None and config_changed:
            self._stop(pid)
            pid = None
        if pid is None:
            try:
                self.run(args, netns=netns)
            except CommandError as e:
                # dnsmasq's own words ("bad IP address", "Address already in
                # use") are what the Network's condition shows.
                detail = e.stderr.strip() or e.stdout.strip() or f"exit status {e.returncode}"
                raise DhcpError(f"dnsmasq did not start: {detail}") from e
            log.info("dnsmasq started", network=cfg.network_uid, netns=netns)
        elif hosts_changed:
            os.kill(pid, signal.SIGHUP)
            gone = before - {(h.mac, h.ip) for h in cfg.hosts}
            self._release(netns, device, gone)

    def _release(self, netns: str, device: str, entries: set[tuple[str, str]]) -> None:
        """End the leases of removed hosts, as Neutron does: dnsmasq keeps
        them in memory and would refuse their address to the next port."""
        for mac, ip in sorted(entries):
            if ":" in ip:
                continue  # no DHCPv6 served
            result = self.run(["dhcp_release", device, ip, mac], netns=netns, check=False)
            if result.returncode != 0:
                log.warning("dhcp_release failed", ip=ip, mac=mac, error=result.stderr.strip())

    def remove(self, network_uid: str) -> None:
        netns, _, outer = names_for(network_uid, self.prefix)
        pid = self._pid(network_uid)
        if pid is not None:
            self._stop(pid)
        self.switch.remove_vif(outer)
        self.links.delete(outer, self.node_netns)
        self.links.delete_netns(netns)
        shutil.rmtree(self.root / network_uid, ignore_errors=True)
        log.info("dhcp removed", network=network_uid)

    def networks(self) -> set[str]:
        """Networks with DHCP state on this node (for re-adoption and cleanup)."""
        on_disk = {p.name for p in self.root.iterdir()} if self.root.exists() else set()
        return on_disk

    def lease_log(self, network_uid: str) -> str:
        path = Path(self._files(network_uid)["log"])
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _stop(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not os.path.exists(f"/proc/{pid}"):
                    return
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
