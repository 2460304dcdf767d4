"""Simulated nodes for tests: each node is a network namespace running its own
ovsdb-server and ovs-vswitchd (userspace datapath), with an underlay veth into
a shared fabric bridge (in its own namespace) and its tunnel address on
br-phy, as OVS userspace tunnelling wants. Guests are namespaces too.

Everything is named with a per-run prefix and torn down by `Fabric.stop()`,
which also asserts nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nubes.drivers.network.ovs import OvsEndpoint

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def sh(
    *argv: str,
    check: bool = True,
    netns: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(
        full,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@dataclass
class SimNode:
    name: str
    netns: str
    rundir: Path
    tunnel_ip: str

    @property
    def endpoint(self) -> OvsEndpoint:
        return OvsEndpoint(
            db=f"unix:{self.rundir}/db.sock", rundir=str(self.rundir), netns=self.netns
        )

    def vsctl(self, *args: str) -> str:
        return sh("ovs-vsctl", f"--db=unix:{self.rundir}/db.sock", *args).stdout

    def ofctl(self, *args: str) -> str:
        cmd, bridge, *rest = args
        return sh(
            "ovs-ofctl", "-O", "OpenFlow13", cmd, f"unix:{self.rundir}/{bridge}.mgmt", *rest
        ).stdout


@dataclass
class Fabric:
    prefix: str
    root: Path
    nodes: list[SimNode] = field(default_factory=list)
    guests: list[str] = field(default_factory=list)

    @property
    def fabric_ns(self) -> str:
        return f"{self.prefix}-fab"

    @classmethod
    def start(cls, root: Path, names: list[str]) -> Fabric:
        fabric = cls(prefix=f"nbt{uuid.uuid4().hex[:5]}", root=root)
        try:
            sh("ip", "netns", "add", fabric.fabric_ns)
            sh("ip", "-n", fabric.fabric_ns, "link", "add", "fab", "type", "bridge")
            sh("ip", "-n", fabric.fabric_ns, "link", "set", "fab", "up")
            for index, name in enumerate(names, start=1):
                fabric.nodes.append(fabric._start_node(name, index))
        except BaseException:
            fabric.stop()
            raise
        return fabric

    def _start_node(self, name: str, index: int) -> SimNode:
        netns = f"{self.prefix}-{name}"
        rundir = self.root / name
        rundir.mkdir(parents=True)
        node = SimNode(name, netns, rundir, f"172.31.{index // 250}.{index % 250 + 1}")
        sh("ip", "netns", "add", netns)
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ovsdb-tool", "create", str(rundir / "conf.db"), SCHEMA)
        sh(
            "ovsdb-server",
            str(rundir / "conf.db"),
            f"--remote=punix:{rundir}/db.sock",
            f"--pidfile={rundir}/ovsdb-server.pid",
            "--detach",
            f"--log-file={rundir}/ovsdb-server.log",
            "-vconsole:off",
            netns=netns,
        )
        node.vsctl("--no-wait", "init")
        sh(
            "ovs-vswitchd",
            f"unix:{rundir}/db.sock",
            f"--pidfile={rundir}/ovs-vswitchd.pid",
            "--detach",
            f"--log-file={rundir}/ovs-vswitchd.log",
            "-vconsole:off",
            netns=netns,
            env={"OVS_RUNDIR": str(rundir)},
        )
        # Underlay: a veth from the node to the fabric bridge, on br-phy.
        ul = f"ul{index}"
        sh(
            "ip",
            "link",
            "add",
            ul,
            "netns",
            netns,
            "type",
            "veth",
            "peer",
            "name",
            f"f{ul}",
            "netns",
            self.fabric_ns,
        )
        sh("ip", "-n", self.fabric_ns, "link", "set", f"f{ul}", "master", "fab", "up")
        node.vsctl(
            "--may-exist",
            "add-br",
            "br-phy",
            "--",
            "set",
            "bridge",
            "br-phy",
            "datapath_type=netdev",
        )
        node.vsctl("--may-exist", "add-port", "br-phy", ul)
        sh("ip", "-n", netns, "link", "set", ul, "up")
        for _ in range(50):
            if sh("ip", "-n", netns, "link", "show", "br-phy", check=False).returncode == 0:
                break
            time.sleep(0.1)
        sh("ip", "-n", netns, "addr", "add", f"{node.tunnel_ip}/16", "dev", "br-phy")
        sh("ip", "-n", netns, "link", "set", "br-phy", "up")
        return node

    def node_name(self, node: SimNode) -> str:
        return f"{self.prefix}-{node.name}"

    def agent_argv(self, node: SimNode, state: Path) -> list[str]:
        """`nubes agent` arguments that make it the agent of a simulated node."""
        return [
            "agent",
            "--node",
            self.node_name(node),
            "--state-dir",
            str(state),
            "--run-dir",
            str(state / "run"),
            "--ovs-db",
            node.endpoint.db,
            "--ovs-rundir",
            str(node.rundir),
            "--node-netns",
            node.netns,
            "--netns-prefix",
            f"{self.prefix}{node.name}",
            "--tunnel-ip",
            node.tunnel_ip,
            "--availability-zone",
            self.prefix,
            "--virt-type",
            "qemu",
        ]

    def guest(self, name: str) -> str:
        """A fresh namespace acting as a guest machine."""
        netns = f"{self.prefix}-g-{name}"
        sh("ip", "netns", "add", netns)
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        self.guests.append(netns)
        return netns

    def stop(self) -> None:
        for node in self.nodes:
            _kill_pidfile(node.rundir / "ovs-vswitchd.pid")
            _kill_pidfile(node.rundir / "ovsdb-server.pid")
        for netns in sorted(self.namespaces(), reverse=True):
            sh("ip", "netns", "delete", netns, check=False)
        leftovers = self.namespaces()
        assert not leftovers, f"namespaces left behind: {leftovers}"
        procs = sh("pgrep", "-af", str(self.root), check=False).stdout.strip()
        assert not procs, f"processes left behind: {procs}"

    def host(self, name: str, address: str) -> str:
        """A namespace on the fabric itself (where flat provider traffic
        goes) with `address` (CIDR form): an external host."""
        netns = self.guest(name)
        peer = f"f{name}"[:15]
        sh(
            "ip", "link", "add", "eth0", "netns", netns, "type", "veth",
            "peer", "name", peer, "netns", self.fabric_ns,
        )  # fmt: skip
        sh("ip", "-n", self.fabric_ns, "link", "set", peer, "master", "fab", "up")
        sh("ip", "-n", netns, "addr", "add", address, "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        # Its frames reach the nodes' userspace datapath, which does not
        # complete partial checksums (host-facts): it sends whole ones.
        sh("ethtool", "-K", "eth0", "tx", "off", netns=netns)
        return netns

    def namespaces(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir("/run/netns") if n.startswith(self.prefix))
        except FileNotFoundError:
            return []


def dhcp_lease(guest_netns: str, iface: str = "eth0", timeout: int = 15) -> dict[str, str]:
    """Run busybox udhcpc in a guest; returns the lease as udhcpc reports it."""
    script = Path(f"/tmp/{guest_netns}-udhcpc.sh")
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = bound ] || exit 0\n'
        'echo "ip=$ip"; echo "subnet=$subnet"; echo "router=$router"; echo "mtu=$mtu"\n'
        'echo "dns=$dns"; echo "staticroutes=$staticroutes"\n'
        'busybox ifconfig "$interface" "$ip" netmask "$subnet"\n'
        '[ -n "$mtu" ] && busybox ip link set dev "$interface" mtu "$mtu"\n'
        '[ -n "$router" ] && busybox ip route add default via "$router" dev "$interface"\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    try:
        out = sh(
            "busybox",
            "udhcpc",
            "-i",
            iface,
            "-f",
            "-q",
            "-n",
            "-t",
            str(timeout),
            "-T",
            "1",
            "-s",
            str(script),
            netns=guest_netns,
            timeout=timeout + 10,
            check=False,
        )
    finally:
        script.unlink(missing_ok=True)
    lease = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ip", "subnet", "router", "mtu", "dns", "staticroutes"):
            lease[key] = value
    return lease


def ping(netns: str, address: str, count: int = 2, timeout: int = 2) -> bool:
    result = sh(
        "busybox",
        "ping",
        "-c",
        str(count),
        "-w",
        str(count * timeout),
        address,
        netns=netns,
        check=False,
        timeout=count * timeout + 10,
    )
    return result.returncode == 0
