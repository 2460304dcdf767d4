"""The components' own identities for processes the tests start: tokens of
the chart's ServiceAccounts (a node agent's bound to its Node, as kubelet
projects it into a DaemonSet pod) in kubeconfigs that hold nothing else, so
no admin client certificate comes along and the chart's roles and admission
policies decide every request."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tests.helpers import kubectl
from tests.integration.conftest import COMPONENTS_NAMESPACE

AGENT_ACCOUNT = "nubes-agent"
CONTROLLER_ACCOUNT = "nubes-controller"
# Long enough for any test session (the API server sets no maximum here:
# hack/cluster.sh passes no --service-account-max-token-expiration). The
# agent does not re-read its token, as a pod's would be refreshed.
AGENT_TOKEN_DURATION = "4h"
TEST_NODE_LABEL = "nubes.io/test-node"

_created_nodes: set[str] = set()
"""Node objects this session created (cluster-scoped: deleted at its end)."""


def admin_cluster() -> tuple[str, str]:
    """Server and CA file of the cluster the admin kubeconfig names."""
    path = os.environ.get("KUBECONFIG") or str(Path(".nubes") / "kubeconfig")
    config = yaml.safe_load(Path(path).read_text())
    cluster = config["clusters"][0]["cluster"]
    ca = cluster.get("certificate-authority")
    if ca and not os.path.isabs(ca):
        ca = str(Path(path).parent / ca)
    return cluster["server"], ca or ""


def token_kubeconfig(directory: Path, name: str, token: str) -> Path:
    """A kubeconfig for the admin kubeconfig's cluster with only `token`."""
    server, ca = admin_cluster()
    path = directory / f"{name}.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": server, "certificate-authority": ca}}
                ],
                "users": [{"name": name, "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": name}}],
                "current-context": "c",
            }
        )
    )
    path.chmod(0o600)
    return path


def sa_token(account: str, node: str | None = None, duration: str = "1h") -> str:
    """A token of a components' ServiceAccount, bound to Node `node` if given
    (the API server then adds the user extra authentication.kubernetes.io/node-name)."""
    bound = ["--bound-object-kind", "Node", "--bound-object-name", node] if node else []
    got = kubectl(
        "create", "token", account, "-n", COMPONENTS_NAMESPACE, f"--duration={duration}", *bound
    )
    return got.stdout.strip()


def ensure_node(name: str) -> None:
    """The Node object a node-bound token needs (no kubelet runs here to
    register it); remembered for delete_created_nodes() if this created it."""
    if name in _created_nodes:
        return
    manifest = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {TEST_NODE_LABEL: "true"}},
    }
    got = kubectl("create", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    if got.returncode == 0:
        _created_nodes.add(name)
    elif "AlreadyExists" not in got.stderr:
        raise AssertionError(f"cannot create Node {name}: {got.stderr}")


def delete_created_nodes() -> None:
    """Delete the Nodes ensure_node() created (their tokens stop working:
    call once the agents using them are stopped)."""
    if _created_nodes:
        kubectl("delete", "node", *sorted(_created_nodes), "--ignore-not-found", check=False)
        _created_nodes.clear()


def agent_kubeconfig(directory: Path, node: str) -> Path:
    """Credentials of the agent of `node`: the nubes-agent ServiceAccount's
    token bound to that Node."""
    ensure_node(node)
    token = sa_token(AGENT_ACCOUNT, node, AGENT_TOKEN_DURATION)
    return token_kubeconfig(directory, f"agent-{node}", token)


def agent_env(directory: Path, node: str) -> dict[str, str]:
    """Environment for an agent process acting with its node's identity."""
    return {"KUBECONFIG": str(agent_kubeconfig(directory, node))}


def controller_env(directory: Path) -> dict[str, str]:
    """Environment for a controller process acting as the chart's
    nubes-controller ServiceAccount (its ClusterRole and nothing more)."""
    token = sa_token(CONTROLLER_ACCOUNT, None, AGENT_TOKEN_DURATION)
    return {"KUBECONFIG": str(token_kubeconfig(directory, "controller", token))}
