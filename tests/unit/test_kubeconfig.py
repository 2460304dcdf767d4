"""Connection settings from kubeconfigs and in-cluster files
(runtime/kubeconfig.py), and the client using them against a TLS server on
loopback: CA verification, client certificates from -data, bearer tokens
re-read after rotation, 429 retries and the watch stream."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from nubes.runtime import kubeconfig
from nubes.runtime.kube import ApiError, KindPath, Kube
from nubes.runtime.kubeconfig import (
    BearerToken,
    Connection,
    KubeconfigError,
    Pem,
    load_connection,
    load_incluster,
    load_kubeconfig,
    parse_kubeconfig,
    ssl_context,
)

PODS = KindPath("", "v1", "pods", True)


@dataclass(frozen=True)
class Pki:
    """A self-signed certificate for 127.0.0.1, used as CA, server and
    client certificate at once."""

    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt"), "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Pki(d / "tls.crt", d / "tls.key")


def _config(cluster: dict[str, Any], user: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
        **extra,
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- parsing --------------------------------------------------------------------


def test_files_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    c = parse_kubeconfig(
        _config(
            {"certificate-authority": "pki/ca.crt"},
            {"client-certificate": "pki/me.crt", "client-key": "/abs/me.key"},
        ),
        tmp_path,
        "k",
    )
    assert c.server == "https://127.0.0.1:6443"
    assert c.ca == Pem(file=str(tmp_path / "pki/ca.crt"))
    assert c.client_cert == Pem(file=str(tmp_path / "pki/me.crt"))
    assert c.client_key == Pem(file="/abs/me.key")  # absolute stays absolute
    assert (c.token, c.token_file, c.insecure) == (None, None, False)


def test_data_fields_win_over_files(tmp_path: Path) -> None:
    c = parse_kubeconfig(
        _config(
            {"certificate-authority-data": _b64(b"CA"), "certificate-authority": "ignored"},
            {"client-certificate-data": _b64(b"CERT"), "client-key-data": _b64(b"KEY")},
        ),
        tmp_path,
        "k",
    )
    assert (c.ca, c.client_cert, c.client_key) == (
        Pem(data=b"CA"),
        Pem(data=b"CERT"),
        Pem(data=b"KEY"),
    )


def test_token_token_file_insecure_and_server_name(tmp_path: Path) -> None:
    c = parse_kubeconfig(
        _config(
            {"insecure-skip-tls-verify": True, "tls-server-name": "api.local"},
            {"tokenFile": "tok"},
        ),
        tmp_path,
        "k",
    )
    assert (c.insecure, c.tls_server_name, c.token_file) == (
        True,
        "api.local",
        str(tmp_path / "tok"),
    )
    assert c.ca is None  # the system's trust store
    c = parse_kubeconfig(
        _config({"server": "https://h:1/prefix/"}, {"token": "abc"}), tmp_path, "k"
    )
    assert (c.server, c.token) == ("https://h:1/prefix", "abc")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (_config({}, {}, **{"current-context": ""}), "no current-context set"),
        (_config({}, {}, **{"current-context": "gone"}), "current-context 'gone' is not among"),
        ({**_config({}, {}), "clusters": []}, "names cluster 'c', which is not defined"),
        ({**_config({}, {}), "users": []}, "names user 'u', which is not defined"),
        (_config({"server": ""}, {}), "cluster 'c' has no server"),
        (_config({"server": "127.0.0.1:6443"}, {}), "is not a URL"),
        (_config({}, {"exec": {"command": "aws"}}), "'exec' (exec credential plugins)"),
        (_config({}, {"auth-provider": {"name": "oidc"}}), "'auth-provider'"),
        (_config({}, {"username": "a", "password": "b"}), "basic authentication"),
        (_config({}, {"as": "admin"}), "impersonation"),
        (_config({"proxy-url": "http://p:3128"}, {}), "'proxy-url' (proxies)"),
        (_config({}, {"client-certificate": "c.crt"}), "client certificate or key without"),
        (_config({"certificate-authority-data": "%%%"}, {}), "certificate-authority-data is not"),
    ],
)
def test_refused_with_a_message(tmp_path: Path, document: dict[str, Any], message: str) -> None:
    with pytest.raises(KubeconfigError, match=r"^kubeconfig /some/kubeconfig: ") as e:
        parse_kubeconfig(document, tmp_path, "/some/kubeconfig")
    assert message in str(e.value)


def test_load_from_files_merged_like_kubectl(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = tmp_path / "a" / "config"
    first.write_text(yaml.safe_dump(_config({"certificate-authority": "ca.crt"}, {"token": "t1"})))
    second = tmp_path / "second"
    second.write_text(
        yaml.safe_dump(
            {
                "current-context": "y",
                "contexts": [{"name": "y", "context": {"cluster": "c", "user": "v"}}],
                "users": [{"name": "v", "user": {"tokenFile": "tok"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://other:1"}}],
            }
        )
    )
    c = load_kubeconfig(f"{first}:{tmp_path / 'missing'}:{second}")
    # The first file's current-context and cluster; paths per defining file.
    assert (c.server, c.ca, c.token) == (
        "https://127.0.0.1:6443",
        Pem(file=str(first.parent / "ca.crt")),
        "t1",
    )
    c = load_kubeconfig(f"{second}:{first}")
    assert (c.server, c.token_file) == ("https://other:1", str(tmp_path / "tok"))
    with pytest.raises(KubeconfigError, match="no such file"):
        load_kubeconfig(str(tmp_path / "missing"))
    (tmp_path / "list").write_text("- 1\n")
    with pytest.raises(KubeconfigError, match="not a mapping"):
        load_kubeconfig(str(tmp_path / "list"))


# --- in-cluster ------------------------------------------------------------------


def _serviceaccount(d: Path, token: str = "t1") -> Path:
    d.mkdir(exist_ok=True)
    (d / "token").write_text(token + "\n")
    (d / "ca.crt").write_text("CA")
    return d


def test_incluster(tmp_path: Path) -> None:
    sa = _serviceaccount(tmp_path / "sa")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    c = load_incluster(env, sa)
    assert c == Connection(
        source="in-cluster config",
        server="https://10.0.0.1:443",
        ca=Pem(file=str(sa / "ca.crt")),
        token_file=str(sa / "token"),
    )
    env6 = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert load_incluster(env6, sa).server == "https://[fd00::1]:443"
    with pytest.raises(KubeconfigError, match="not in a Pod"):
        load_incluster({}, sa)
    (sa / "token").unlink()
    with pytest.raises(KubeconfigError, match=f"in-cluster config: {sa}/token missing"):
        load_incluster(env, sa)


def test_no_kubeconfig_means_incluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeconfigError, match=r"no kubeconfig .* not in a Pod"):
        load_connection(None)


def test_token_reread_after_rotation(tmp_path: Path) -> None:
    sa = _serviceaccount(tmp_path / "sa", "t1")
    env = {"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"}
    now = [100.0]
    token = BearerToken(load_incluster(env, sa), clock=lambda: now[0])
    assert token.headers() == {"Authorization": "Bearer t1"}
    (sa / "token").write_text("t2")
    now[0] += 59
    assert token.current() == "t1"  # still fresh
    now[0] += 1
    assert token.current() == "t2"  # read again after a minute
    (sa / "token").unlink()
    now[0] += 60
    assert token.current() == "t2"  # unreadable for a moment: the last one stays
    (sa / "token").write_text("t3")
    now[0] += 0.1  # the failed read did not count as a read
    assert token.current() == "t3"


def test_static_token_wins_and_anonymous(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file")
    both = Connection("k", "https://h", token="inline", token_file=str(tmp_path / "tok"))
    assert BearerToken(both).current() == "inline"
    assert BearerToken(Connection("k", "https://h")).headers() == {}
    with pytest.raises(KubeconfigError, match=r"token file .*missing"):
        BearerToken(Connection("k", "https://h", token_file=str(tmp_path / "missing")))


# --- TLS ------------------------------------------------------------------------


def test_ssl_context(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    data = Connection(
        "k",
        "https://h",
        ca=Pem(data=pki.cert.read_bytes()),
        client_cert=Pem(data=pki.cert.read_bytes()),
        client_key=Pem(file=str(pki.key)),
    )
    context = ssl_context(data)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1
    assert list(tmp_path.iterdir()) == []  # the temporary key file is gone
    insecure = ssl_context(Connection("k", "https://h", insecure=True))
    assert (insecure.verify_mode, insecure.check_hostname) == (ssl.CERT_NONE, False)
    with pytest.raises(KubeconfigError, match="k: client certificate"):
        ssl_context(
            Connection("k", "https://h", client_cert=Pem(data=b"x"), client_key=Pem(data=b"y"))
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KubeconfigError, match="k: certificate authority"):
        ssl_context(Connection("k", "https://h", ca=Pem(file=str(tmp_path / "none"))))


def test_temporary_files_are_private(pki: Pki) -> None:
    with kubeconfig._files(Pem(data=b"secret"), Pem(file="/f")) as (written, given):
        assert os.stat(written).st_mode & 0o777 == 0o600
        assert Path(written).read_bytes() == b"secret"
        assert given == "/f"
    assert not Path(written).exists()


# --- the client against a TLS server on loopback ------------------------------------


@dataclass
class Server:
    url: str
    seen: list[dict[str, Any]]
    answers: list[tuple[int, str]]


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    state = Server("", [], [])

    async def handle(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        state.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "auth": request.headers.get("Authorization"),
                "type": request.headers.get("Content-Type"),
                "body": await request.text(),
                "client": dict(x[0] for x in peer["subject"]) if peer else None,
            }
        )
        if request.query.get("watch"):
            response = web.StreamResponse()
            await response.prepare(request)
            for n in (1, 2):
                event = {"type": "ADDED", "object": {"metadata": {"name": f"p{n}"}}}
                await response.write(json.dumps(event).encode() + b"\n")
            return response
        status, body = state.answers.pop(0) if state.answers else (200, '{"kind": "Pod"}')
        return web.Response(
            status=status, text=body, content_type="application/json", headers={"Retry-After": "0"}
        )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.cert))
    context.load_cert_chain(str(pki.cert), str(pki.key))
    context.verify_mode = ssl.CERT_OPTIONAL
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"https://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def test_client_certificate_from_data(server: Server, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            _config(
                {"server": server.url, "certificate-authority-data": _b64(pki.cert.read_bytes())},
                {
                    "client-certificate-data": _b64(pki.cert.read_bytes()),
                    "client-key-data": _b64(pki.key.read_bytes()),
                },
            )
        )
    )
    async with await Kube.connect(str(path), field_manager="me") as kube:
        assert await kube.get_raw(PODS, "p", "ns") == {"kind": "Pod"}
        await kube.patch_raw(PODS, "p", {"metadata": {"labels": {"a": "b"}}}, "ns")
    get, patch = server.seen
    assert (get["path"], get["client"], get["auth"]) == (
        "/api/v1/namespaces/ns/pods/p",
        {"commonName": "127.0.0.1"},
        None,
    )
    assert (patch["method"], patch["type"], patch["query"]) == (
        "PATCH",
        "application/merge-patch+json",
        {"fieldManager": "me"},
    )
    assert json.loads(patch["body"]) == {"metadata": {"labels": {"a": "b"}}}


async def test_rotated_token_used_and_retries(
    server: Server, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kubeconfig, "TOKEN_MAX_AGE", 0.0)  # read the file every request
    (tmp_path / "tok").write_text("t1")
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            _config(
                {"server": server.url, "certificate-authority": str(pki.cert)}, {"tokenFile": "tok"}
            )
        )
    )
    async with await Kube.connect(str(path)) as kube:
        await kube.request("GET", "/readyz")
        (tmp_path / "tok").write_text("t2")
        server.answers += [(429, "{}"), (200, '{"items": [{"n": 1}]}')]
        assert await kube.list_raw(PODS, "ns", label_selector="a in (x,y),b!=c") == [{"n": 1}]
        server.answers.append((409, '{"reason": "AlreadyExists", "message": "it exists"}'))
        with pytest.raises(ApiError, match="409 AlreadyExists: it exists") as e:
            await kube.create_raw(PODS, {"metadata": {"name": "p"}}, "ns")
        assert e.value.conflict
        events = [e async for e in kube.watch_raw(PODS, "7", label_selector="a=b")]
    assert [e["object"]["metadata"]["name"] for e in events] == ["p1", "p2"]
    assert [s["auth"] for s in server.seen] == ["Bearer t1"] + ["Bearer t2"] * 4
    assert server.seen[2]["query"] == {"labelSelector": "a in (x,y),b!=c"}  # the retry
    assert server.seen[4]["query"] == {
        "watch": "1",
        "resourceVersion": "7",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "290",
        "labelSelector": "a=b",
    }


async def test_untrusted_server_refused(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(_config({"server": server.url}, {"token": "t"})))
    async with await Kube.connect(str(path)) as kube:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await kube.request("GET", "/readyz")
    assert server.seen == []
