"""Bad input is rejected by the API server itself (schema and CEL rules), with
a message that names the field. Every case goes through `kubectl apply`
against the real kube-apiserver, as a user would."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.helpers import apply

NET = "network.nubes.io/v1alpha1"
STORAGE = "storage.nubes.io/v1alpha1"
COMPUTE = "compute.nubes.io/v1alpha1"
IMAGE = "image.nubes.io/v1alpha1"


def obj(
    api: str, kind: str, name: str, spec: dict[str, Any], namespace: str | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}


SUBNET = {"network": {"name": "n1"}, "cidr": "10.0.0.0/24"}
INSTANCE = {"flavor": "m1.tiny", "image": {"name": "cirros"}}

# (id, apiVersion, kind, spec, field named in the error, text of the error)
CREATE_CASES: list[tuple[str, str, str, dict[str, Any], str, str]] = [
    (
        "vlan-id-too-big",
        NET,
        "Network",
        {"type": "vlan", "physicalNetwork": "physnet1", "segmentationId": 4095},
        "spec.segmentationId",
        "VLAN id) must be within 1..4094",
    ),
    (
        "vni-too-big",
        NET,
        "Network",
        {"type": "vxlan", "segmentationId": 16777216},
        "spec.segmentationId",
        "VNI) must be within 1..16777215",
    ),
    (
        "segment-on-local",
        NET,
        "Network",
        {"type": "local", "segmentationId": 5},
        "spec.segmentationId",
        "segmentationId cannot be set for a local network",
    ),
    ("mtu-too-small", NET, "Network", {"mtu": 500}, "spec.mtu", "greater than or equal to 576"),
    ("mtu-too-big", NET, "Network", {"mtu": 9001}, "spec.mtu", "less than or equal to 9000"),
    (
        "unknown-network-type",
        NET,
        "Network",
        {"type": "geneve"},
        "spec.type",
        'Unsupported value: "geneve"',
    ),
    (
        "flat-without-physnet",
        NET,
        "Network",
        {"type": "flat"},
        "spec.physicalNetwork",
        "physicalNetwork is required for flat and vlan networks",
    ),
    (
        "malformed-cidr",
        NET,
        "Subnet",
        {**SUBNET, "cidr": "10.0.0.0/33"},
        "spec.cidr",
        "is not a CIDR",
    ),
    (
        "cidr-host-bits",
        NET,
        "Subnet",
        {**SUBNET, "cidr": "10.0.0.5/24"},
        "spec.cidr",
        "has host bits set",
    ),
    (
        "cidr-wrong-family",
        NET,
        "Subnet",
        {**SUBNET, "cidr": "fd00::/64"},
        "spec.cidr",
        "is not of the subnet's ipVersion",
    ),
    (
        "malformed-gateway",
        NET,
        "Subnet",
        {**SUBNET, "gatewayIp": "10.0.0.300"},
        "spec.gatewayIp",
        '"10.0.0.300" is not an IP address',
    ),
    (
        "gateway-outside-cidr",
        NET,
        "Subnet",
        {**SUBNET, "gatewayIp": "10.1.0.1"},
        "spec.gatewayIp",
        "gatewayIp 10.1.0.1 is outside cidr 10.0.0.0/24",
    ),
    (
        "pool-outside-cidr",
        NET,
        "Subnet",
        {**SUBNET, "allocationPools": [{"start": "10.0.0.10", "end": "10.0.1.10"}]},
        "spec.allocationPools",
        "allocationPools must lie inside cidr 10.0.0.0/24",
    ),
    (
        "pool-reversed",
        NET,
        "Subnet",
        {**SUBNET, "allocationPools": [{"start": "10.0.0.50", "end": "10.0.0.10"}]},
        "spec.allocationPools[0]",
        "allocation pool is reversed: start 10.0.0.50 is after end 10.0.0.10",
    ),
    (
        "malformed-dns",
        NET,
        "Subnet",
        {**SUBNET, "dnsNameservers": ["8.8.8"]},
        "spec.dnsNameservers[0]",
        '"8.8.8" is not an IP address',
    ),
    (
        "dns-other-family",
        NET,
        "Subnet",
        {**SUBNET, "dnsNameservers": ["10.0.0.53", "fd00::53"]},
        "spec.dnsNameservers",
        "dnsNameservers must be of the subnet's IP version",
    ),
    (
        "dns-duplicate",
        NET,
        "Subnet",
        {**SUBNET, "dnsNameservers": ["10.0.0.53", "10.0.0.53"]},
        "spec.dnsNameservers[1]",
        "Duplicate value",
    ),
    (
        "dns-too-many",
        NET,
        "Subnet",
        {**SUBNET, "dnsNameservers": [f"10.0.0.{i}" for i in range(1, 7)]},
        "spec.dnsNameservers",
        "must have at most 5 items",
    ),
    (
        "route-destination-other-family",
        NET,
        "Subnet",
        {**SUBNET, "hostRoutes": [{"destination": "fd00::/64", "nexthop": "10.0.0.254"}]},
        "spec.hostRoutes",
        "hostRoutes must be of the subnet's IP version",
    ),
    (
        "route-nexthop-other-family",
        NET,
        "Subnet",
        {**SUBNET, "hostRoutes": [{"destination": "10.9.0.0/16", "nexthop": "fd00::1"}]},
        "spec.hostRoutes",
        "hostRoutes must be of the subnet's IP version",
    ),
    (
        "route-destination-host-bits",
        NET,
        "Subnet",
        {**SUBNET, "hostRoutes": [{"destination": "10.9.0.1/16", "nexthop": "10.0.0.254"}]},
        "spec.hostRoutes[0].destination",
        "destination 10.9.0.1/16 has host bits set",
    ),
    (
        "route-duplicate",
        NET,
        "Subnet",
        {
            **SUBNET,
            "hostRoutes": [{"destination": "10.9.0.0/16", "nexthop": "10.0.0.254"}] * 2,
        },
        "spec.hostRoutes[1]",
        "Duplicate value",
    ),
    (
        # 21 routes would not fit option 121 (255 bytes): dnsmasq refused to start.
        "routes-too-many",
        NET,
        "Subnet",
        {
            **SUBNET,
            "hostRoutes": [
                {"destination": f"10.9.{i}.7/32", "nexthop": "10.0.0.254"} for i in range(21)
            ],
        },
        "spec.hostRoutes",
        "must have at most 20 items",
    ),
    (
        "gateway-other-family",
        NET,
        "Subnet",
        {**SUBNET, "gatewayIp": "fd00::1"},
        "spec.gatewayIp",
        "gatewayIp fd00::1 is outside cidr 10.0.0.0/24",
    ),
    (
        "pool-other-family",
        NET,
        "Subnet",
        {**SUBNET, "allocationPools": [{"start": "fd00::10", "end": "fd00::20"}]},
        "spec.allocationPools",
        "allocationPools must lie inside cidr 10.0.0.0/24",
    ),
    (
        "mac-multicast",
        NET,
        "Port",
        {"network": {"name": "n1"}, "macAddress": "01:00:5e:00:00:01"},
        "spec.macAddress",
        '"01:00:5e:00:00:01" is a multicast MAC address',
    ),
    (
        "mac-broadcast",
        NET,
        "Port",
        {"network": {"name": "n1"}, "macAddress": "ff:ff:ff:ff:ff:ff"},
        "spec.macAddress",
        "is a multicast MAC address",
    ),
    (
        "mac-zero",
        NET,
        "Port",
        {"network": {"name": "n1"}, "macAddress": "00:00:00:00:00:00"},
        "spec.macAddress",
        "00:00:00:00:00:00 is not a usable MAC address",
    ),
    (
        "pair-mac-multicast",
        NET,
        "Port",
        {
            "network": {"name": "n1"},
            "allowedAddressPairs": [{"ipAddress": "10.0.0.9", "macAddress": "33:33:00:00:00:01"}],
        },
        "spec.allowedAddressPairs[0].macAddress",
        "is a multicast MAC address",
    ),
    (
        "port-security-group-name-too-long",
        NET,
        "Port",
        {"network": {"name": "n1"}, "securityGroups": ["x" * 254]},
        "spec.securityGroups[0]",
        "may not be more than 253",
    ),
    (
        "az-hint-too-long",
        NET,
        "Network",
        {"availabilityZoneHints": ["z" * 256]},
        "spec.availabilityZoneHints[0]",
        "may not be more than 255",
    ),
    (
        "malformed-mac",
        NET,
        "Port",
        {"network": {"name": "n1"}, "macAddress": "fa:16:3e:zz:00:01"},
        "spec.macAddress",
        "should match",
    ),
    (
        "derived-mac",
        NET,
        "Port",
        {"network": {"name": "n1"}, "macAddress": "0A:4E:0a:00:00:05"},
        "spec.macAddress",
        "the range of MACs derived from the IPv4 addresses of ports",
    ),
    (
        "malformed-fixed-ip",
        NET,
        "Port",
        {"network": {"name": "n1"}, "fixedIps": [{"ipAddress": "1.2.3"}]},
        "spec.fixedIps[0].ipAddress",
        '"1.2.3" is not an IP address',
    ),
    (
        "port-range-reversed",
        NET,
        "SecurityGroup",
        {"rules": [{"protocol": "tcp", "portRangeMin": 90, "portRangeMax": 80}]},
        "spec.rules[0]",
        "portRangeMin must not exceed portRangeMax",
    ),
    (
        "volume-size-zero",
        STORAGE,
        "Volume",
        {"sizeGib": 0},
        "spec.sizeGib",
        "greater than or equal to 1",
    ),
    (
        "volume-size-negative",
        STORAGE,
        "Volume",
        {"sizeGib": -3},
        "spec.sizeGib",
        "greater than or equal to 1",
    ),
    (
        "volume-two-sources",
        STORAGE,
        "Volume",
        {"sizeGib": 1, "source": {"snapshot": "a", "volume": "b"}},
        "spec.source",
        "exactly one of image, snapshot, volume or backup",
    ),
    (
        "flavor-no-vcpu",
        COMPUTE,
        "Flavor",
        {"vcpus": 0, "ramMib": 512},
        "spec.vcpus",
        "greater than or equal to 1",
    ),
    (
        "flavor-no-ram",
        COMPUTE,
        "Flavor",
        {"vcpus": 1, "ramMib": 0},
        "spec.ramMib",
        "greater than or equal to 64",
    ),
    (
        "instance-unknown-power-state",
        COMPUTE,
        "Instance",
        {**INSTANCE, "powerState": "Hibernated"},
        "spec.powerState",
        'Unsupported value: "Hibernated"',
    ),
    (
        "instance-metadata-value-too-long",
        COMPUTE,
        "Instance",
        {**INSTANCE, "metadata": {"k": "v" * 256}},
        "spec.metadata.k",
        "may not be more than 255",
    ),
    (
        "instance-metadata-key-too-long",
        COMPUTE,
        "Instance",
        {**INSTANCE, "metadata": {"k" * 256: "v"}},
        "spec.metadata",
        "metadata keys must be 1 to 255 characters long",
    ),
    (
        "instance-security-group-name-too-long",
        COMPUTE,
        "Instance",
        {**INSTANCE, "securityGroups": ["x" * 254]},
        "spec.securityGroups[0]",
        "may not be more than 253",
    ),
    (
        "instance-two-boot-sources",
        COMPUTE,
        "Instance",
        {**INSTANCE, "bootVolume": {"name": "v"}},
        "spec",
        "exactly one of image or bootVolume is required",
    ),
    (
        "image-bad-checksum",
        IMAGE,
        "Image",
        {"source": {"url": "http://127.0.0.1/x.img"}, "diskFormat": "qcow2", "sha256": "xyz"},
        "spec.sha256",
        "should match",
    ),
    (
        "image-bad-url",
        IMAGE,
        "Image",
        {"source": {"url": "ftp://x/y"}, "diskFormat": "raw"},
        "spec.source.url",
        "url must be http://, https:// or file:///",
    ),
    (
        "image-shared-with-private",
        IMAGE,
        "Image",
        {"source": {"url": "http://127.0.0.1/x"}, "diskFormat": "raw", "sharedWith": ["p2"]},
        "spec.sharedWith",
        "sharedWith is only allowed with visibility shared",
    ),
    (
        "image-unknown-format",
        IMAGE,
        "Image",
        {"source": {"url": "http://127.0.0.1/x"}, "diskFormat": "vmdk"},
        "spec.diskFormat",
        'Unsupported value: "vmdk"',
    ),
]

CLUSTER_SCOPED = {"Flavor"}


@pytest.mark.parametrize(
    ("api", "kind", "spec", "field", "text"),
    [c[1:] for c in CREATE_CASES],
    ids=[c[0] for c in CREATE_CASES],
)
def test_rejected_on_create(
    namespace: str, api: str, kind: str, spec: dict[str, Any], field: str, text: str
) -> None:
    ns = None if kind in CLUSTER_SCOPED else namespace
    result = apply(obj(api, kind, f"bad-{kind.lower()}", spec, ns), check=False)
    assert result.returncode != 0, f"accepted: {yaml.safe_dump(spec)}"
    assert f"{field}:" in result.stderr, result.stderr
    assert text in result.stderr, result.stderr


# (id, apiVersion, kind, valid spec, changed spec, field, text)
UPDATE_CASES: list[tuple[str, str, str, dict[str, Any], dict[str, Any], str, str]] = [
    (
        "network-type",
        NET,
        "Network",
        {"type": "vxlan"},
        {"type": "gre"},
        "spec.type",
        "type is immutable",
    ),
    (
        "network-segment",
        NET,
        "Network",
        {"type": "vxlan", "segmentationId": 77},
        {"type": "vxlan", "segmentationId": 78},
        "spec.segmentationId",
        "segmentationId is immutable",
    ),
    (
        "subnet-cidr",
        NET,
        "Subnet",
        SUBNET,
        {**SUBNET, "cidr": "10.0.1.0/24"},
        "spec.cidr",
        "cidr is immutable",
    ),
    (
        "port-network",
        NET,
        "Port",
        {"network": {"name": "n1"}},
        {"network": {"name": "n2"}},
        "spec.network",
        "network is immutable",
    ),
    (
        "volume-type",
        STORAGE,
        "Volume",
        {"sizeGib": 1, "volumeType": "a"},
        {"sizeGib": 1, "volumeType": "b"},
        "spec.volumeType",
        "volumeType is immutable",
    ),
    (
        "volume-shrink",
        STORAGE,
        "Volume",
        {"sizeGib": 5},
        {"sizeGib": 4},
        "spec.sizeGib",
        "sizeGib can only grow",
    ),
    (
        "instance-flavor",
        COMPUTE,
        "Instance",
        INSTANCE,
        {**INSTANCE, "flavor": "m1.large"},
        "spec.flavor",
        "flavor is immutable; resize with an InstanceAction",
    ),
    (
        "flavor-anything",
        COMPUTE,
        "Flavor",
        {"vcpus": 1, "ramMib": 512},
        {"vcpus": 2, "ramMib": 512},
        "spec",
        "a flavor is immutable",
    ),
]


@pytest.mark.parametrize(
    ("api", "kind", "before", "after", "field", "text"),
    [c[1:] for c in UPDATE_CASES],
    ids=[c[0] for c in UPDATE_CASES],
)
def test_rejected_on_update(
    namespace: str,
    api: str,
    kind: str,
    before: dict[str, Any],
    after: dict[str, Any],
    field: str,
    text: str,
) -> None:
    ns = None if kind in CLUSTER_SCOPED else namespace
    name = f"upd-{namespace}"
    apply(obj(api, kind, name, before, ns))
    try:
        result = apply(obj(api, kind, name, after, ns), check=False)
        assert result.returncode != 0, f"change accepted: {after}"
        assert f"{field}:" in result.stderr, result.stderr
        assert text in result.stderr, result.stderr
    finally:
        if ns is None:
            from tests.helpers import kubectl

            kubectl("delete", kind.lower(), name, "--wait=false", check=False)


def test_volume_can_grow(namespace: str) -> None:
    apply(obj(STORAGE, "Volume", "grow", {"sizeGib": 1}, namespace))
    apply(obj(STORAGE, "Volume", "grow", {"sizeGib": 2}, namespace))


def test_valid_objects_accepted_with_defaults(namespace: str) -> None:
    apply(obj(NET, "Network", "n1", {}, namespace))
    apply(
        obj(
            NET,
            "Subnet",
            "s1",
            {
                "network": {"name": "n1"},
                "cidr": "10.0.0.0/24",
                "allocationPools": [{"start": "10.0.0.10", "end": "10.0.0.99"}],
            },
            namespace,
        )
    )
    from tests.helpers import kubectl

    image_spec = {"source": {"url": "http://127.0.0.1/x.img"}, "diskFormat": "raw"}
    apply(obj(IMAGE, "Image", "img", image_spec, namespace))
    apply(obj(COMPUTE, "Instance", "vm", INSTANCE, namespace))
    net = yaml.safe_load(kubectl("get", "network", "n1", "-n", namespace, "-o", "yaml").stdout)
    assert net["spec"]["type"] == "vxlan"
    assert net["spec"]["portSecurityEnabled"] is True
