"""CHAP credentials of exported volumes, in Secrets of the components'
namespace (the agents' --secret-namespace): tenants, even project admins,
never read them. One Secret per volume, named by its uid (volumes of every
project meet in that namespace), labelled with the volume and the node."""

from __future__ import annotations

import base64

import structlog

from nubes.agent.config import NODE_LABEL
from nubes.api.storage import Volume
from nubes.drivers.iscsi.connection import ChapCredentials
from nubes.drivers.problem import fail
from nubes.runtime.kube import SECRETS, ApiError
from nubes.runtime.operator import Operator

log = structlog.get_logger()

SECRET_TYPE = "storage.nubes.io/iscsi-chap"
VOLUME_LABEL = "storage.nubes.io/volume"
VOLUME_UID_LABEL = "storage.nubes.io/volume-uid"
NAMESPACE_LABEL = "storage.nubes.io/namespace"


def chap_secret_name(volume_uid: str) -> str:
    """The Secret holding a volume's CHAP credentials. It lives in the
    components' namespace, where volumes of every project meet: named by uid."""
    return f"iscsi-chap-{volume_uid}"


class ChapSecrets:
    def __init__(self, op: Operator, secret_namespace: str, node: str) -> None:
        self.op = op
        self.secret_namespace = secret_namespace
        self.node = node

    async def ensure(self, vol: Volume) -> tuple[str, ChapCredentials]:
        """The volume's CHAP credentials: generated once, kept in a Secret in
        the components' namespace (tenants, even project admins, never read
        it), labelled with the volume and this node; removed with the volume."""
        name = chap_secret_name(vol.uid)
        kube, namespace = self.op.kube, self.secret_namespace
        for _ in range(3):
            raw = await kube.get_raw(SECRETS, name, namespace)
            if raw is not None:
                labels = raw.get("metadata", {}).get("labels") or {}
                if labels.get(VOLUME_UID_LABEL) != vol.uid:
                    raise fail(
                        "ChapSecretNameTaken",
                        f"Secret {namespace}/{name} exists and does not belong to volume"
                        f" {vol.name}",
                        retryable=False,
                    )
                data = raw.get("data") or {}
                return name, ChapCredentials(
                    username=base64.b64decode(data.get("username", "")).decode(),
                    password=base64.b64decode(data.get("password", "")).decode(),
                )
            creds = ChapCredentials.generate(vol.uid)
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": SECRET_TYPE,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        VOLUME_LABEL: vol.name[:63].rstrip("-_."),
                        VOLUME_UID_LABEL: vol.uid,
                        NAMESPACE_LABEL: vol.namespace or "",
                        NODE_LABEL: self.node,
                    },
                },
                "stringData": {"username": creds.username, "password": creds.password},
            }
            try:
                await kube.create_raw(SECRETS, body, namespace)
            except ApiError as e:
                if e.conflict:
                    continue  # made meanwhile: read it back
                raise
            log.info("chap secret created", volume=vol.key, secret=f"{namespace}/{name}")
            return name, creds
        raise fail("ChapSecretConflict", f"could not settle Secret {namespace}/{name}")

    async def delete(self, vol: Volume) -> None:
        name, namespace = chap_secret_name(vol.uid), self.secret_namespace
        raw = await self.op.kube.get_raw(SECRETS, name, namespace)
        if raw is None:
            return
        labels = raw.get("metadata", {}).get("labels") or {}
        if labels.get(VOLUME_UID_LABEL) == vol.uid:
            await self.op.kube.delete_raw(SECRETS, name, namespace, uid=raw["metadata"].get("uid"))
