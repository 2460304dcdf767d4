"""Security group updates at scale: 200 ports in 20 groups on one node, and
the time from a membership change (a Port's securityGroups patched) until
the rule is in force on the node (the port's address is in the remote
group's ipset the kernel matches against), p50/p95 over repeated changes;
with the firewall's size per port.

Every group allows tcp/22 from a CIDR, ICMP from the members of the next
group (remote group) and egress. Runs a controller and one node agent (a
simulated node: its own OVS in a namespace) against the local control
plane. The VIFs are OVS ports on br-int without guests behind them (the
iptables physdev rules name their taps all the same), so the benchmark
measures the control path and the firewall, not 200 namespaces. Prints one
JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cluster import install_crds, namespace_gone, wait_for
from nubes.api.network import Network, Port, SecurityGroup, Subnet
from nubes.drivers.network.firewall_rules import Names, node_tag
from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.network.vif import vif_names
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import NAMESPACES, Kube, path_of
from tests.helpers import Process, free_port
from tests.nodes import Fabric


def group_body(ns: str, i: int, groups: int) -> dict[str, Any]:
    return {
        "apiVersion": SecurityGroup.crd.api_version,
        "kind": "SecurityGroup",
        "metadata": {"name": f"g{i}", "namespace": ns},
        "spec": {
            "rules": [
                {"direction": "egress"},
                {
                    "direction": "ingress",
                    "protocol": "tcp",
                    "portRangeMin": 22,
                    "portRangeMax": 22,
                    "remoteIpPrefix": "192.168.0.0/16",
                },
                {"direction": "ingress", "protocol": "icmp", "remoteGroup": f"g{(i + 1) % groups}"},
            ]
        },
    }


def in_set(name: str, ip: str) -> bool:
    result = subprocess.run(  # argument list, no shell
        ["ipset", "test", name, ip], capture_output=True, check=False
    )
    return result.returncode == 0


def firewall_lines(prefix: str) -> int:
    total = 0
    for argv in (["iptables-save"], ["ip6tables-save"], ["ebtables-save"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        total += sum(1 for line in out.splitlines() if line.startswith("-A ") and prefix in line)
    return total


def own_sets(prefix: str) -> list[str]:
    out = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=True)
    return [n for n in out.stdout.split() if n.startswith(prefix)]


async def run(count: int, groups: int, changes: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="nubes-bench-sg-"))
    fabric = Fabric.start(root, ["s1"])
    node = fabric.nodes[0]
    node_name = fabric.node_name(node)
    names = Names(node_tag(node_name))
    logs = root / "logs"
    controller = Process(
        "controller",
        ["controller", "--image-store", str(root / "images")],
        logs / "controller.log",
        free_port(),
    ).start()
    agent = Process(
        "agent", fabric.agent_argv(node, root / "agent"), logs / "agent.log", free_port()
    ).start()
    switch = NodeSwitch(Ovs(SubprocessRunner(), node.endpoint), datapath_type="netdev")
    kube = await Kube.connect(field_manager="bench")
    ns = f"bench-sg-{uuid.uuid4().hex[:6]}"
    try:
        await kube.create_raw(
            NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        await kube.create_raw(
            path_of(Network),
            {
                "apiVersion": Network.crd.api_version,
                "kind": "Network",
                "metadata": {"name": "bench", "namespace": ns},
                "spec": {"type": "vxlan", "availabilityZoneHints": [fabric.prefix]},
            },
            ns,
        )
        await kube.create_raw(
            path_of(Subnet),
            {
                "apiVersion": Subnet.crd.api_version,
                "kind": "Subnet",
                "metadata": {"name": "bench-v4", "namespace": ns},
                "spec": {"network": {"name": "bench"}, "cidr": "10.66.0.0/22", "enableDhcp": False},
            },
            ns,
        )
        for i in range(groups):
            await kube.create_raw(path_of(SecurityGroup), group_body(ns, i, groups), ns)
        semaphore = asyncio.Semaphore(16)

        async def create(j: int) -> None:
            async with semaphore:
                await kube.create_raw(
                    path_of(Port),
                    {
                        "apiVersion": Port.crd.api_version,
                        "kind": "Port",
                        "metadata": {"name": f"p{j}", "namespace": ns},
                        "spec": {
                            "network": {"name": "bench"},
                            "binding": {"host": node_name},
                            "securityGroups": [f"g{j % groups}"],
                        },
                    },
                    ns,
                )

        await asyncio.gather(*(create(j) for j in range(count)))
        ports = await wait_for(lambda: addressed(kube, ns, count), 300, "ports addressed")
        for p in ports.values():
            switch.add_vif(vif_names(p.uid).qvo, p.uid, p.status.mac_address or "")
        uids = {g.name: g.uid for g in await kube.list(SecurityGroup, ns)}

        async def converged() -> bool:
            sets = set(own_sets(names.prefix))
            return all(names.ipset(4, uids[f"g{i}"]) in sets for i in range(groups)) and all(
                in_set(names.ipset(4, uids[f"g{j % groups}"]), p.status.fixed_ips[0].ip_address)
                for j, p in ((int(k[1:]), p) for k, p in ports.items())
            )

        started = time.monotonic()
        await wait_for(converged, 600, "every port's rules in force")
        first_sync = time.monotonic() - started
        lines = firewall_lines(names.prefix)
        latencies: list[float] = []
        for t in range(changes):
            j = (t * 7) % count
            home = j % groups
            other = (home + 1 + t % (groups - 1)) % groups
            port = ports[f"p{j}"]
            ip = port.status.fixed_ips[0].ip_address
            target = names.ipset(4, uids[f"g{other}"])
            patch = {"spec": {"securityGroups": [f"g{home}", f"g{other}"]}}
            began = time.monotonic()
            await kube.patch_raw(path_of(Port), port.name, patch, ns)
            while not in_set(target, ip):
                await asyncio.sleep(0.005)
            latencies.append(time.monotonic() - began)
            await kube.patch_raw(
                path_of(Port), port.name, {"spec": {"securityGroups": [f"g{home}"]}}, ns
            )
            while in_set(target, ip):
                await asyncio.sleep(0.02)
        latencies.sort()
        return {
            "ports": count,
            "groups": groups,
            "changes": changes,
            "membership_to_rule_p50_s": round(statistics.median(latencies), 3),
            "membership_to_rule_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
            "membership_to_rule_max_s": round(latencies[-1], 3),
            "first_sync_s": round(first_sync, 2),
            "rules_per_port": round(lines / count, 1),
            "ipsets": len(own_sets(names.prefix)),
            "cpus": os.cpu_count(),
        }
    finally:
        await kube.delete_raw(NAMESPACES, ns)
        await wait_for(lambda: namespace_gone(kube, ns), 300, "bench namespace deleted")

        async def firewall_gone() -> bool:
            return firewall_lines(names.prefix) == 0 and not own_sets(names.prefix)

        await wait_for(firewall_gone, 120, "the node's firewall removed")
        await kube.close()
        agent.stop()
        controller.stop()
        fabric.stop()
        shutil.rmtree(root, ignore_errors=True)


async def addressed(kube: Kube, ns: str, count: int) -> dict[str, Port] | None:
    ports = {p.name: p for p in await kube.list(Port, ns) if p.status.fixed_ips}
    return ports if len(ports) >= count else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", type=int, default=200)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--changes", type=int, default=40)
    args = parser.parse_args()
    install_crds()
    result = asyncio.run(run(args.ports, args.groups, args.changes))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
