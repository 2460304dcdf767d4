"""Keystone-style credentials as Kubernetes ones.

Users come from the cluster's authenticator. A cloud admin issues a user a
kubeconfig scoped to a project: a client certificate signed through the
CertificateSigningRequest API (signer kubernetes.io/kube-apiserver-client),
CN=user, O=groups, valid for a chosen time (24 h by default, as a Keystone
token). A project admin creates application credentials: a ServiceAccount in
the project's namespace bound to one of the project roles, and a token for it
with an expiry; deleting the credential deletes the ServiceAccount, which
invalidates every token issued for it at once. The controller deletes it
when its life is over (controllers/app_credentials.py), so an application
credential may live less than the API server's 10-minute minimum for a
token.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from nubes.api.identity import Project
from nubes.runtime.kube import ROLEBINDINGS, ApiError, KindPath, Kube, default_kubeconfig, path_of

log = structlog.get_logger()

CSRS = KindPath("certificates.k8s.io", "v1", "certificatesigningrequests", False)
SERVICEACCOUNTS = KindPath("", "v1", "serviceaccounts", True)
CLIENT_SIGNER = "kubernetes.io/kube-apiserver-client"
DEFAULT_DURATION = 24 * 3600
# The API server refuses shorter CSR expirationSeconds and TokenRequests.
MIN_DURATION = 600
# Nine digits of seconds (about 31 years): what admission lets a credential record.
MAX_DURATION = 999_999_999
# An application credential ends when the controller deletes it, which it
# checks every few seconds: shorter lives would not mean much.
APP_MIN_DURATION = 10
APP_CREDENTIAL_LABEL = "nubes.io/app-credential"
# The life asked for, in seconds from the ServiceAccount's creationTimestamp.
LIFETIME_ANNOTATION = "nubes.io/lifetime-seconds"
ROLE_LABEL = "nubes.io/role"
# Who made it (the API server's name for them; admission checks it): the
# credential ends when they lose its role in the project.
CREATOR_ANNOTATION = "nubes.io/created-by"
ROLES = ("admin", "member", "reader")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CredentialError(Exception):
    """Something the person running the command must fix; the message says what."""


def parse_duration(text: str, minimum: int = MIN_DURATION) -> int:
    """`90m`, `24h`, `7d`, `3600s` or bare seconds, as seconds (>= `minimum`)."""
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not match:
        raise CredentialError(f"duration {text!r}: use a number with s, m, h or d, e.g. 24h")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds > MAX_DURATION:
        raise CredentialError(f"duration {text!r}: the maximum is {MAX_DURATION // 86400}d")
    if seconds < minimum:
        least = "10m" if minimum == MIN_DURATION else f"{minimum}s"
        raise CredentialError(f"duration {text!r}: the minimum is {least}")
    return seconds


def expiry_of(account: dict[str, Any]) -> datetime.datetime | None:
    """When an application credential ends: its creationTimestamp (the API
    server's clock) plus the recorded life; None without one."""
    meta = account.get("metadata", {})
    life = (meta.get("annotations") or {}).get(LIFETIME_ANNOTATION)
    created = meta.get("creationTimestamp")
    if not life or not created:
        return None
    try:
        start = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
        return start + datetime.timedelta(seconds=int(life))
    except ValueError:
        return None


def _stamp(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- kubeconfigs -------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    server: str
    ca_data: str | None  # base64 PEM, as kubeconfigs embed it
    insecure: bool = False


def current_cluster(kubeconfig: str | None) -> Cluster:
    """The cluster the caller's kubeconfig points at, CA embedded, so the
    issued kubeconfig does not depend on files of the issuer's machine."""
    path = kubeconfig or default_kubeconfig()
    if not path:
        raise CredentialError("no kubeconfig: pass --kubeconfig or set KUBECONFIG")
    config: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    contexts = {c["name"]: c.get("context", {}) for c in config.get("contexts") or []}
    clusters = {c["name"]: c.get("cluster", {}) for c in config.get("clusters") or []}
    context = contexts.get(config.get("current-context", ""), {})
    cluster = clusters.get(context.get("cluster", ""))
    if cluster is None:
        raise CredentialError(f"{path}: the current context names no cluster")
    ca_data = cluster.get("certificate-authority-data")
    if not ca_data and cluster.get("certificate-authority"):
        ca_file = Path(path).parent / cluster["certificate-authority"]  # absolute stays absolute
        ca_data = base64.b64encode(ca_file.read_bytes()).decode()
    return Cluster(cluster["server"], ca_data, bool(cluster.get("insecure-skip-tls-verify")))


def write_kubeconfig(
    out: Path, cluster: Cluster, user: str, credentials: dict[str, str], namespace: str
) -> None:
    """A kubeconfig with one context: `cluster` as `user`, in `namespace`."""
    entry: dict[str, Any] = {"server": cluster.server}
    if cluster.ca_data:
        entry["certificate-authority-data"] = cluster.ca_data
    if cluster.insecure:
        entry["insecure-skip-tls-verify"] = True
    context = f"{user}@{namespace}"
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "nubes", "cluster": entry}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [
            {"name": context, "context": {"cluster": "nubes", "user": user, "namespace": namespace}}
        ],
        "current-context": context,
    }
    # Created owner-only: it holds a private key or a bearer token.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(document, f, sort_keys=False)
    out.chmod(0o600)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- projects ------------------------------------------------------------------------


