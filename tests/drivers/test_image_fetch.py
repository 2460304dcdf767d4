"""The controller's image fetcher against real HTTP servers on loopback:
address policy after resolution and on redirects, file:// containment,
size, stall and deadline limits."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.images.fetch import (
    FetchError,
    FetchPolicy,
    ImageTooLarge,
    ImportTimedOut,
    SourceNotAllowed,
    fetch,
    parse_networks,
)
from tests.image_server import Handler, serve

ALLOWED = "127.0.0.2"  # the "public" server of these tests
INTERNAL = "127.0.0.1"  # stands for the control plane's own services
DATA = os.urandom(256 * 1024)


@pytest.fixture
def allowed_port() -> Iterator[int]:
    for url in serve(ALLOWED):
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture
def internal_port() -> Iterator[int]:
    for url in serve(INTERNAL):
        yield int(url.rsplit(":", 1)[1])


def policy(**kw: object) -> FetchPolicy:
    base: dict[str, object] = {"allowed_networks": parse_networks([f"{ALLOWED}/32"])}
    return FetchPolicy(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(SourceNotAllowed):
        FetchPolicy().check_address(address)


def test_public_addresses_pass_and_denied_networks_win_over_allowed() -> None:
    FetchPolicy().check_address("8.8.8.8")
    FetchPolicy().check_address("2001:4860::8888")
    p = FetchPolicy(
        allowed_networks=parse_networks(["10.0.0.0/8"]),
        disallowed_networks=parse_networks(["10.96.0.0/12"]),
    )
    p.check_address("10.1.2.3")
    with pytest.raises(SourceNotAllowed, match="disallows"):
        p.check_address("10.96.0.1")


def test_urls_are_checked_for_scheme_port_credentials_and_every_resolved_address() -> None:
    def resolve(host: str, port: int) -> list[str]:
        return {"mirror.example": ["8.8.8.8"], "rebind.example": ["8.8.8.8", "127.0.0.1"]}[host]

    p = FetchPolicy(resolve=resolve, allowed_ports=frozenset({443}))
    assert p.check_url("https://mirror.example/x.img")[2] == ["8.8.8.8"]
    for url, match in [
        ("https://rebind.example/x", "127.0.0.1 is not public"),
        ("https://mirror.example:8443/x", "port 8443 is not allowed"),
        ("ftp://mirror.example/x", "scheme ftp"),
        ("gopher://mirror.example/x", "scheme gopher"),
        ("https://user:pw@mirror.example/x", "credentials"),
    ]:
        with pytest.raises(SourceNotAllowed, match=match):
            p.check_url(url)
    only_https = FetchPolicy(resolve=resolve, allowed_schemes=frozenset({"https"}))
    with pytest.raises(SourceNotAllowed, match="scheme http"):
        only_https.check_url("http://mirror.example/x")


def test_a_name_resolving_to_loopback_is_refused_before_any_connection(
    internal_port: int, tmp_path: Path
) -> None:
    Handler.routes = {"/metrics": (200, {}, b"secret")}
    with pytest.raises(SourceNotAllowed, match=r"127\.0\.0\.1 is not public"):
        fetch(f"http://localhost:{internal_port}/metrics", str(tmp_path / "out"), FetchPolicy())
    assert not (tmp_path / "out").exists()


def test_allowed_source_is_fetched_with_its_digest(allowed_port: int, tmp_path: Path) -> None:
    Handler.routes = {"/img": (200, {}, DATA)}
    got = fetch(f"http://{ALLOWED}:{allowed_port}/img", str(tmp_path / "out"), policy())
    assert got.sha256 == hashlib.sha256(DATA).hexdigest() and got.size == len(DATA)
    assert (tmp_path / "out").read_bytes() == DATA


def test_redirects_are_checked_again(allowed_port: int, internal_port: int, tmp_path: Path) -> None:
    Handler.routes = {
        "/to-internal": (302, {"Location": f"http://{INTERNAL}:{internal_port}/metrics"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-img": (301, {"Location": "/img"}, b""),
        "/img": (200, {}, DATA),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/metrics": (200, {}, b"secret"),
    }
    base = f"http://{ALLOWED}:{allowed_port}"
    out = str(tmp_path / "out")
    with pytest.raises(SourceNotAllowed, match=r"127\.0\.0\.1 is not public"):
        fetch(f"{base}/to-internal", out, policy())
    with pytest.raises(SourceNotAllowed, match="scheme file"):
        fetch(f"{base}/to-file", out, policy())
    with pytest.raises(SourceNotAllowed, match="redirects"):
        fetch(f"{base}/loop", out, policy())
    assert fetch(f"{base}/to-img", out, policy()).size == len(DATA)


def test_size_limit_from_the_header_and_while_streaming(allowed_port: int, tmp_path: Path) -> None:
    Handler.routes = {"/img": (200, {}, DATA)}
    url = f"http://{ALLOWED}:{allowed_port}/img"
    with pytest.raises(ImageTooLarge, match="over the limit"):
        fetch(url, str(tmp_path / "out"), policy(max_bytes=1000))
    Handler.trickle_delay = 0
    with pytest.raises(ImageTooLarge, match="larger than the limit of 100 bytes"):
        fetch(
            f"http://{ALLOWED}:{allowed_port}/trickle", str(tmp_path / "o"), policy(max_bytes=100)
        )


def test_a_stalled_or_endless_source_ends_in_time(allowed_port: int, tmp_path: Path) -> None:
    with pytest.raises(ImportTimedOut, match="stalled"):
        fetch(
            f"http://{ALLOWED}:{allowed_port}/silent",
            str(tmp_path / "out"),
            policy(stall_timeout=0.5),
        )
    Handler.trickle_delay = 0.05  # never stalls, never ends
    with pytest.raises(ImportTimedOut, match="did not arrive within 1 s"):
        fetch(
            f"http://{ALLOWED}:{allowed_port}/trickle",
            str(tmp_path / "out"),
            policy(deadline=1.0),
        )


def test_server_errors_are_retryable_fetch_errors(allowed_port: int, tmp_path: Path) -> None:
    Handler.routes = {}
    with pytest.raises(FetchError, match="HTTP 404") as e:
        fetch(f"http://{ALLOWED}:{allowed_port}/none", str(tmp_path / "out"), policy())
    assert e.value.retryable


def test_file_sources_only_below_the_import_directory(tmp_path: Path) -> None:
    root = tmp_path / "import"
    root.mkdir()
    (root / "ok.img").write_bytes(DATA)
    (root / "escape").symlink_to("/etc/passwd")
    out = str(tmp_path / "out")
    p = FetchPolicy(file_import_dir=str(root))
    assert fetch((root / "ok.img").as_uri(), out, p).size == len(DATA)
    for url in (
        "file:///etc/shadow",
        (root / "escape").as_uri(),
        f"file://{root}/../../etc/passwd",
        root.as_uri(),
        "file://otherhost/etc/passwd",
    ):
        with pytest.raises(SourceNotAllowed):
            fetch(url, out, p)
    with pytest.raises(SourceNotAllowed, match="disabled"):
        fetch((root / "ok.img").as_uri(), out, FetchPolicy())


def test_networks_parse_like_the_command_line() -> None:
    assert parse_networks(["127.0.0.2", "10.0.0.0/8"]) == (
        ipaddress.ip_network("127.0.0.2/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
