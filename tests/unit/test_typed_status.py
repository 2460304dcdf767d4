"""Writers hand their kind's status model to Outcome; the runtime still gets
the wire dict the hand-built camelCase dicts used to be: only the fields set
explicitly, an explicit None kept (the write clears that field)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nubes.api.network import (
    FixedIp,
    FloatingIPStatus,
    PortStatus,
    Route,
    RouterPortStatus,
    RouterStatus,
)
from nubes.api.storage import VolumeAttachmentStatus
from nubes.controllers.storage import merged
from nubes.runtime.reconcile import Outcome, wire_status

MAC = "fa:16:3e:00:00:01"


def port_status(host: str | None, dhcp_node: str | None) -> PortStatus:
    # As controllers/port.py builds it.
    return PortStatus(
        mac_address=MAC,
        fixed_ips=[FixedIp(subnet="sub", ip_address="10.0.0.5")],
        mtu=1450,
        network_uid="net-uid",
        host=host,
        dhcp_node=dhcp_node,
        port_security_enabled=True,
        security_groups=["default"],
    )


def test_port_status_model_gives_the_old_wire_dict() -> None:
    # The dict controllers/port.py built by hand before it built PortStatus.
    old = {
        "macAddress": MAC,
        "fixedIps": [{"subnet": "sub", "ipAddress": "10.0.0.5"}],
        "mtu": 1450,
        "networkUid": "net-uid",
        "host": None,
        "dhcpNode": "node-a",
        "portSecurityEnabled": True,
        "securityGroups": ["default"],
    }
    status = port_status(host=None, dhcp_node="node-a")
    for outcome in (
        Outcome.ready(status, "ok"),
        Outcome.progressing("WaitingForBinding", "not yet plugged", status),
        Outcome.stalled("IpAddressExhausted", "no free address", status),
        Outcome.observed(status),
    ):
        assert outcome.status == old
        # The explicit None is there, so the write clears an old host.
        assert "host" in outcome.status and outcome.status["host"] is None
    # Fields the writer does not own (the agents' binding and dhcp, conditions)
    # are not in its write at all, not even as None.
    assert not {"binding", "dhcp", "conditions", "observedGeneration"} & set(old)


def test_dict_status_still_accepted_and_copied() -> None:
    fields = {"node": "n1"}
    outcome = Outcome.progressing("Creating", "taking it", fields)
    assert outcome.status == {"node": "n1"}
    assert outcome.status is not fields
    assert Outcome.ready().status == {}
    assert wire_status(None) == {}


def test_router_and_floating_ip_clear_unused_fields_explicitly() -> None:
    routes = [Route.model_validate({"destination": "10.1.0.0/24", "nexthop": "10.0.0.9"})]
    status = RouterStatus(
        node="n1",
        interfaces=[
            RouterPortStatus(
                name="r-sub",
                namespace="p",
                subnet="sub",
                cidr="10.0.0.0/24",
                ip_address="10.0.0.1/24",
            )
        ],
        routes=routes,
        gateway_ip=None,
        gateway_port=None,
        external_network_uid=None,
        enable_snat=None,
    )
    assert Outcome.ready(status).status == {
        "node": "n1",
        "interfaces": [
            {
                "name": "r-sub",
                "namespace": "p",
                "subnet": "sub",
                "cidr": "10.0.0.0/24",
                "ipAddress": "10.0.0.1/24",
            }
        ],
        "routes": [{"destination": "10.1.0.0/24", "nexthop": "10.0.0.9"}],
        "gatewayIp": None,
        "gatewayPort": None,
        "externalNetworkUid": None,
        "enableSnat": None,
    }
    fip = FloatingIPStatus(
        floating_ip_address="203.0.113.7",
        subnet="ext",
        fixed_ip_address=None,
        port_uid=None,
        router=None,
        node=None,
    )
    assert Outcome.ready(fip).status == {
        "floatingIpAddress": "203.0.113.7",
        "subnet": "ext",
        "fixedIpAddress": None,
        "portUid": None,
        "router": None,
        "node": None,
    }


def test_a_wrong_type_fails_at_the_writer() -> None:
    with pytest.raises(ValidationError):
        PortStatus(mtu="big")  # type: ignore[arg-type]


def test_attachment_clears_only_what_the_stored_value_has() -> None:
    wanted = VolumeAttachmentStatus(instance="vm", instance_uid="u", node=None, boot=False)
    fresh = merged(None, wanted)
    assert fresh is not None
    assert fresh.patch() == {"instance": "vm", "instanceUid": "u", "boot": False}
    stored = VolumeAttachmentStatus(instance="vm", instance_uid="u", node="n1")
    cleared = merged(stored, wanted)
    assert cleared is not None
    assert cleared.patch() == {"instance": "vm", "instanceUid": "u", "node": None, "boot": False}