async def project_namespace(kube: Kube, project: str) -> tuple[str, dict[str, Any]]:
    obj = await kube.get_raw(path_of(Project), project)
    if obj is None:
        raise CredentialError(f"project {project} not found")
    spec = obj.get("spec", {})
    namespace = obj.get("status", {}).get("namespace") or spec.get("namespace") or project
    return namespace, obj


def membership(project: dict[str, Any], user: str, groups: list[str]) -> str | None:
    """The role the project's spec.members give `user` (or one of `groups`)."""
    for member in project.get("spec", {}).get("members", []):
        kind = member.get("kind", "User")
        if (kind == "User" and member["name"] == user) or (
            kind == "Group" and member["name"] in groups
        ):
            return str(member.get("role", "member"))
    return None


# --- user certificates ------------------------------------------------------------


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(  # noqa: S603 - argument list, no shell
        ["openssl", *args], input=stdin, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise CredentialError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _rdn(value: str) -> str:
    # openssl's -subj takes /TYPE=value; a backslash escapes the separators.
    return re.sub(r"([\\/=+,])", r"\\\1", value)


def key_and_csr(user: str, groups: list[str]) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (kept in memory, never on disk but in the output)
    and a CSR for CN=user, O=each group."""
    key = _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    subject = "".join(f"/O={_rdn(g)}" for g in groups) + f"/CN={_rdn(user)}"
    csr = _openssl("req", "-new", "-key", "/dev/stdin", "-subj", subject, stdin=key)
    return key, csr


def not_after(certificate: bytes) -> str:
    """The certificate's notAfter as openssl prints it."""
    out = _openssl("x509", "-noout", "-enddate", stdin=certificate).decode().strip()
    return out.removeprefix("notAfter=")


async def issue_user_certificate(
    kube: Kube, user: str, groups: list[str], seconds: int, *, timeout: float = 60
) -> tuple[bytes, bytes]:
    """Key and signed certificate for `user`: a CSR, approved with the
    caller's rights, signed by the controller-manager's csrsigning controller."""
    for group in groups:
        # The client signer would sign system:masters as readily as anything:
        # the built-in groups are never handed out by this command.
        if group.startswith("system:"):
            raise CredentialError(f"group {group}: system: groups are not issued")
    if user.startswith("system:"):
        raise CredentialError(f"user {user}: system: identities are not issued")
    key, csr = key_and_csr(user, groups)
    name = f"nubes-{re.sub(r'[^a-z0-9-]', '-', user.lower())[:40]}-{uuid.uuid4().hex[:8]}"
    await kube.create_raw(
        CSRS,
        {
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "nubes"}},
            "spec": {
                "request": _b64(csr),
                "signerName": CLIENT_SIGNER,
                "expirationSeconds": seconds,
                "usages": ["client auth", "digital signature"],
            },
        },
    )
    try:
        obj = await kube.get_raw(CSRS, name)
        assert obj is not None
        obj.setdefault("status", {})["conditions"] = [
            {
                "type": "Approved",
                "status": "True",
                "reason": "NubesCredentialIssued",
                "message": f"issued with `nubes credentials issue` for {user}",
            }
        ]
        await kube.request("PUT", CSRS.item(name) + "/approval", body=obj)
        deadline = time.monotonic() + timeout
        while True:
            obj = await kube.get_raw(CSRS, name) or {}
            status = obj.get("status", {})
            for cond in status.get("conditions", []):
                if cond["type"] in ("Denied", "Failed") and cond["status"] == "True":
                    raise CredentialError(f"CSR {name} {cond['type']}: {cond.get('message')}")
            if status.get("certificate"):
                return key, base64.b64decode(status["certificate"])
            if time.monotonic() > deadline:
                raise CredentialError(
                    f"CSR {name} approved but not signed within {timeout:.0f}s: is the "
                    "kube-controller-manager's csrsigning controller running with "
                    "--cluster-signing-cert-file/--cluster-signing-key-file?"
                )
            await asyncio.sleep(0.5)
    finally:
        # The certificate is in hand (or never will be): the CSR has no further use.
        await kube.delete_raw(CSRS, name)


