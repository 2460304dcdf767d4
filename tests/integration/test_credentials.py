"""Credentials against the real API server: a kubeconfig a cloud admin issues
with `nubes credentials issue` (client certificate through the CSR API,
signed by the controller-manager's csrsigning controller), application
credentials a project admin creates with `nubes app-credential` using such a
kubeconfig of its own, and project admins managing members by binding the
project roles. Every credential used below is the only one in its kubeconfig:
no admin certificate comes along.

The API server's minimum life is 10 minutes for both a CSR's
expirationSeconds and a TokenRequest, so a certificate's expiry is checked
through its notAfter against the requested duration. An application
credential's expiry is observed for real within seconds: the controller
deletes the ServiceAccount when its recorded life is over, and the API
server then refuses the token (still valid by its own exp) on a direct call."""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nubes.api.identity import Project
from nubes.runtime.credentials import CSRS, SERVICEACCOUNTS
from nubes.runtime.kube import ROLEBINDINGS, Kube, path_of
from tests.helpers import ROOT, Process, apply, eventually, free_port, kubectl, kubectl_bin
from tests.integration.conftest import get_condition

NET = "network.nubes.io/v1alpha1"


@pytest.fixture(scope="module")
def csr_signer() -> Iterator[None]:
    """hack/cluster.sh runs the csrsigning controller with the cluster CA; a
    control plane started before that gets a signing-only controller-manager."""
    state = Path(os.environ.get("NUBES_STATE", ROOT / ".nubes"))
    pid = (state / "run" / "kube-controller-manager.pid").read_text().strip()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    if any("csrsigning" in a for a in argv):
        yield
        return
    kcm = str(state / "kcm.kubeconfig")
    log = open(state / "logs" / "kcm-csr-tests.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            argv[0],
            *("--kubeconfig", kcm, "--authentication-kubeconfig", kcm),
            *("--authorization-kubeconfig", kcm, "--controllers", "csrsigning"),
            *("--cluster-signing-cert-file", str(state / "pki" / "ca.crt")),
            *("--cluster-signing-key-file", str(state / "pki" / "ca.key")),
            *("--bind-address", "127.0.0.1", "--secure-port", str(free_port())),
            "--leader-elect=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    yield
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
async def projects(
    kube: Kube, controller: Process, csr_signer: None
) -> AsyncIterator[dict[str, Any]]:
    """Two projects; the users' names are unique to this run."""
    run = uuid.uuid4().hex[:6]
    users = {r: f"cred-{r}-{run}" for r in ("alice", "bob", "carol", "dave", "erin")}
    mine, other = f"cred-{run}", f"cred-other-{run}"
    members = {
        mine: [
            {"name": users["alice"], "role": "admin"},
            {"name": users["bob"], "role": "member"},
        ],
        other: [{"name": users["carol"], "role": "admin"}],
    }
    for name, people in members.items():
        apply(
            {
                "apiVersion": "identity.nubes.io/v1alpha1",
                "kind": "Project",
                "metadata": {"name": name},
                "spec": {"members": people},
            }
        )
    for name in members:

        async def ready(name: str = name) -> bool:
            cond = await get_condition(kube, path_of(Project), name, None)
            return bool(cond and cond["status"] == "True")

        await eventually(ready, what=f"project {name} Ready")
    yield {"mine": mine, "other": other, **users}
    for name in members:
        kubectl("delete", "project", name, "--wait=false", check=False)


def nubes(*args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run(
        [sys.executable, "-m", "nubes.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=ROOT,
    )


def as_config(
    config: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl with only `config` (KUBECONFIG dropped so nothing merges in)."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    return subprocess.run(
        [kubectl_bin(), "--kubeconfig", str(config), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def whoami(config: Path) -> dict[str, Any]:
    got = as_config(config, "auth", "whoami", "-o", "json")
    assert got.returncode == 0, got.stderr
    info: dict[str, Any] = json.loads(got.stdout)["status"]["userInfo"]
    return info


def network(name: str, namespace: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": NET,
            "kind": "Network",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {},
        }
    )


def issue(tmp_path: Path, user: str, project: str, *extra: str) -> Path:
    out = tmp_path / f"{user}.kubeconfig"
    got = nubes(
        "credentials", "issue", "--user", user, "--project", project, *extra, "-o", str(out)
    )
    assert got.returncode == 0, got.stderr
    return out


def user_entry(config: Path) -> dict[str, Any]:
    doc = yaml.safe_load(config.read_text())
    assert len(doc["users"]) == 1
    entry: dict[str, Any] = doc["users"][0]["user"]
    return entry


def not_after(config: Path) -> datetime.datetime:
    cert = base64.b64decode(user_entry(config)["client-certificate-data"])
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate"], input=cert, capture_output=True, check=True
    ).stdout.decode()
    stamp = out.strip().removeprefix("notAfter=")
    return datetime.datetime.strptime(stamp, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.UTC)


def valid_for(
    config: Path, life: datetime.timedelta, before: datetime.datetime, after: datetime.datetime
) -> bool:
    """The certificate's notAfter is `life` after its signing, which happened
    between `before` and `after`. The controller-manager's signer backdates
    certificates by up to 5 minutes for clock skew, notAfter with them for
    long lives: that much earlier is allowed, nothing later."""
    backdate = datetime.timedelta(minutes=5, seconds=30)
    return (
        before + life - backdate
        <= not_after(config)
        <= after + life + datetime.timedelta(seconds=2)
    )


async def test_issued_kubeconfig_is_scoped_to_the_project(
    tmp_path: Path, kube: Kube, projects: dict[str, Any]
) -> None:
    mine, other, bob = projects["mine"], projects["other"], projects["bob"]
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    config = issue(tmp_path, bob, mine, "--duration", "2h")
    after = datetime.datetime.now(datetime.UTC)
    assert set(user_entry(config)) == {"client-certificate-data", "client-key-data"}
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    doc = yaml.safe_load(config.read_text())
    assert doc["contexts"][0]["context"]["namespace"] == mine

    assert whoami(config)["username"] == bob
    # The context's namespace is the project's: no -n needed.
    assert as_config(config, "get", "instances").returncode == 0
    made = as_config(config, "apply", "-f", "-", input=network("by-cert", mine))
    assert made.returncode == 0, made.stderr
    refused = as_config(config, "get", "instances", "-n", other)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()
    assert as_config(config, "get", "namespaces").returncode != 0

    two_hours = datetime.timedelta(hours=2)
    assert valid_for(config, two_hours, before, after)
    # The CSR served its purpose and is gone.
    csrs = await kube.list_raw(CSRS)
    assert not [
        c for c in csrs if bob in base64.b64decode(c["spec"]["request"]).decode(errors="ignore")
    ]


async def test_default_life_is_24_hours(tmp_path: Path, projects: dict[str, Any]) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    config = issue(tmp_path, projects["bob"], projects["mine"])
    after = datetime.datetime.now(datetime.UTC)
    assert valid_for(config, datetime.timedelta(hours=24), before, after)


async def test_non_member_is_authenticated_but_granted_nothing(
    tmp_path: Path, projects: dict[str, Any]
) -> None:
    out = tmp_path / "dave.kubeconfig"
    got = nubes(
        "credentials", "issue", "--user", projects["dave"], "--project", projects["mine"],
        "--group", "cred-team", "-o", str(out),
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert "not a member" in got.stdout + got.stderr
    info = whoami(out)
    assert info["username"] == projects["dave"] and "cred-team" in info["groups"]
    assert as_config(out, "get", "instances").returncode != 0


async def test_system_identities_are_not_issued(tmp_path: Path, projects: dict[str, Any]) -> None:
    for extra in (("--user", "x", "--group", "system:masters"), ("--user", "system:admin")):
        out = tmp_path / "refused.kubeconfig"
        got = nubes("credentials", "issue", "--project", projects["mine"], *extra, "-o", str(out))
        assert got.returncode == 1 and "system:" in got.stderr
        assert not out.exists()


def test_too_short_a_life_is_refused(tmp_path: Path, projects: dict[str, Any]) -> None:
    got = nubes(
        "credentials", "issue", "--user", projects["bob"], "--project", projects["mine"],
        "--duration", "5m", "-o", str(tmp_path / "short"),
    )  # fmt: skip
    assert got.returncode == 1 and "10m" in got.stderr


def token_claims(config: Path) -> dict[str, Any]:
    payload = user_entry(config)["token"].split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


async def test_application_credentials(
    tmp_path: Path, kube: Kube, projects: dict[str, Any]
) -> None:
    mine, other = projects["mine"], projects["other"]
    # The project admin acts with a kubeconfig of its own, issued as above.
    alice = issue(tmp_path, projects["alice"], mine)
    creds = {}
    for name, role in (("ci", "member"), ("ro", "reader")):
        out = tmp_path / f"{name}.kubeconfig"
        got = nubes(
            "app-credential", "create", "--project", mine, "--name", name, "--role", role,
            "--duration", "1h", "-o", str(out), kubeconfig=alice,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        creds[name] = out
        claims = token_claims(out)
        assert claims["exp"] - claims["iat"] == 3600
        assert whoami(out)["username"] == f"system:serviceaccount:{mine}:{name}"

    listed = nubes("app-credential", "list", "--project", mine, kubeconfig=alice)
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["ci", "member"], ["ro", "reader"]]
    for row in rows:
        end = datetime.datetime.fromisoformat(row[2].replace("Z", "+00:00"))
        left = end - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(minutes=58) < left <= datetime.timedelta(hours=1)

    made = as_config(creds["ci"], "apply", "-f", "-", input=network("by-ci", mine))
    assert made.returncode == 0, made.stderr
    assert as_config(creds["ro"], "get", "networks", "by-ci").returncode == 0
    refused = as_config(creds["ro"], "apply", "-f", "-", input=network("by-ro", mine))
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()
    for config in creds.values():
        assert as_config(config, "get", "networks", "-n", other).returncode != 0

    # A member cannot make credentials; the admin of another project cannot here.
    bob = issue(tmp_path, projects["bob"], mine)
    carol = issue(tmp_path, projects["carol"], other)
    for who in (bob, carol):
        got = nubes(
            "app-credential", "create", "--project", mine, "--name", "sneaky", "--role", "admin",
            "-o", str(tmp_path / "sneaky"), kubeconfig=who,
        )  # fmt: skip
        assert got.returncode == 1 and "403" in got.stderr

    # Revoked: the token stops authenticating, the binding goes with it.
    got = nubes("app-credential", "delete", "--project", mine, "--name", "ci", kubeconfig=alice)
    assert got.returncode == 0, got.stderr

    async def revoked() -> bool:
        return as_config(creds["ci"], "auth", "whoami").returncode != 0

    await eventually(revoked, what="revoked token refused")
    assert "nauthorized" in as_config(creds["ci"], "get", "networks").stderr
    assert await kube.get_raw(SERVICEACCOUNTS, "ci", mine) is None
    assert await kube.get_raw(ROLEBINDINGS, "nubes-app-credential-ci", mine) is None
    assert whoami(creds["ro"])["username"].endswith(":ro")


async def test_application_credential_expires(
    tmp_path: Path, kube: Kube, projects: dict[str, Any]
) -> None:
    mine = projects["mine"]
    alice = issue(tmp_path, projects["alice"], mine)
    out = tmp_path / "brief.kubeconfig"
    got = nubes(
        "app-credential", "create", "--project", mine, "--name", "brief", "--role", "reader",
        "--duration", "10s", "-o", str(out), kubeconfig=alice,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    # The token itself would live the API server's minimum: what ends the
    # credential below is the controller, not the token's exp.
    claims = token_claims(out)
    assert claims["exp"] - claims["iat"] == 600
    account = await kube.get_raw(SERVICEACCOUNTS, "brief", mine)
    assert account is not None
    binding = "nubes-app-credential-brief"
    assert await kube.get_raw(ROLEBINDINGS, binding, mine) is not None

    # Before: the token (alone in its kubeconfig) authenticates and is authorized.
    works = as_config(out, "get", "networks")
    assert works.returncode == 0, works.stderr
    assert whoami(out)["username"] == f"system:serviceaccount:{mine}:brief"

    async def refused() -> str | None:
        got = as_config(out, "get", "networks")
        return got.stderr if got.returncode != 0 else None

    # First refused either way: the binding may be collected before the
    # token authenticator's cache sees its ServiceAccount gone (403, seen),
    # then the token no longer authenticates at all (401).
    stderr = await eventually(refused, timeout=30, what="expired credential refused")
    assert "Forbidden" in stderr or "Unauthorized" in stderr, stderr

    async def unauthenticated() -> bool:
        return "Unauthorized" in (await refused() or "")

    await eventually(unauthenticated, timeout=30, what="expired token no longer authenticates")
    ended = datetime.datetime.now(datetime.UTC)
    created = datetime.datetime.fromisoformat(
        account["metadata"]["creationTimestamp"].replace("Z", "+00:00")
    )
    assert ended >= created + datetime.timedelta(seconds=10)
    assert await kube.get_raw(SERVICEACCOUNTS, "brief", mine) is None
    # Its binding goes with it (owner reference, garbage collector).
    await eventually(
        lambda: _absent(kube, ROLEBINDINGS, binding, mine), timeout=30, what="binding removed"
    )
    listed = nubes("app-credential", "list", "--project", mine, kubeconfig=alice)
    assert "brief" not in listed.stdout
    too_short = nubes(
        "app-credential", "create", "--project", mine, "--name", "blink", "--duration", "3s",
        "-o", str(tmp_path / "blink"), kubeconfig=alice,
    )  # fmt: skip
    assert too_short.returncode == 1 and "minimum is 10s" in too_short.stderr
    assert await kube.get_raw(SERVICEACCOUNTS, "blink", mine) is None


async def _absent(kube: Kube, kp: Any, name: str, namespace: str) -> bool:
    return await kube.get_raw(kp, name, namespace) is None


async def test_project_admin_manages_members(projects: dict[str, Any]) -> None:
    mine, alice, erin = projects["mine"], projects["alice"], projects["erin"]
    assert kubectl("get", "networks", "-n", mine, user=erin, check=False).returncode != 0
    kubectl(
        "create", "rolebinding", "erin-reads", "--clusterrole=nubes:project-reader",
        f"--user={erin}", "-n", mine, user=alice,
    )  # fmt: skip
    await eventually(
        lambda: kubectl("get", "networks", "-n", mine, user=erin, check=False).returncode == 0,
        what="new member can read",
    )
    assert apply(network("by-erin", mine), user=erin, check=False).returncode != 0
    # Only the project roles: not the cloud admin's, not Kubernetes' own.
    # (Not `admin` or `edit`: without the controller-manager's aggregation
    # controller they hold no rules here, so binding them grants nothing.)
    for role in ("nubes:cloud-admin", "cluster-admin", "system:kube-controller-manager"):
        got = kubectl(
            "create", "rolebinding", f"erin-{role.replace(':', '-')}", f"--clusterrole={role}",
            f"--user={erin}", "-n", mine, user=alice, check=False,
        )  # fmt: skip
        assert got.returncode != 0 and "forbidden" in got.stderr.lower(), role
    # Nor in another project's namespace; a member cannot grant roles.
    for who, namespace in ((alice, projects["other"]), (projects["bob"], mine)):
        got = kubectl(
            "create", "rolebinding", "erin-x", "--clusterrole=nubes:project-reader",
            f"--user={erin}", "-n", namespace, user=who, check=False,
        )  # fmt: skip
        assert got.returncode != 0 and "forbidden" in got.stderr.lower()
    kubectl("delete", "rolebinding", "erin-reads", "-n", mine, user=alice)
    await eventually(
        lambda: kubectl("get", "networks", "-n", mine, user=erin, check=False).returncode != 0,
        what="removed member refused",
    )
