"""Least privilege for the components (issue 8, point 3), against the real API
server with the chart's roles and admission policies.

Every identity here is a real ServiceAccount token: the controller's, and
the node agent's bound to a Node (as kubelet projects it into a DaemonSet
pod; `kubectl create token --bound-object-kind Node` here), which the API
server turns into the user extra authentication.kubernetes.io/node-name.
The admin credentials only set the scene (objects, their controller-written
status); no answer below comes from system:masters.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from nubes.runtime.kube import CONFIGMAPS, ApiError, Kube
from tests.helpers import kubectl, kubectl_bin
from tests.integration.conftest import COMPONENTS_NAMESPACE
from tests.integration.identity import sa_token, token_kubeconfig

NODE_EXTRA = "authentication.kubernetes.io/node-name"
AGENT_USER = f"system:serviceaccount:{COMPONENTS_NAMESPACE}:nubes-agent"
POLICY = "nubes-agent-node"


@dataclass(frozen=True)
class Identity:
    """kubectl acting with one ServiceAccount token (and nothing else: a
    kubeconfig of its own, so no admin client certificate comes along)."""

    name: str
    kubeconfig: Path

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [kubectl_bin(), "--kubeconfig", str(self.kubeconfig), *args]
        return subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=60, check=False
        )

    def can(self, verb: str, resource: str, namespace: str | None) -> bool:
        scope = ["-A"] if namespace == "*" else ["-n", namespace] if namespace else []
        sub: list[str] = []
        if "/" in resource:
            resource, subresource = resource.split("/", 1)
            sub = [f"--subresource={subresource}"]
        got = self.run("auth", "can-i", verb, resource, *scope, *sub)
        assert got.stdout.strip() in ("yes", "no"), got.stderr
        return got.stdout.strip() == "yes"

    def patch_status(self, kind: str, name: str, ns: str | None, status: dict[str, Any]) -> Any:
        scope = ["-n", ns] if ns else []
        body = json.dumps({"status": status})
        return self.run(
            "patch", kind, name, *scope, "--subresource=status", "--type=merge", "-p", body
        )

    def patch(self, kind: str, name: str, ns: str | None, patch: dict[str, Any]) -> Any:
        scope = ["-n", ns] if ns else []
        return self.run("patch", kind, name, *scope, "--type=merge", "-p", json.dumps(patch))

    def create(self, manifest: dict[str, Any]) -> Any:
        return self.run("create", "-f", "-", input=yaml.safe_dump(manifest))


def allowed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def refused_by_policy(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, f"allowed: {result.stdout}"
    assert POLICY in result.stderr and "denied request" in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def refused_by_rbac(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0, f"allowed: {result.stdout}"
    assert "Forbidden" in result.stderr or "forbidden" in result.stderr, result.stderr
    assert POLICY not in result.stderr, result.stderr


@dataclass(frozen=True)
class Cast:
    node_a: str
    node_b: str
    agent_a: Identity
    agent_b: Identity
    agent_unbound: Identity
    controller: Identity


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cast]:
    prefix = f"rights-{uuid.uuid4().hex[:6]}"
    node_a, node_b = f"{prefix}-a", f"{prefix}-b"
    # Node objects stand for the kubelets' (none run here): tokens bind to them.
    for node in (node_a, node_b):
        kubectl(
            "create",
            "-f",
            "-",
            input=yaml.safe_dump({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        )
    directory = tmp_path_factory.mktemp("tokens")
    try:
        yield Cast(
            node_a,
            node_b,
            Identity(
                "agent-a", token_kubeconfig(directory, "agent-a", sa_token("nubes-agent", node_a))
            ),
            Identity(
                "agent-b", token_kubeconfig(directory, "agent-b", sa_token("nubes-agent", node_b))
            ),
            Identity(
                "agent-unbound",
                token_kubeconfig(directory, "agent-unbound", sa_token("nubes-agent")),
            ),
            Identity(
                "controller",
                token_kubeconfig(directory, "controller", sa_token("nubes-controller")),
            ),
        )
    finally:
        kubectl("delete", "node", node_a, node_b, "--ignore-not-found", check=False)
        kubectl("delete", "hypervisor", node_a, node_b, "--ignore-not-found", check=False)


def test_a_node_bound_agent_token_names_its_node(cast: Cast) -> None:
    got = cast.agent_a.run("auth", "whoami", "-o", "json")
    allowed(got)
    user = json.loads(got.stdout)["status"]["userInfo"]
    assert user["username"] == AGENT_USER
    assert user["extra"][NODE_EXTRA] == [cast.node_a]
    unbound = json.loads(cast.agent_unbound.run("auth", "whoami", "-o", "json").stdout)
    assert NODE_EXTRA not in unbound["status"]["userInfo"].get("extra", {})


# (identity, verb, resource, namespace: "tenant", "components", "*" or None, expected)
RIGHTS: list[tuple[str, str, str, str | None, bool]] = [
    # The controller: no Secret and no ConfigMap anywhere.
    ("controller", "get", "secrets", "*", False),
    ("controller", "list", "secrets", "tenant", False),
    ("controller", "create", "secrets", "components", False),
    ("controller", "get", "secrets", "components", False),
    ("controller", "create", "configmaps", "tenant", False),
    ("controller", "patch", "configmaps", "*", False),
    ("controller", "delete", "configmaps", "tenant", False),
    # ... and what it does use.
    ("controller", "create", "namespaces", None, True),
    ("controller", "delete", "namespaces", None, False),
    ("controller", "patch", "instances.compute.nubes.io/status", "tenant", True),
    ("controller", "patch", "hypervisors.compute.nubes.io/status", None, True),
    ("controller", "create", "ports.network.nubes.io", "tenant", True),
    ("controller", "delete", "ports.network.nubes.io", "tenant", True),
    ("controller", "create", "allocations.network.nubes.io", None, True),
    # A project's `default` security group, and its members in the status.
    ("controller", "create", "securitygroups.network.nubes.io", "tenant", True),
    ("controller", "patch", "securitygroups.network.nubes.io/status", "tenant", True),
    ("controller", "delete", "securitygroups.network.nubes.io", "tenant", False),
    ("controller", "create", "instances.compute.nubes.io", "tenant", False),
    ("controller", "delete", "instances.compute.nubes.io", "tenant", False),
    ("controller", "delete", "hypervisors.compute.nubes.io", None, False),
    ("controller", "patch", "networks.network.nubes.io", "tenant", True),
    ("controller", "create", "rolebindings.rbac.authorization.k8s.io", "tenant", True),
    ("controller", "list", "rolebindings.rbac.authorization.k8s.io", "tenant", True),
    ("controller", "delete", "rolebindings.rbac.authorization.k8s.io", "tenant", False),
    ("controller", "create", "roles.rbac.authorization.k8s.io", "tenant", False),
    # Expired application credentials (only those: nubes-controller-serviceaccounts).
    ("controller", "delete", "serviceaccounts", "tenant", True),
    ("controller", "create", "serviceaccounts", "tenant", False),
    ("controller", "create", "serviceaccounts/token", "tenant", False),
    ("controller", "create", "events", "tenant", True),
    # The agent: Secrets only in the components' namespace, never a tenant's.
    ("agent-a", "get", "secrets", "tenant", False),
    ("agent-a", "list", "secrets", "*", False),
    ("agent-a", "create", "secrets", "tenant", False),
    ("agent-a", "get", "secrets", "components", True),
    ("agent-a", "create", "secrets", "components", True),
    ("agent-a", "delete", "secrets", "components", True),
    ("agent-a", "list", "secrets", "components", False),
    ("agent-a", "get", "configmaps", "tenant", False),
    ("agent-a", "create", "configmaps", "tenant", True),
    # Status of its kinds (admission narrows it to its node), nothing of the spec.
    ("agent-a", "patch", "ports.network.nubes.io/status", "tenant", True),
    ("agent-a", "patch", "ports.network.nubes.io", "tenant", False),
    ("agent-a", "create", "ports.network.nubes.io", "tenant", False),
    ("agent-a", "delete", "ports.network.nubes.io", "tenant", False),
    # The DHCP state of networks its DHCP server serves (admission: status.dhcpNode).
    ("agent-a", "patch", "networks.network.nubes.io/status", "tenant", True),
    ("agent-a", "patch", "networks.network.nubes.io", "tenant", False),
    # The L3 state of routers placed on its node (admission: status.node).
    ("agent-a", "patch", "routers.network.nubes.io/status", "tenant", True),
    ("agent-a", "patch", "routers.network.nubes.io", "tenant", False),
    ("agent-a", "patch", "floatingips.network.nubes.io/status", "tenant", False),
    # Security groups: read (the node's firewall), never written.
    ("agent-a", "watch", "securitygroups.network.nubes.io", "*", True),
    ("agent-a", "patch", "securitygroups.network.nubes.io/status", "tenant", False),
    ("agent-a", "patch", "hypervisors.compute.nubes.io/status", None, True),
    ("agent-a", "create", "hypervisors.compute.nubes.io", None, True),
    ("agent-a", "delete", "hypervisors.compute.nubes.io", None, False),
    ("agent-a", "create", "instances.compute.nubes.io", "tenant", False),
    ("agent-a", "delete", "instances.compute.nubes.io", "tenant", False),
    ("agent-a", "override-lock", "instances.compute.nubes.io", "tenant", False),
    ("agent-a", "patch", "images.image.nubes.io", "tenant", False),
    ("agent-a", "create", "namespaces", None, False),
    ("agent-a", "create", "events", "tenant", False),
    ("agent-a", "create", "rolebindings.rbac.authorization.k8s.io", "tenant", False),
]


@pytest.mark.parametrize(("who", "verb", "resource", "where", "expected"), RIGHTS)
def test_rights_of_each_component(
    cast: Cast, who: str, verb: str, resource: str, where: str | None, expected: bool
) -> None:
    identity = {"controller": cast.controller, "agent-a": cast.agent_a}[who]
    # RBAC answers for any project namespace alike: no need to create one.
    scope = {"tenant": "some-project", "components": COMPONENTS_NAMESPACE}.get(where or "", where)
    assert identity.can(verb, resource, scope) is expected


def test_the_components_cannot_read_tenant_secrets(cast: Cast, namespace: str) -> None:
    kubectl("create", "secret", "generic", "mine", "-n", namespace, "--from-literal=k=v")
    refused_by_rbac(cast.agent_a.run("get", "secret", "mine", "-n", namespace))
    refused_by_rbac(cast.controller.run("get", "secret", "mine", "-n", namespace))
    refused_by_rbac(cast.controller.run("get", "secrets", "-n", COMPONENTS_NAMESPACE))


def test_the_controller_deletes_only_application_credentials(cast: Cast, namespace: str) -> None:
    # A stand-in in the components' namespace: were the policy broken, the
    # components' own accounts would survive this test.
    decoy = f"decoy-{uuid.uuid4().hex[:6]}"
    kubectl("create", "serviceaccount", decoy, "-n", COMPONENTS_NAMESPACE)
    kubectl("create", "serviceaccount", "plain", "-n", namespace)
    kubectl("create", "serviceaccount", "app", "-n", namespace)
    kubectl("label", "serviceaccount", "app", "nubes.io/app-credential=true", "-n", namespace)
    try:
        for name, where in (("plain", namespace), (decoy, COMPONENTS_NAMESPACE)):
            got = cast.controller.run("delete", "serviceaccount", name, "-n", where)
            assert got.returncode != 0, got.stdout
            assert "nubes-controller-serviceaccounts" in got.stderr, got.stderr
            assert "deletes only application credentials" in got.stderr
            assert kubectl("get", "serviceaccount", name, "-n", where).returncode == 0
        allowed(cast.controller.run("delete", "serviceaccount", "app", "-n", namespace))
    finally:
        kubectl("delete", "serviceaccount", decoy, "-n", COMPONENTS_NAMESPACE, check=False)


def test_an_agent_writes_only_its_own_hypervisor(cast: Cast) -> None:
    a, b = cast.node_a, cast.node_b
    hv = {"apiVersion": "compute.nubes.io/v1alpha1", "kind": "Hypervisor", "spec": {}}
    refused_by_policy(
        cast.agent_a.create({**hv, "metadata": {"name": b}}), f"agent of node {a}", "Hypervisor"
    )
    allowed(cast.agent_a.create({**hv, "metadata": {"name": a}}))
    allowed(cast.agent_b.create({**hv, "metadata": {"name": b}}))
    beat = {"heartbeatTime": "2025-01-01T00:00:00Z", "vcpus": 2}
    allowed(cast.agent_a.patch_status("hypervisor", a, None, beat))
    refused_by_policy(cast.agent_a.patch_status("hypervisor", b, None, beat), "own Hypervisor")
    # Not the controller's part of its own status either.
    ready = {
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Forged",
                "message": "",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            }
        ]
    }
    refused_by_policy(cast.agent_a.patch_status("hypervisor", a, None, ready))
    # Without a node name the agent's identity writes nothing.
    refused_by_policy(cast.agent_unbound.patch_status("hypervisor", a, None, beat), "name no node")


def _port(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "network.nubes.io/v1alpha1",
        "kind": "Port",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"network": {"name": "net"}},
    }


def test_an_agent_binds_only_ports_of_its_node(cast: Cast, namespace: str) -> None:
    a, b, ns = cast.node_a, cast.node_b, namespace
    for name in ("port-a", "port-b"):
        kubectl("create", "-f", "-", input=yaml.safe_dump(_port(ns, name)))
    # What the controller writes: where each port is bound, who serves DHCP.
    kubectl(
        "patch",
        "port",
        "port-a",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"host": a, "dhcpNode": b, "macAddress": "fa:16:3e:00:00:0a"}}),
    )
    kubectl(
        "patch",
        "port",
        "port-b",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"host": b, "dhcpNode": a, "macAddress": "fa:16:3e:00:00:0b"}}),
    )

    def binding(node: str) -> dict[str, Any]:
        return {"binding": {"node": node, "device": "qvo1", "localVlan": 1, "active": True}}

    def dhcp(node: str, mac: str) -> dict[str, Any]:
        return {"dhcp": {"node": node, "macAddress": mac, "ipAddresses": ["10.0.0.5"]}}

    allowed(cast.agent_a.patch_status("port", "port-a", ns, binding(a)))
    refused_by_policy(cast.agent_a.patch_status("port", "port-b", ns, binding(a)), "port-b")
    allowed(cast.agent_b.patch_status("port", "port-b", ns, binding(b)))
    # A's DHCP server serves port-b: its entry, and only that.
    allowed(cast.agent_a.patch_status("port", "port-b", ns, dhcp(a, "fa:16:3e:00:00:0b")))
    refused_by_policy(cast.agent_a.patch_status("port", "port-a", ns, dhcp(a, "fa:16:3e:00:00:0a")))
    # No agent moves a port to or from a node.
    refused_by_policy(cast.agent_a.patch_status("port", "port-a", ns, {"host": b}))
    refused_by_policy(cast.agent_b.patch_status("port", "port-b", ns, {"host": a}))
    refused_by_policy(
        cast.agent_a.patch_status("port", "port-a", ns, {"dhcpNode": a, **dhcp(a, "x")})
    )
    got = json.loads(kubectl("get", "port", "port-b", "-n", ns, "-o", "json").stdout)["status"]
    assert (got["host"], got["binding"]["node"], got["dhcp"]["node"]) == (b, b, a)


def test_an_agent_writes_only_the_l3_state_of_routers_of_its_node(
    cast: Cast, namespace: str
) -> None:
    a, b, ns = cast.node_a, cast.node_b, namespace
    for name, node in (("router-a", a), ("router-b", b)):
        kubectl(
            "create",
            "-f",
            "-",
            input=yaml.safe_dump(
                {
                    "apiVersion": "network.nubes.io/v1alpha1",
                    "kind": "Router",
                    "metadata": {"name": name, "namespace": ns},
                }
            ),
        )
        # What the controller writes: the router's node and its gateway.
        kubectl(
            "patch",
            "router",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"node": node, "gatewayIp": "203.0.113.5"}}),
        )

    def l3(node: str) -> dict[str, Any]:
        return {"l3": {"node": node, "ready": True, "floatingIps": ["203.0.113.9"]}}

    allowed(cast.agent_a.patch_status("router", "router-a", ns, l3(a)))
    refused_by_policy(cast.agent_a.patch_status("router", "router-b", ns, l3(a)), "router-b")
    # No agent moves a router or changes what the controller decided.
    refused_by_policy(cast.agent_a.patch_status("router", "router-a", ns, {"node": b}))
    refused_by_policy(
        cast.agent_a.patch_status("router", "router-a", ns, {"gatewayIp": "203.0.113.6"})
    )
    got = json.loads(kubectl("get", "router", "router-a", "-n", ns, "-o", "json").stdout)
    assert got["status"]["node"] == a and got["status"]["gatewayIp"] == "203.0.113.5"


def _instance(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "compute.nubes.io/v1alpha1",
        "kind": "Instance",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"flavor": "f", "image": {"name": "img"}},
    }


def test_an_agent_writes_only_instances_and_actions_of_its_node(cast: Cast, namespace: str) -> None:
    a, b, ns = cast.node_a, cast.node_b, namespace
    for name, node in (("vm-a", a), ("vm-b", b)):
        kubectl("create", "-f", "-", input=yaml.safe_dump(_instance(ns, name)))
        kubectl(
            "patch",
            "instance",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"node": node}}),
        )
    try:
        allowed(cast.agent_a.patch_status("instance", "vm-a", ns, {"powerState": "Running"}))
        refused_by_policy(
            cast.agent_a.patch_status("instance", "vm-b", ns, {"powerState": "Stopped"})
        )
        refused_by_policy(cast.agent_a.patch_status("instance", "vm-a", ns, {"node": b}))
        # Finalizers: its own, on its instances; never another node's.
        own = f"compute.nubes.io/agent-{a}"
        allowed(cast.agent_a.patch("instance", "vm-a", ns, {"metadata": {"finalizers": [own]}}))
        refused_by_policy(
            cast.agent_a.patch("instance", "vm-b", ns, {"metadata": {"finalizers": [own]}})
        )
        other = f"compute.nubes.io/agent-{b}"
        allowed(cast.agent_b.patch("instance", "vm-b", ns, {"metadata": {"finalizers": [other]}}))
        refused_by_policy(
            cast.agent_a.patch("instance", "vm-b", ns, {"metadata": {"finalizers": None}})
        )
        # The spec is the user's.
        refused_by_policy(
            cast.agent_a.patch("instance", "vm-a", ns, {"spec": {"powerState": "Stopped"}})
        )
        allowed(cast.agent_a.patch("instance", "vm-a", ns, {"metadata": {"finalizers": None}}))

        action = {
            "apiVersion": "compute.nubes.io/v1alpha1",
            "kind": "InstanceAction",
            "metadata": {"name": "move", "namespace": ns},
            "spec": {"instance": "vm-b", "action": "Migrate"},
        }
        kubectl("create", "-f", "-", input=yaml.safe_dump(action))
        kubectl(
            "patch",
            "instanceaction",
            "move",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"sourceNode": b, "targetNode": a}}),
        )
        now = "2025-01-01T00:00:00.000000Z"
        allowed(cast.agent_b.patch_status("instanceaction", "move", ns, {"startedAt": now}))
        allowed(cast.agent_a.patch_status("instanceaction", "move", ns, {"completedAt": now}))
        kubectl(
            "patch",
            "instanceaction",
            "move",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"targetNode": b}}),
        )
        refused_by_policy(cast.agent_a.patch_status("instanceaction", "move", ns, {"result": "x"}))
    finally:
        kubectl(
            "patch",
            "instance",
            "vm-b",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )


def test_an_agent_writes_only_storage_of_its_node(cast: Cast, namespace: str) -> None:
    a, b, ns = cast.node_a, cast.node_b, namespace
    for name, node in (("vol-a", a), ("vol-b", b)):
        kubectl(
            "create",
            "-f",
            "-",
            input=yaml.safe_dump(
                {
                    "apiVersion": "storage.nubes.io/v1alpha1",
                    "kind": "Volume",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"sizeGib": 1},
                }
            ),
        )
        kubectl(
            "patch",
            "volume",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"node": node}}),
        )
    try:
        backing = {"backing": {"node": a, "sizeGib": 1, "sourceDone": True}}
        allowed(cast.agent_a.patch_status("volume", "vol-a", ns, backing))
        refused_by_policy(cast.agent_a.patch_status("volume", "vol-b", ns, backing))
        refused_by_policy(cast.agent_a.patch_status("volume", "vol-a", ns, {"node": b}))
        fin = {"metadata": {"finalizers": ["storage.nubes.io/agent"]}}
        allowed(cast.agent_a.patch("volume", "vol-a", ns, fin))
        refused_by_policy(cast.agent_a.patch("volume", "vol-b", ns, fin))
        refused_by_policy(
            cast.agent_a.patch(
                "volume", "vol-a", ns, {"metadata": {"finalizers": ["storage.nubes.io/volume"]}}
            )
        )
        allowed(cast.agent_a.patch("volume", "vol-a", ns, {"metadata": {"finalizers": None}}))
    finally:
        kubectl(
            "patch",
            "volume",
            "vol-a",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )


async def test_an_agent_writes_only_configmaps_and_secrets_labelled_with_its_node(
    cast: Cast, namespace: str
) -> None:
    a, b, ns = cast.node_a, cast.node_b, namespace

    def configmap(name: str, node: str | None) -> dict[str, Any]:
        labels = {"nubes.io/node": node} if node else {}
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "data": {"console.log": "hello"},
        }

    allowed(cast.agent_a.create(configmap("vm-a-console", a)))
    refused_by_policy(cast.agent_a.create(configmap("vm-x-console", b)), f"nubes.io/node={a}")
    refused_by_policy(cast.agent_a.create(configmap("vm-y-console", None)))
    kubectl("create", "-f", "-", input=yaml.safe_dump(configmap("vm-b-console", b)))
    # As the agent publishes consoles: server-side apply, no read right needed.
    async with await Kube.connect(str(cast.agent_a.kubeconfig), field_manager="agent") as agent:
        await agent.apply_raw(CONFIGMAPS, configmap("vm-a-console", a))
        for body in (configmap("vm-b-console", a), configmap("vm-a-console", b)):
            with pytest.raises(ApiError) as refused:
                await agent.apply_raw(CONFIGMAPS, body)
            assert refused.value.status == 403 and POLICY in str(refused.value)
    refused_by_policy(cast.agent_a.run("delete", "configmap", "vm-b-console", "-n", ns))
    allowed(cast.agent_a.run("delete", "configmap", "vm-a-console", "-n", ns))

    def secret(name: str, node: str, where: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "storage.nubes.io/iscsi-chap",
            "metadata": {"name": name, "namespace": where, "labels": {"nubes.io/node": node}},
            "stringData": {"username": "u", "password": "p"},
        }

    name = f"iscsi-chap-{uuid.uuid4()}"
    refused_by_rbac(cast.agent_a.create(secret(name, a, ns)))
    refused_by_policy(cast.agent_a.create(secret(name, b, COMPONENTS_NAMESPACE)))
    try:
        allowed(cast.agent_a.create(secret(name, a, COMPONENTS_NAMESPACE)))
        allowed(cast.agent_b.run("get", "secret", name, "-n", COMPONENTS_NAMESPACE))
        refused_by_policy(cast.agent_b.run("delete", "secret", name, "-n", COMPONENTS_NAMESPACE))
        allowed(cast.agent_a.run("delete", "secret", name, "-n", COMPONENTS_NAMESPACE))
    finally:
        kubectl(
            "delete", "secret", name, "-n", COMPONENTS_NAMESPACE, "--ignore-not-found", check=False
        )
