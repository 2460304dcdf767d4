"""Where the API server is and how to prove who we are: from a kubeconfig or
from the Pod's ServiceAccount.

Our own small loader instead of the Kubernetes client library's: importing it
costs about 60 MiB of resident memory in every process, for the two things
used here. It supports what Nubes' kubeconfigs and Pods use (server and CA,
client certificates, bearer tokens and token files, in-cluster config) and
refuses the rest (exec and auth-provider plugins, basic auth, impersonation,
proxies) with a message naming the kubeconfig and the field, rather than
connecting as someone else or not at all.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICEACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_MAX_AGE = 60.0
"""Seconds a token read from a file is used before the file is read again:
projected ServiceAccount tokens are rotated by the kubelet (about hourly)."""

# Fields of a kubeconfig user or cluster Nubes does not implement. Silently
# ignoring them would connect without credentials, or with other rights
# than meant (impersonation), so they are refused.
_UNSUPPORTED_USER = {
    "exec": "exec credential plugins",
    "auth-provider": "auth-provider plugins",
    "username": "basic authentication (username/password)",
    "password": "basic authentication (username/password)",
    "as": "impersonation",
    "as-uid": "impersonation",
    "as-groups": "impersonation",
    "as-user-extra": "impersonation",
}
_UNSUPPORTED_CLUSTER = {"proxy-url": "proxies"}


class KubeconfigError(Exception):
    """The connection settings are missing, malformed or unsupported."""


@dataclass(frozen=True)
class Pem:
    """PEM material, either a file or the bytes themselves (from -data)."""

    file: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.file is not None
        return Path(self.file).read_bytes()


@dataclass(frozen=True)
class Connection:
    """Everything needed to reach and authenticate to one API server."""

    source: str  # the kubeconfig's path, or "in-cluster config"; for messages
    server: str  # https://host:port[/prefix], no trailing slash
    ca: Pem | None = None  # None: the system's trust store
    insecure: bool = False
    tls_server_name: str | None = None
    client_cert: Pem | None = None
    client_key: Pem | None = None
    token: str | None = None
    token_file: str | None = None


# --- kubeconfig ------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    body: dict[str, Any]
    base: Path  # relative file paths are relative to the file that defined the entry


def load_kubeconfig(paths: str) -> Connection:
    """The current context's connection from a kubeconfig, or several joined
    by ':' as in KUBECONFIG (the first file to name an entry or a
    current-context wins, as kubectl merges them)."""
    files = [p for p in paths.split(os.pathsep) if p]
    if not files:
        raise KubeconfigError("no kubeconfig given")
    documents: list[tuple[Mapping[str, Any], Path]] = []
    for file in files:
        try:
            document = yaml.safe_load(Path(file).read_text()) or {}
        except FileNotFoundError:
            if len(files) > 1:
                continue  # kubectl skips missing files of a list
            raise KubeconfigError(f"kubeconfig {file}: no such file") from None
        except (OSError, yaml.YAMLError) as e:
            raise KubeconfigError(f"kubeconfig {file}: unreadable: {e}") from None
        if not isinstance(document, dict):
            raise KubeconfigError(f"kubeconfig {file}: not a mapping")
        documents.append((document, Path(os.path.abspath(file)).parent))
    return _resolve(paths, documents)


def parse_kubeconfig(document: Mapping[str, Any], directory: Path, source: str) -> Connection:
    """The current context's connection from one parsed kubeconfig whose
    relative paths are relative to `directory` (pure)."""
    return _resolve(source, [(document, directory)])


def _resolve(source: str, documents: list[tuple[Mapping[str, Any], Path]]) -> Connection:
    where = f"kubeconfig {source}"
    current = ""
    named: dict[str, dict[str, _Entry]] = {"clusters": {}, "users": {}, "contexts": {}}
    for document, base in documents:
        current = current or str(document.get("current-context") or "")
        for section, key in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for item in document.get(section) or []:
                if isinstance(item, dict) and "name" in item:
                    entry = _Entry(dict(item.get(key) or {}), base)
                    named[section].setdefault(str(item["name"]), entry)
    if not current:
        raise KubeconfigError(f"{where}: no current-context set")
    context = named["contexts"].get(current)
    if context is None:
        raise KubeconfigError(f"{where}: current-context {current!r} is not among its contexts")
    cluster_name = str(context.body.get("cluster") or "")
    cluster = named["clusters"].get(cluster_name)
    if cluster is None:
        raise KubeconfigError(
            f"{where}: context {current!r} names cluster {cluster_name!r}, which is not defined"
        )
    user_name = str(context.body.get("user") or "")
    user = named["users"].get(user_name) if user_name else _Entry({}, cluster.base)
    if user is None:
        raise KubeconfigError(
            f"{where}: context {current!r} names user {user_name!r}, which is not defined"
        )
    for entry, unsupported, what in (
        (cluster, _UNSUPPORTED_CLUSTER, f"cluster {cluster_name!r}"),
        (user, _UNSUPPORTED_USER, f"user {user_name!r}"),
    ):
        for field, feature in unsupported.items():
            if entry.body.get(field):
                raise KubeconfigError(
                    f"{where}: {what} uses {field!r} ({feature}), which Nubes does not support; "
                    "use a kubeconfig with a client certificate or a token"
                )
    server = str(cluster.body.get("server") or "")
    if not server:
        raise KubeconfigError(f"{where}: cluster {cluster_name!r} has no server")
    if not server.startswith(("https://", "http://")):
        raise KubeconfigError(f"{where}: cluster {cluster_name!r}: server {server!r} is not a URL")
    c, u = cluster.body, user.body
    cert = _pem(where, c, "certificate-authority", cluster.base)
    client_cert = _pem(where, u, "client-certificate", user.base)
    client_key = _pem(where, u, "client-key", user.base)
    if (client_cert is None) != (client_key is None):
        raise KubeconfigError(
            f"{where}: user {user_name!r} has a client certificate or key without the other"
        )
    token_file = u.get("tokenFile")
    return Connection(
        source=source,
        server=server.rstrip("/"),
        ca=cert,
        insecure=bool(c.get("insecure-skip-tls-verify")),
        tls_server_name=c.get("tls-server-name") or None,
        client_cert=client_cert,
        client_key=client_key,
        token=u.get("token") or None,
        token_file=str(user.base / token_file) if token_file else None,
    )


def _pem(where: str, entry: Mapping[str, Any], field: str, base: Path) -> Pem | None:
    """`field` (a path, relative to `base`) or `field`-data (base64)."""
    data = entry.get(f"{field}-data")
    if data:
        try:
            return Pem(data=base64.b64decode(str(data), validate=True))
        except (binascii.Error, ValueError):
            raise KubeconfigError(f"{where}: {field}-data is not base64") from None
    path = entry.get(field)
    return Pem(file=str(base / str(path))) if path else None  # an absolute path stays absolute


# --- in-cluster ------------------------------------------------------------------


def load_incluster(
    environ: Mapping[str, str] | None = None, directory: Path = SERVICEACCOUNT_DIR
) -> Connection:
    """The API server a Pod reaches through its Service, as the Pod's
    ServiceAccount (token and CA mounted in `directory`)."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeconfigError(
            "no kubeconfig (set KUBECONFIG or pass --kubeconfig) and not in a Pod "
            "(KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT unset)"
        )
    token, ca = directory / "token", directory / "ca.crt"
    for needed in (token, ca):
        if not needed.is_file():
            raise KubeconfigError(f"in-cluster config: {needed} missing")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return Connection(
        source="in-cluster config",
        server=f"https://{host}:{port}",
        ca=Pem(file=str(ca)),
        token_file=str(token),
    )


