"""Users find every kind with kubectl: categories, short names, explain."""

from __future__ import annotations

from nubes.api.registry import ALL_KINDS
from tests.helpers import kubectl


def test_every_kind_is_served_in_its_categories() -> None:
    out = kubectl("api-resources", "--categories=nubes", "-o", "name").stdout.split()
    expected = {f"{k.crd.plural}.{k.crd.group}" for k in ALL_KINDS if k.crd.kind != "Allocation"}
    assert expected == set(out)
    for service, group in [
        ("neutron", "network"),
        ("nova", "compute"),
        ("cinder", "storage"),
        ("glance", "image"),
        ("keystone", "identity"),
    ]:
        names = kubectl("api-resources", f"--categories={service}", "-o", "name").stdout.split()
        assert names and all(n.endswith(f".{group}.nubes.io") for n in names), names


def test_get_nubes_lists_every_kind(namespace: str) -> None:
    manifests = f"""
apiVersion: network.nubes.io/v1alpha1
kind: Network
metadata: {{name: net1, namespace: {namespace}}}
spec: {{}}
---
apiVersion: storage.nubes.io/v1alpha1
kind: Volume
metadata: {{name: vol1, namespace: {namespace}}}
spec: {{sizeGib: 1}}
---
apiVersion: compute.nubes.io/v1alpha1
kind: Instance
metadata: {{name: vm1, namespace: {namespace}}}
spec: {{flavor: m1.tiny, image: {{name: img1}}}}
"""
    kubectl("apply", "-f", "-", input=manifests)
    out = kubectl("get", "nubes", "-n", namespace).stdout
    for kind in (
        "network.network.nubes.io/net1",
        "volume.storage.nubes.io/vol1",
        "instance.compute.nubes.io/vm1",
    ):
        assert kind in out, out


def test_explain_shows_documented_fields() -> None:
    out = kubectl("explain", "instance.spec").stdout
    assert "A virtual machine." in out
    for field in ("flavor", "image", "networks", "powerState", "locked", "userData", "volumes"):
        assert field in out, out
    assert "Desired power state" in out
    out = kubectl("explain", "subnet.spec.allocationPools").stdout
    assert "Ranges ports are allocated from" in out
