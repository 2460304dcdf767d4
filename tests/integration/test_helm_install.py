"""`helm install nubes charts/nubes` onto a real kubelet node, the way users
install it: the image built by hack/image.sh and imported into the node's
containerd, the controller and agent as Pods under the chart's ServiceAccounts
with only the chart's RBAC (they reconcile a Project and register the node's
Hypervisor), `helm test`, `helm upgrade` rolling the Pods, `helm uninstall`
keeping only the CRDs, and the node's `down` leaving no process, mount or
cgroup.

The release goes into a cluster of its own (hack/cluster.sh with another
state directory and ports): the suite's cluster already holds the chart's
cluster objects, applied without Helm."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, eventually, free_port

CACHE = Path(os.environ.get("NUBES_CACHE", os.path.expanduser("~/.cache/nubes")))
NS = "nubes-system"
HELM_BRIDGE = "br-helm"
AGENT_BRIDGES = {"br-int", "br-tun", HELM_BRIDGE}
"""The host OVS bridges the installed agent makes (it uses the node's switch)."""


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]
    api_port: int
    values: list[str]
    host: Path = Path()
    """The agent's state and run directories live below."""

    def run(self, *argv: str, check: bool = True, timeout: float = 300, both: bool = False) -> str:
        """stdout (and stderr with `both`) of a command in this cluster's environment."""
        proc = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout + proc.stderr if both else proc.stdout

    def kubectl(self, *args: str, check: bool = True) -> str:
        return self.run(str(CACHE / "bin" / "kubectl"), *args, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def helm(self, *args: str, check: bool = True) -> str:
        return self.run(str(CACHE / "bin" / "helm"), *args, check=check, both=True)


def _nubes_processes() -> list[str]:
    """Processes of the image's nubes (the suite's own run from .venv)."""
    out = subprocess.run(["pgrep", "-af", "/opt/nubes/bin/"], capture_output=True, text=True)
    return out.stdout.splitlines()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("helm")
    host = tmp_path_factory.mktemp("helm-host")
    api_port, etcd_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG" and not k.startswith("NUBES_")}
    env |= {
        "NUBES_CACHE": str(CACHE),
        "NUBES_STATE": str(state),
        "NUBES_APISERVER_PORT": str(api_port),
        "NUBES_ETCD_PORT": str(etcd_port),
        "NUBES_KCM_PORT": str(free_port()),
        "NUBES_SCHEDULER_PORT": str(free_port()),
        "NUBES_KUBELET_PORT": str(free_port()),
        "NUBES_KUBELET_HEALTHZ_PORT": str(free_port()),
        "NUBES_CNI_BRIDGE": "nubes-cni-h",
        "NUBES_POD_CIDR": "10.244.200.0/24",
    }
    c = Cluster(state, env, api_port, [], host)
    try:
        c.run(str(ROOT / "hack" / "cluster.sh"), "up")
        c.env["KUBECONFIG"] = str(state / "kubeconfig")
        ref = c.run(
            str(ROOT / "hack" / "image.sh"),
            "load",
            str(state / "node" / "containerd" / "containerd.sock"),
            timeout=900,
        ).splitlines()[-1]
        repo, tag = ref.rsplit(":", 1)
        c.values = [
            f"image.repository={repo}",
            f"image.tag={tag}",
            "image.pullPolicy=Never",
            # No kube-proxy here: the Pods reach the API server on loopback.
            "apiServer.host=127.0.0.1",
            f"apiServer.port={api_port}",
            "controller.hostNetwork=true",
            f"controller.healthPort={free_port()}",
            f"agent.healthPort={free_port()}",
            f"agent.stateDir={host / 'state'}",
            f"agent.runDir={host / 'run'}",
            # A provider bridge the agent makes (and must remove on uninstall).
            f"agent.bridgeMappings[0]=physnet-helm:{HELM_BRIDGE}",
            f"controller.imageStore.hostPath={host / 'images'}",
        ]
        yield c
    finally:
        c.run(str(ROOT / "hack" / "cluster.sh"), "down", check=False)
    # Nothing of the node outlives `down`.
    mounts = Path("/proc/mounts").read_text()
    assert f"{state}/" not in mounts
    assert not _nubes_processes()
    for name in ("containerd", "kubelet", "kube-scheduler", "kube-apiserver", "etcd"):
        assert not (state / "run" / f"{name}.pid").exists(), name
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{_cgroup_root(state)}"))
    assert subprocess.run(["ip", "link", "show", "nubes-cni-h"], capture_output=True).returncode


def _host_bridges() -> set[str]:
    out = subprocess.run(["ovs-vsctl", "list-br"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def _netns() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def _firewall_rules(node: str) -> list[str]:
    """Chains and rules of the node's firewall (nb-TAG-*) in the host's tables."""
    from nubes.drivers.network.firewall_rules import node_tag

    prefix = f"nb-{node_tag(node)}-"
    found = []
    for save in ("iptables-save", "ip6tables-save", "ebtables-save"):
        out = subprocess.run([save], capture_output=True, text=True, check=False).stdout
        found += [line for line in out.splitlines() if prefix in line]
    return found


def _cgroup_root(state: Path) -> str:
    import hashlib

    return "nubes-" + hashlib.sha256(str(state).encode()).hexdigest()[:8]


def _pods(c: Cluster) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = c.json("get", "pods", "-n", NS)["items"]
    return pods


def _why_not_ready(c: Cluster, pod: dict[str, Any]) -> dict[str, Any]:
    """What a failing assertion should say of a Pod: its conditions, its
    containers' states and the end of its log (and of the previous one)."""
    name = pod["metadata"]["name"]
    logs = {
        previous: c.kubectl(
            "logs", "-n", NS, name, f"--previous={previous}", "--tail=20", check=False
        )[-3000:]
        for previous in ("false", "true")
    }
    conditions = pod["status"].get("conditions", [])
    return {
        "pod": name,
        "conditions": [(x["type"], x["status"], x.get("reason")) for x in conditions],
        "containers": pod["status"].get("containerStatuses"),
        "logs": logs,
    }


def _ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return pod["status"].get("phase") == "Running" and any(
        x["type"] == "Ready" and x["status"] == "True" for x in conds
    )


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Cluster:
    sets = [a for v in cluster.values for a in ("--set", v)]
    try:
        cluster.helm(
            "install", "nubes", str(ROOT / "charts" / "nubes"), "-n", NS, "--create-namespace",
            *sets, "--wait", "--timeout", "5m",
        )  # fmt: skip
    except (AssertionError, subprocess.TimeoutExpired) as e:
        pods = [_why_not_ready(cluster, p) for p in _pods(cluster) if not _ready(p)]
        raise AssertionError(f"helm install: {e}; Pods not Ready: {pods}") from e
    return cluster


async def test_install_runs_ready_pods_under_the_charts_service_accounts(
    installed: Cluster,
) -> None:
    c = installed

    # `helm --wait` saw the rollouts complete; a Pod's readiness can lag a
    # moment behind (its probe period), and a Pod that stays unready says why.
    def all_ready() -> list[dict[str, Any]] | None:
        pods = _pods(c)
        return pods if pods and all(_ready(p) for p in pods) else None

    try:
        pods = await eventually(all_ready, timeout=60, what="every Pod Ready")
    except AssertionError as e:
        raise AssertionError([_why_not_ready(c, p) for p in _pods(c) if not _ready(p)]) from e
    by_component = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in pods}
    assert set(by_component) == {"controller", "agent"}
    assert by_component["controller"]["spec"]["serviceAccountName"] == "nubes-controller"
    assert by_component["agent"]["spec"]["serviceAccountName"] == "nubes-agent"
    agent = by_component["agent"]["spec"]
    assert agent["hostNetwork"] and agent["containers"][0]["securityContext"]["privileged"]
    # The agent's tunnel endpoint is the node's address (it reads NUBES_TUNNEL_IP).
    env = {e["name"]: e for e in agent["containers"][0]["env"]}
    assert env["NUBES_TUNNEL_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


async def test_pods_work_with_the_charts_rbac_only(installed: Cluster) -> None:
    """The agent Pod registers its node's Hypervisor (host facts, heartbeat),
    the controller Pod makes a Project Ready (namespace, role bindings,
    quota): both act only with their ServiceAccounts' tokens."""
    c = installed
    node = c.json("get", "nodes")["items"][0]["metadata"]["name"]

    def hypervisor_ready() -> bool:
        hv = c.json("get", "hypervisors", node)
        conds = hv.get("status", {}).get("conditions", [])
        return bool(hv["status"].get("vcpus")) and any(
            x["type"] == "Ready" and x["status"] == "True" for x in conds
        )

    await eventually(hypervisor_ready, timeout=120, what="the agent Pod's Hypervisor Ready")
    project = {
        "apiVersion": "identity.nubes.io/v1alpha1",
        "kind": "Project",
        "metadata": {"name": "helm-proj"},
        "spec": {"members": [{"kind": "User", "name": "alice", "role": "admin"}]},
    }
    subprocess.run(
        [str(CACHE / "bin" / "kubectl"), "apply", "-f", "-"],
        input=json.dumps(project), env=c.env, check=True, capture_output=True, text=True,
    )  # fmt: skip

    def project_ready() -> bool:
        got = c.json("get", "projects", "helm-proj")
        conds = got.get("status", {}).get("conditions", [])
        return any(x["type"] == "Ready" and x["status"] == "True" for x in conds)

    # Ready once the quota controller counts the new kinds (its discovery resync).
    await eventually(project_ready, timeout=180, what="Project Ready from the controller Pod")
    assert c.json("get", "namespace", "helm-proj")["status"]["phase"] == "Active"
    for component in ("controller", "agent"):
        logs = c.kubectl("logs", "-n", NS, "-l", f"app.kubernetes.io/component={component}")
        assert "Forbidden" not in logs and " 403" not in logs, logs[-2000:]
    c.kubectl("delete", "project", "helm-proj", "--wait=true", "--timeout=120s")


async def test_helm_test_smoke(installed: Cluster) -> None:
    out = installed.helm("test", "nubes", "-n", NS, "--timeout", "3m")
    assert "Phase:          Succeeded" in out, out


async def test_values_schema_refuses_bad_values(installed: Cluster) -> None:
    out = installed.helm(
        "template", "nubes", str(ROOT / "charts" / "nubes"),
        "--set", "controller.replicas=0", "--set", "agent.tunnelEndpoint=eth0",
        check=False,
    )  # fmt: skip
    assert "values don't meet the specifications of the schema" in out, out
    assert "controller.replicas" in out.replace("/", ".") or "replicas" in out, out
    assert "tunnelEndpoint" in out, out


async def test_upgrade_with_a_changed_value_rolls_the_pods(installed: Cluster) -> None:
    c = installed
    before = {p["metadata"]["uid"] for p in _pods(c)}
    c.helm(
        "upgrade", "nubes", str(ROOT / "charts" / "nubes"), "-n", NS, "--reuse-values",
        "--set", "controller.logLevel=debug", "--set", "agent.logLevel=debug",
        "--wait", "--timeout", "5m",
    )  # fmt: skip

    def rolled() -> list[dict[str, Any]] | None:
        pods = _pods(c)
        fresh = [p for p in pods if p["metadata"]["uid"] not in before]
        return pods if len(fresh) == len(pods) == 2 and all(map(_ready, pods)) else None

    pods = await eventually(rolled, timeout=180, what="new controller and agent Pods Ready")
    for p in pods:
        cmd = " ".join(
            p["spec"]["containers"][0]["command"] + p["spec"]["containers"][0].get("args", [])
        )
        assert "debug" in cmd, cmd
    assert "REVISION: 2" in c.helm("status", "nubes", "-n", NS)


def _apply(c: Cluster, *docs: dict[str, Any]) -> None:
    proc = subprocess.run(
        [str(CACHE / "bin" / "kubectl"), "apply", "-f", "-"],
        input="\n---\n".join(json.dumps(d) for d in docs),
        env=c.env, check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


async def test_uninstall_is_refused_while_the_node_is_in_use(installed: Cluster) -> None:
    """A Port bound to the node: the hook's request is answered Blocked,
    `helm uninstall` fails naming the Port, nothing is deleted or torn down
    (the agent still runs, its bridges are there), and the request is
    withdrawn. The next test uninstalls once the Port is gone."""
    c = installed
    node = c.json("get", "nodes")["items"][0]["metadata"]["name"]
    project = "helm-busy"
    _apply(c, {
        "apiVersion": "identity.nubes.io/v1alpha1", "kind": "Project",
        "metadata": {"name": project},
        "spec": {"members": [{"kind": "User", "name": "alice", "role": "admin"}]},
    })  # fmt: skip

    def project_ready() -> bool:
        got = c.json("get", "projects", project)
        conds = got.get("status", {}).get("conditions", [])
        return any(x["type"] == "Ready" and x["status"] == "True" for x in conds)

    # Ready: its quota is counted, so member kinds are admitted.
    await eventually(project_ready, timeout=180, what="the project Ready")
    _apply(c, {
        "apiVersion": "network.nubes.io/v1alpha1", "kind": "Network",
        "metadata": {"name": "net", "namespace": project}, "spec": {"type": "local"},
    }, {
        "apiVersion": "network.nubes.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": "v4", "namespace": project},
        "spec": {"network": {"name": "net"}, "cidr": "10.77.0.0/24", "enableDhcp": False},
    }, {
        "apiVersion": "network.nubes.io/v1alpha1", "kind": "Port",
        "metadata": {"name": "busy", "namespace": project},
        "spec": {"network": {"name": "net"}, "binding": {"host": node}},
    })  # fmt: skip

    def bound() -> bool:
        port = c.json("get", "ports", "busy", "-n", project)
        return bool(port.get("status", {}).get("host") == node)

    await eventually(bound, timeout=120, what="the Port bound to the node")

    def workload_pods() -> set[str]:
        return {
            p["metadata"]["uid"]
            for p in _pods(c)
            if p["metadata"]["labels"].get("app.kubernetes.io/component") in ("controller", "agent")
        }

    pods_before = workload_pods()
    proc = subprocess.run(
        [str(CACHE / "bin" / "helm"), "uninstall", "nubes", "-n", NS, "--wait", "--timeout", "3m"],
        env=c.env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    # Helm names the failed hook Job; the hook's own words are in its Pod.
    assert proc.returncode != 0, proc.stdout + proc.stderr
    job = c.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=teardown")
    [message] = [
        s["state"]["terminated"]["message"]
        for p in job["items"]
        for s in p["status"]["containerStatuses"]
    ]
    assert f"Port {project}/busy" in message and "uninstall refused" in message, message
    hv = c.json("get", "hypervisor", node)
    assert "nubes.io/teardown" not in hv["metadata"].get("annotations", {})
    assert hv["status"]["teardown"]["state"] == "Blocked"
    assert workload_pods() == pods_before
    assert _host_bridges() >= AGENT_BRIDGES
    c.kubectl("delete", "project", project, "--wait=true", "--timeout=120s")
    await eventually(
        lambda: not c.kubectl("get", "ports", "-A", "-o", "name").strip(),
        timeout=120, what="the Port gone",
    )  # fmt: skip


async def test_uninstall_keeps_only_the_crds(installed: Cluster) -> None:
    """Everything of the release goes but the CRDs, and so does everything
    the agent made on the host: the pre-delete hook has every agent tear
    down its node first (agent/teardown.py)."""
    c = installed
    crds_before = {i["metadata"]["name"] for i in c.json("get", "crds")["items"]}
    assert any(n.endswith(".nubes.io") for n in crds_before)
    released = [d for d in yaml.safe_load_all(c.helm("get", "manifest", "nubes", "-n", NS)) if d]
    assert len(released) > 20
    node = c.json("get", "nodes")["items"][0]["metadata"]["name"]
    # What the agent made, so that its absence afterwards means something.
    await eventually(
        lambda: _host_bridges() >= AGENT_BRIDGES, timeout=60, what="the agent's bridges"
    )
    assert any((c.host / "state").iterdir())
    c.helm("uninstall", "nubes", "-n", NS, "--wait", "--timeout", "3m")
    for obj in released:
        meta = obj["metadata"]
        where = ["-n", meta.get("namespace", NS)]
        got = c.kubectl(
            "get", obj["kind"], meta["name"], *where, "--ignore-not-found", "-o", "name"
        )
        if obj["kind"] == "CustomResourceDefinition":
            assert got.strip(), f"CRD {meta['name']} was deleted"
        else:
            assert not got.strip(), f"{obj['kind']} {meta['name']} is left"
    await eventually(lambda: not _pods(c), timeout=120, what="the Pods gone")
    await eventually(lambda: not _nubes_processes(), timeout=60, what="no nubes process left")
    assert {i["metadata"]["name"] for i in c.json("get", "crds")["items"]} == crds_before
    # The hook's own objects and the node registrations went too.
    for kind, name in (
        ("job", "nubes-teardown"),
        ("serviceaccount", "nubes-teardown"),
        ("clusterrole", "nubes:teardown"),
        ("clusterrolebinding", "nubes:teardown"),
    ):
        assert not c.kubectl("get", kind, name, "-n", NS, "--ignore-not-found", "-o", "name")
    assert not c.json("get", "hypervisors")["items"]
    # Nothing of the agent on the host.
    assert not AGENT_BRIDGES & _host_bridges(), _host_bridges()
    for directory in ("state", "run"):
        left = list((c.host / directory).iterdir()) if (c.host / directory).exists() else []
        assert not left, left
    assert not _firewall_rules(node)
    assert not [n for n in _netns() if n.startswith("nubes-")], _netns()
