"""CPU of one networking pass on a node's switch: what the agent does to
its Open vSwitch on every pass (local VLANs, flows, tunnels, reading and
binding every VIF), with 8 networks, 3 tunnel peers and 100 VIFs.

Runs against a simulated node (its own ovsdb-server and ovs-vswitchd in a
namespace); needs no cluster. CPU counts this process and its children
(ovs-vsctl, ovs-ofctl). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.switch import NetworkSegment, NodeSwitch
from nubes.drivers.runner import SubprocessRunner
from tests.nodes import Fabric


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run(passes: int, vifs: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="nubes-bench-netpass-"))
    fabric = Fabric.start(root, ["p1"])
    try:
        node = fabric.nodes[0]
        switch = NodeSwitch(
            Ovs(SubprocessRunner(), node.endpoint),
            datapath_type="netdev",
            tunnel_ip=node.tunnel_ip,
        )
        switch.ensure_base()
        networks = [
            NetworkSegment(f"{i:08x}-0000-0000-0000-000000000000", "vxlan", segmentation_id=100 + i)
            for i in range(8)
        ]
        peers = ["172.31.0.10", "172.31.0.11", "172.31.0.12"]
        switch.converge(networks, peers)
        for i in range(vifs):
            mac = f"fa:16:3e:00:{i // 256:02x}:{i % 256:02x}"
            switch.add_vif(f"qvobench{i:03d}", f"port-{i}", mac)

        def one_pass() -> None:
            local = switch.converge(networks, peers)
            for uid, port in switch.vif_ports().items():
                switch.bind(port, local[networks[int(uid.split("-")[1]) % len(networks)].uid])

        one_pass()  # settles the bindings this loop wants
        cpu, wall = cpu_seconds(), time.monotonic()
        for _ in range(passes):
            one_pass()
        cpu, wall = cpu_seconds() - cpu, time.monotonic() - wall
        return {
            "benchmark": "netpass",
            "passes": passes,
            "vifs": vifs,
            "networks": len(networks),
            "cpu_ms_per_pass": round(cpu / passes * 1000, 2),
            "wall_ms_per_pass": round(wall / passes * 1000, 2),
        }
    finally:
        fabric.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--vifs", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(run(args.passes, args.vifs)))


if __name__ == "__main__":
    main()
