"""Fetching image data from a tenant's URL, treated as hostile input.

A tenant names the URL; the controller fetches it. Without limits that is a
way into the control plane (loopback services, cloud metadata on link-local,
the cluster's service and pod ranges, any host file through file://) and a
way to exhaust it (endless or trickling sources). The policy here is
Glance's import filtering (allowed schemes, disallowed hosts, allowed ports)
applied to the address actually connected to:

- every address a host name resolves to is checked, and the connection is
  made to a checked address (no second resolution a DNS rebinding answer
  could change), with the original name kept for TLS and the Host header;
- redirects are followed by hand, each target checked the same way;
- loopback, link-local, private, shared (100.64/10), multicast, reserved and
  unspecified addresses are refused unless the operator allows a network;
  the operator's disallowed networks (the cluster's service and pod ranges)
  are refused even then;
- `file://` reads only below the operator's import directory (symbolic
  links resolved first), and only cloud admins may name it (admission);
- a size bound (`ImageTooLarge`), a stall timeout (no byte for that long)
  and an overall deadline (`ImportTimedOut`) bound every fetch.

http.client is used directly instead of urllib's opener because the opener
resolves names itself, follows redirects on its own and honours proxy
variables: each of those would bypass the checks above.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from nubes.drivers.problem import Failure

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CHUNK = 1024 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchError(Failure):
    """A fetch that may work later (network error, server error)."""

    reason = "ImageFetchFailed"
    retryable = True


class SourceNotAllowed(FetchError):
    """The operator's policy refuses this source; only a new URL helps."""

    reason = "SourceNotAllowed"
    retryable = False


class ImageTooLarge(FetchError):
    reason = "ImageTooLarge"
    retryable = False