async def issue_kubeconfig(
    kube: Kube,
    cluster: Cluster,
    *,
    user: str,
    project: str,
    groups: list[str],
    seconds: int,
    out: Path,
) -> str:
    """Write `out` for `user` in `project`'s namespace; return the notAfter."""
    namespace, obj = await project_namespace(kube, project)
    role = membership(obj, user, groups)
    if role is None:
        log.warning(
            "user is not a member of the project: the kubeconfig authenticates but grants "
            "nothing in it until spec.members lists the user or one of its groups",
            user=user,
            project=project,
        )
    key, cert = await issue_user_certificate(kube, user, groups, seconds)
    write_kubeconfig(
        out,
        cluster,
        user,
        {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)},
        namespace,
    )
    expires = not_after(cert)
    log.info(
        "kubeconfig issued", user=user, project=project, role=role, expires=expires, path=str(out)
    )
    return expires


# --- application credentials -----------------------------------------------------


def binding_name(name: str) -> str:
    return f"nubes-app-credential-{name}"


async def create_app_credential(
    kube: Kube,
    cluster: Cluster,
    *,
    project: str,
    name: str,
    role: str,
    seconds: int,
    out: Path,
) -> str:
    """ServiceAccount `name` with project role `role`, and a kubeconfig with a
    token for it; the credential ends after `seconds` (the token's own life
    is at least the API server's minimum, the controller ends it sooner);
    returns when it ends."""
    if role not in ROLES:
        raise CredentialError(f"role {role}: one of {', '.join(ROLES)}")
    namespace, _ = await project_namespace(kube, project)
    labels = {APP_CREDENTIAL_LABEL: "true", ROLE_LABEL: role}
    review = await kube.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    creator = str(review["status"]["userInfo"]["username"])
    try:
        account = await kube.create_raw(
            SERVICEACCOUNTS,
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": labels,
                    "annotations": {
                        LIFETIME_ANNOTATION: str(seconds),
                        CREATOR_ANNOTATION: creator,
                    },
                },
                # Nothing in the project mounts it; its tokens come from here only.
                "automountServiceAccountToken": False,
            },
            namespace,
        )
    except ApiError as e:
        if e.conflict:
            raise CredentialError(
                f"{name} already exists in project {project}: delete it first"
            ) from e
        raise
    uid = account["metadata"]["uid"]
    await kube.create_raw(
        ROLEBINDINGS,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": binding_name(name),
                "namespace": namespace,
                "labels": labels,
                # Goes with its ServiceAccount, however that is deleted.
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ServiceAccount", "name": name, "uid": uid}
                ],
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"nubes:project-{role}",
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
        namespace,
    )
    granted = await kube.request(
        "POST",
        SERVICEACCOUNTS.item(name, namespace) + "/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": max(seconds, MIN_DURATION)},
        },
    )
    status = granted["status"]
    user = f"system:serviceaccount:{namespace}:{name}"
    write_kubeconfig(out, cluster, user, {"token": status["token"]}, namespace)
    end = expiry_of(account)
    expires = _stamp(end) if end is not None else str(status["expirationTimestamp"])
    log.info(
        "application credential created", project=project, name=name, role=role, expires=expires
    )
    return expires


async def delete_app_credential(kube: Kube, *, project: str, name: str) -> bool:
    """Revoke: every token of the ServiceAccount stops working with it."""
    namespace, _ = await project_namespace(kube, project)
    account = await kube.get_raw(SERVICEACCOUNTS, name, namespace)
    if account is None or account["metadata"].get("labels", {}).get(APP_CREDENTIAL_LABEL) != "true":
        return False
    await kube.delete_raw(SERVICEACCOUNTS, name, namespace, uid=account["metadata"]["uid"])
    await kube.delete_raw(ROLEBINDINGS, binding_name(name), namespace)
    return True


async def list_app_credentials(kube: Kube, *, project: str) -> list[tuple[str, str, str]]:
    """(name, role, when it ends) of each application credential."""
    namespace, _ = await project_namespace(kube, project)
    accounts = await kube.list_raw(
        SERVICEACCOUNTS, namespace, label_selector=f"{APP_CREDENTIAL_LABEL}=true"
    )
    found = []
    for a in accounts:
        end = expiry_of(a)
        role = a["metadata"].get("labels", {}).get(ROLE_LABEL, "?")
        found.append((a["metadata"]["name"], role, _stamp(end) if end else "-"))
    return found