def load_connection(kubeconfig: str | None) -> Connection:
    """From `kubeconfig` if given, else in-cluster."""
    return load_kubeconfig(kubeconfig) if kubeconfig else load_incluster()


# --- using it ---------------------------------------------------------------------


class BearerToken:
    """The token to send, re-read from its file when older than `max_age`
    so that a rotated token is picked up (client-go does the same)."""

    def __init__(
        self,
        connection: Connection,
        *,
        max_age: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._static = connection.token
        self._file = None if connection.token else connection.token_file
        self._max_age = TOKEN_MAX_AGE if max_age is None else max_age
        self._clock = clock
        self._value: str | None = None
        self._read_at = 0.0
        if self._file:
            self._value = self._read()  # unreadable at start: fail now, clearly
            self._read_at = clock()

    def _read(self) -> str:
        assert self._file is not None
        try:
            return Path(self._file).read_text().strip()
        except OSError as e:
            raise KubeconfigError(f"token file {self._file}: {e}") from None

    def current(self) -> str | None:
        if self._file and self._clock() - self._read_at >= self._max_age:
            # A file briefly unreadable mid-rotation keeps the old token
            # until the next try (the kubelet swaps it atomically anyway).
            with contextlib.suppress(KubeconfigError):
                self._value = self._read()
                self._read_at = self._clock()
        return self._static or self._value

    def headers(self) -> dict[str, str]:
        token = self.current()
        return {"Authorization": f"Bearer {token}"} if token else {}


def ssl_context(connection: Connection) -> ssl.SSLContext:
    """TLS as the connection says: its CA (or the system's), optionally no
    verification, and the client certificate if there is one."""
    ca = connection.ca
    try:
        context = ssl.create_default_context(
            cafile=ca.file if ca and ca.file else None,
            cadata=ca.data.decode() if ca and ca.data is not None else None,
        )
    except (OSError, ssl.SSLError, UnicodeDecodeError) as e:
        raise KubeconfigError(f"{connection.source}: certificate authority: {e}") from None
    # Go's TLS (kubeadm, client-go) accepts certificates that Python 3.13's
    # strict X.509 mode rejects (a CA without key usage, for one).
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if connection.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if connection.client_cert and connection.client_key:
        try:
            with _files(connection.client_cert, connection.client_key) as (cert, key):
                context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise KubeconfigError(f"{connection.source}: client certificate: {e}") from None
    return context


@contextlib.contextmanager
def _files(*pems: Pem) -> Iterator[list[str]]:
    """Paths for the PEMs: files as they are; -data written to private
    (0600) temporary files, removed on exit (ssl loads only from files)."""
    paths: list[str] = []
    made: list[str] = []
    try:
        for pem in pems:
            if pem.file is not None:
                paths.append(pem.file)
                continue
            fd, path = tempfile.mkstemp(prefix="nubes-tls-")  # mode 0600
            made.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(pem.read())
            paths.append(path)
        yield paths
    finally:
        for path in made:
            with contextlib.suppress(OSError):
                os.unlink(path)
