"""Thin typed access to the Kubernetes API.

runtime.kubeconfig supplies the connection settings (kubeconfig or
in-cluster) and aiohttp the HTTP session; requests are issued directly
against REST paths with explicit content types (merge patch, server-side
apply) and answered as plain dicts or parsed into the API models.

(One module for the whole client (raw verbs, typed verbs, list/watch, the
HTTP session): about 430 lines, all one concern.)
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from nubes.api.meta import Resource, now_rfc3339
from nubes.runtime.kubeconfig import BearerToken, Connection, load_connection, ssl_context

R = TypeVar("R", bound=Resource[Any, Any])
T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
THROTTLE_RETRIES = 10
APPLY_PATCH = "application/apply-patch+yaml"


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: dict[str, Any] | str):
        self.status = status
        self.body = body
        message = body.get("message", "") if isinstance(body, dict) else body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        super().__init__(f"{status} {self.reason}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """AlreadyExists on create, or a stale resourceVersion on update."""
        return self.status == 409

    @property
    def invalid(self) -> bool:
        return self.status == 422


@dataclass(frozen=True)
class KindPath:
    """Where a kind lives in the REST API."""

    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool

    def collection(self, namespace: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"

    def item(self, name: str, namespace: str | None = None) -> str:
        return f"{self.collection(namespace)}/{name}"


def path_of(kind: type[Resource[Any, Any]]) -> KindPath:
    info = kind.crd
    return KindPath(info.group, info.version, info.plural, info.scope == "Namespaced")


NAMESPACES = KindPath("", "v1", "namespaces", False)
EVENTS = KindPath("", "v1", "events", True)
SECRETS = KindPath("", "v1", "secrets", True)
CONFIGMAPS = KindPath("", "v1", "configmaps", True)
ROLEBINDINGS = KindPath("rbac.authorization.k8s.io", "v1", "rolebindings", True)
RESOURCEQUOTAS = KindPath("", "v1", "resourcequotas", True)


def default_kubeconfig() -> str | None:
    """KUBECONFIG if set, else the dev cluster's, else in-cluster config."""
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    local = os.path.join(os.environ.get("NUBES_STATE", ".nubes"), "kubeconfig")
    return local if os.path.exists(local) else None