class ImportTimedOut(FetchError):
    reason = "ImportTimedOut"
    retryable = False


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class FetchPolicy:
    """What the controller may fetch, set by the operator."""

    allowed_schemes: frozenset[str] = frozenset({"http", "https"})
    """Schemes tenants' URLs may use (file is checked separately, below)."""
    allowed_ports: frozenset[int] = frozenset()
    """Ports a URL may name; empty allows any."""
    allowed_networks: tuple[IpNetwork, ...] = ()
    """Non-public networks the operator trusts (an internal mirror)."""
    disallowed_networks: tuple[IpNetwork, ...] = ()
    """Always refused, even inside an allowed network (service and pod ranges)."""
    file_import_dir: str | None = None
    """The only directory file:// URLs may read below; None refuses file://."""
    max_bytes: int = 64 * 2**30
    stall_timeout: float = 60.0
    """Seconds without a byte before the fetch is abandoned."""
    deadline: float = 3600.0
    """Seconds a whole fetch may take."""
    max_redirects: int = 5
    resolve: Callable[[str, int], list[str]] = field(default=_resolve, repr=False)
    """Name resolution (tests inject one); default: the system resolver."""

    def check_address(self, address: str) -> None:
        """Raise SourceNotAllowed unless the policy lets the controller connect there."""
        ip: IpAddress = ipaddress.ip_address(address.split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            ip = mapped
        if any(ip in net for net in self.disallowed_networks):
            raise SourceNotAllowed(f"address {ip} is in a network the operator disallows")
        if any(ip in net for net in self.allowed_networks):
            return
        if not _public(ip):
            raise SourceNotAllowed(
                f"address {ip} is not public ({_kind(ip)}); image sources must be"
                " public addresses unless the operator allows the network"
            )

    def check_url(self, url: str) -> tuple[urllib.parse.SplitResult, int, list[str]]:
        """The URL's parts, port and the checked addresses to connect to."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in self.allowed_schemes or parts.scheme not in ("http", "https"):
            raise SourceNotAllowed(f"scheme {parts.scheme or '(none)'}:// is not allowed")
        if parts.username or parts.password:
            raise SourceNotAllowed("credentials in image URLs are not accepted")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise SourceNotAllowed(f"bad port in URL: {e}") from e
        if self.allowed_ports and port not in self.allowed_ports:
            raise SourceNotAllowed(f"port {port} is not allowed")
        host = parts.hostname
        if not host:
            raise SourceNotAllowed("the URL names no host")
        try:
            addresses = self.resolve(host, port)
        except OSError as e:
            raise FetchError(f"cannot resolve {host}: {e}") from e
        if not addresses:
            raise FetchError(f"{host} resolves to no address")
        for address in addresses:  # one bad answer refuses the name
            self.check_address(address)
        return parts, port, addresses

    def file_path(self, url: str) -> str:
        """The real path a file:// URL names, if below the import directory."""
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise SourceNotAllowed("file URLs must not name a host")
        if self.file_import_dir is None:
            raise SourceNotAllowed("file:// sources are disabled (no import directory configured)")
        root = os.path.realpath(self.file_import_dir)
        path = os.path.realpath(urllib.parse.unquote(parts.path))
        if os.path.commonpath([root, path]) != root or path == root:
            raise SourceNotAllowed(f"file:// sources must be below {root}")
        return path


@dataclass(frozen=True)
class Fetched:
    sha256: str
    size: int


def fetch(url: str, dest: str, policy: FetchPolicy) -> Fetched:
    """Stream `url` into `dest` under `policy`; returns the data's SHA-256 and size."""
    started = time.monotonic()
    if urllib.parse.urlsplit(url).scheme == "file":
        path = policy.file_path(url)
        try:
            with open(path, "rb") as src:
                return _copy(src, dest, policy, started, url)
        except OSError as e:
            raise FetchError(f"cannot read {url}: {e.strerror or e}") from e
    for _ in range(policy.max_redirects + 1):
        parts, port, addresses = policy.check_url(url)
        conn = _connect(parts, port, addresses, policy)
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            try:
                conn.request("GET", target, headers={"User-Agent": "nubes-image-import"})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise _network_error(url, e) from e
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"{url}: redirect without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchError(f"{url}: HTTP {response.status} {response.reason}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise ImageTooLarge(
                    f"image from {url} is {int(length)} bytes, over the limit of"
                    f" {policy.max_bytes} bytes"
                )
            return _copy(response, dest, policy, started, url)
        finally:
            conn.close()
    raise SourceNotAllowed(f"more than {policy.max_redirects} redirects")


def _copy(
    src: io.BufferedReader | http.client.HTTPResponse,
    dest: str,
    policy: FetchPolicy,
    started: float,
    url: str,
) -> Fetched:
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while True:
            if time.monotonic() - started > policy.deadline:
                raise ImportTimedOut(
                    f"image from {url} did not arrive within {policy.deadline:g} s"
                )
            try:
                chunk = src.read1(CHUNK)
            except TimeoutError as e:
                raise ImportTimedOut(
                    f"image from {url} stalled: no data for {policy.stall_timeout:g} s"
                ) from e
            except (OSError, http.client.HTTPException) as e:
                raise _network_error(url, e) from e
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise ImageTooLarge(
                    f"image from {url} is larger than the limit of {policy.max_bytes} bytes"
                )
            digest.update(chunk)
            out.write(chunk)
    return Fetched(digest.hexdigest(), size)


def _connect(
    parts: urllib.parse.SplitResult, port: int, addresses: list[str], policy: FetchPolicy
) -> http.client.HTTPConnection:
    host = parts.hostname or ""
    if parts.scheme == "https":
        return _PinnedHTTPS(host, port, addresses, policy.stall_timeout)
    return _PinnedHTTP(host, port, addresses, policy.stall_timeout)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address checked beforehand, never to a fresh lookup."""

    def __init__(self, host: str, port: int, pinned: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.pinned = pinned

    def connect(self) -> None:
        self.sock = _open_socket(self.pinned, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, pinned: list[str], timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.pinned = pinned

    def connect(self) -> None:
        sock = _open_socket(self.pinned, self.port, self.timeout)
        # The certificate is checked against the URL's host name, as usual.
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def _open_socket(addresses: list[str], port: int, timeout: float | None) -> socket.socket:
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError as e:
            error = e
    assert error is not None
    raise error


def _network_error(url: str, e: BaseException) -> FetchError:
    if isinstance(e, TimeoutError):
        return FetchError(f"cannot fetch {url}: timed out")
    return FetchError(f"cannot fetch {url}: {e}")


def _public(ip: IpAddress) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _kind(ip: IpAddress) -> str:
    for attr in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{attr}"):
            return attr.replace("_", "-")
    return "not global"


def parse_networks(texts: list[str]) -> tuple[IpNetwork, ...]:
    """CIDRs from the command line (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)
