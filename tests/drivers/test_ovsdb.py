"""The OVSDB client on a real ovsdb-server and ovs-vswitchd: a change that
fails half-way leaves the connection usable, and a port removed by another
client since the last read is not an error for the verbs that touch it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.ovsdb import OvsdbError
from nubes.drivers.runner import SubprocessRunner
from tests.nodes import Fabric

RUN = SubprocessRunner()


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path, ["o1"])
    yield fab
    fab.stop()


def test_a_failed_change_leaves_the_connection_usable(fabric: Fabric) -> None:
    ovs = Ovs(RUN, fabric.nodes[0].endpoint)
    with pytest.raises(OvsdbError, match="no bridge named br-missing"):
        ovs.ensure_port("br-missing", "p0")
    ovs.ensure_bridge("br-t", datapath_type="netdev")
    ovs.ensure_port("br-t", "p1", tag=5)
    assert ovs.ports("br-t")["p1"].tag == 5


def test_a_port_removed_by_another_client_is_left_gone(fabric: Fabric) -> None:
    node = fabric.nodes[0]
    ovs = Ovs(RUN, node.endpoint)
    ovs.ensure_bridge("br-t", datapath_type="netdev")
    ovs.ensure_port("br-t", "p1", tag=5)
    [port] = ovs.ports("br-t").values()
    Ovs(RUN, node.endpoint).delete_port("br-t", "p1")
    ovs.set_port(port.name, {"tag": "7"})  # read before the removal
    assert "p1" not in node.vsctl("list-ports", "br-t").split()
    ovs.ensure_port("br-t", "p2")
    assert sorted(ovs.ports("br-t")) == ["p2"]