class Kube:
    """An API client. Create with `await Kube.connect()`, close with `close()`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        connection: Connection,
        field_manager: str,
    ):
        self._session = session
        self._server = connection.server
        self._server_hostname = connection.tls_server_name
        self._token = BearerToken(connection)
        self.field_manager = field_manager

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, *, field_manager: str = "nubes") -> Kube:
        """Connect per `kubeconfig` (default: default_kubeconfig(), else
        in-cluster); raises KubeconfigError on unusable settings."""
        connection = load_connection(kubeconfig or default_kubeconfig())
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ssl=ssl_context(connection)),
            # Not trusting the environment: aiohttp would re-read ~/.netrc and
            # the proxy variables in a thread on every request (most of the
            # controller's CPU under load once); Nubes reaches the API server
            # directly.
            trust_env=False,
            # 2 MiB reads: large objects arrive as one watch event line.
            read_bufsize=2**21,
        )
        return cls(session, connection, field_manager)

    async def close(self) -> None:
        await self._session.close()

    def _headers(self, headers: dict[str, str]) -> dict[str, str]:
        # Per request, so a rotated ServiceAccount token is picked up.
        return {**headers, **self._token.headers()}

    async def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        query: builtins.list[tuple[str, str]],
        data: bytes | None,
        timeout: float,
    ) -> aiohttp.ClientResponse:
        extra: dict[str, Any] = {}
        if self._server_hostname:
            extra["server_hostname"] = self._server_hostname
        return await self._session.request(
            method,
            self._server + path,
            params=query,
            headers=self._headers(headers),
            data=data,
            timeout=aiohttp.ClientTimeout(total=timeout),
            **extra,
        )

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # --- raw requests ------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if method in ("POST", "PUT", "PATCH"):
            # Every write is recorded under this writer's name, not the
            # client library's, so managedFields say who owns what.
            query = {"fieldManager": self.field_manager, **(query or {})}
        payload = None if body is None else json.dumps(body, default=_json_default).encode()
        for attempt in range(THROTTLE_RETRIES + 1):
            response = await self._send(
                method,
                path,
                headers=headers,
                query=list((query or {}).items()),
                data=payload,
                timeout=timeout,
            )
            try:
                raw = await response.read()
            finally:
                response.release()
            # 429 means the request was not processed (throttled, or storage
            # still initialising after a restart): safe to repeat for any verb.
            if response.status == 429 and attempt < THROTTLE_RETRIES:
                await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))
                continue
            break
        try:
            data: Any = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = raw.decode(errors="replace")
        if not 200 <= response.status <= 299:
            raise ApiError(response.status, data)
        return data if isinstance(data, dict) else {}

    # --- untyped verbs ----------------------------------------------------------

    async def get_raw(
        self, kp: KindPath, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            return await self.request("GET", kp.item(name, namespace))
        except ApiError as e:
            if e.not_found:
                return None
            raise

    async def list_raw(
        self, kp: KindPath, namespace: str | None = None, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        data = await self.request("GET", kp.collection(namespace), query=query, timeout=120)
        items: list[dict[str, Any]] = data.get("items", [])
        return items

    async def list_with_version(
        self,
        kp: KindPath,
        parse: Callable[[dict[str, Any]], T | None],
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page: int = 500,
    ) -> tuple[builtins.list[T], str]:
        """Every object of a kind, each turned by `parse` into what is kept
        (None: skipped), and the collection's resourceVersion to watch from.
        In pages, parsed as each arrives: a large collection never sits in
        memory whole in its raw form."""
        items: list[T] = []
        query = {"limit": str(page)}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        while True:
            data = await self.request("GET", kp.collection(), query=query, timeout=120)
            items.extend(x for x in map(parse, data.pop("items", None) or []) if x is not None)
            meta = data.get("metadata", {})
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            query["continue"] = meta["continue"]

    async def watch_raw(
        self,
        kp: KindPath,
        resource_version: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout: int = 290,
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events of a kind after `resource_version`, with bookmarks,
        until the server ends the stream (after about `timeout` seconds). The
        client gives up 15 s later, so a stream that goes silent ends too."""
        query = [
            ("watch", "1"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        response = await self._send(
            "GET",
            kp.collection(),
            headers={"Accept": "application/json"},
            query=query,
            data=None,
            timeout=timeout + 15,
        )
        try:
            if response.status != 200:
                raw = await response.read()
                try:
                    body: Any = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw.decode(errors="replace")
                raise ApiError(response.status, body if isinstance(body, dict) else str(body))
            while line := await response.content.readline():
                event: dict[str, Any] = json.loads(line)
                yield event
        finally:
            response.release()

    async def create_raw(
        self, kp: KindPath, body: dict[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        return await self.request("POST", kp.collection(namespace), body=body)

    async def patch_raw(
        self,
        kp: KindPath,
        name: str,
        patch: dict[str, Any],
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = kp.item(name, namespace) + (f"/{subresource}" if subresource else "")
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    async def apply_raw(
        self,
        kp: KindPath,
        body: dict[str, Any],
        *,
        subresource: str | None = None,
        force: bool = True,
    ) -> dict[str, Any]:
        """Server-side apply under this client's field manager."""
        meta = body["metadata"]
        path = kp.item(meta["name"], meta.get("namespace")) + (
            f"/{subresource}" if subresource else ""
        )
        query = {"fieldManager": self.field_manager, "force": "true" if force else "false"}
        return await self.request("PATCH", path, body=body, content_type=APPLY_PATCH, query=query)

    async def delete_raw(
        self,
        kp: KindPath,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
        propagation: str = "Background",
    ) -> bool:
        """Delete; False when it was already gone."""
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": propagation,
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", kp.item(name, namespace), body=body)
        except ApiError as e:
            if e.not_found:
                return False
            raise
        return True

    # --- typed verbs --------------------------------------------------------------

    async def get(self, kind: type[R], name: str, namespace: str | None = None) -> R | None:
        raw = await self.get_raw(path_of(kind), name, namespace)
        return kind.model_validate(raw) if raw is not None else None

    async def list(self, kind: type[R], namespace: str | None = None) -> builtins.list[R]:
        return [kind.model_validate(i) for i in await self.list_raw(path_of(kind), namespace)]

    async def create(self, obj: Resource[Any, Any]) -> dict[str, Any]:
        kind = type(obj)
        body = obj.wire()
        body["apiVersion"] = kind.crd.api_version
        body["kind"] = kind.crd.kind
        body.pop("status", None)
        meta = body["metadata"]
        for key in ("uid", "resourceVersion", "generation", "creationTimestamp"):
            meta.pop(key, None)
        return await self.create_raw(path_of(kind), body, obj.namespace)

    async def apply_status(
        self, kind: type[R], body: dict[str, Any], *, force: bool
    ) -> dict[str, Any]:
        """Server-side apply of a status body (runtime.status_apply builds it)."""
        return await self.apply_raw(path_of(kind), body, subresource="status", force=force)

    async def set_finalizers(
        self, obj: Resource[Any, Any], finalizers: builtins.list[str]
    ) -> dict[str, Any]:
        """Replace finalizers, failing with 409 if the object changed meanwhile."""
        patch: dict[str, Any] = {
            "metadata": {
                "finalizers": finalizers or None,
                "resourceVersion": obj.metadata.resource_version,
            }
        }
        return await self.patch_raw(path_of(type(obj)), obj.name, patch, obj.namespace)

    async def event(
        self, obj: Resource[Any, Any], reason: str, message: str, *, warning: bool = False
    ) -> None:
        """Record a Kubernetes Event about `obj` (shown by kubectl describe)."""
        now = now_rfc3339()
        namespace = obj.namespace or "default"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{obj.name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.crd.api_version,
                "kind": obj.crd.kind,
                "name": obj.name,
                "namespace": obj.namespace,
                "uid": obj.uid,
            },
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": self.field_manager},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.create_raw(EVENTS, body, namespace)

    async def delete(self, obj: Resource[Any, Any]) -> bool:
        return await self.delete_raw(
            path_of(type(obj)), obj.name, obj.namespace, uid=obj.uid or None
        )


def _json_default(value: object) -> str:
    """Dates as ISO 8601, as the former client library serialised them."""
    if isinstance(value, datetime.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
