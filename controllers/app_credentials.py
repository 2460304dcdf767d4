"""Application credentials expire: the controller deletes the ServiceAccount
of one whose life is over, and with it every token issued for it (the API
server's token authenticator refuses tokens of a ServiceAccount that is gone)
and its RoleBinding (owner reference, garbage collector).

Why the controller and not the token's own expiry: the API server refuses
TokenRequests shorter than 10 minutes, and a token outlives a revocation of
its binding only if its ServiceAccount stays. `nubes app-credential create`
records the life asked for on the ServiceAccount (an annotation,
counted from its creationTimestamp: the API server's clock, not the
client's), so any life works, down to seconds, and a token of a longer life
still stops at the credential's end.

A periodic pass lists the labelled ServiceAccounts of every namespace (a
label-selected list at resourceVersion 0, served from the API server's watch
cache rather than etcd) and deletes
the expired ones with their uid as a precondition, so a credential made
again under the same name is never taken for the old one. Every controller
shard runs it; the second delete finds nothing.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from nubes.runtime.credentials import APP_CREDENTIAL_LABEL, SERVICEACCOUNTS, expiry_of
from nubes.runtime.kube import ApiError
from nubes.runtime.operator import Operator

log = structlog.get_logger()

# How often expiry is checked: a credential stops working at most this late.
PERIOD = 2.0


@dataclass(frozen=True)
class Expired:
    namespace: str
    name: str
    uid: str
    expired_at: datetime.datetime


def expired(accounts: Iterable[dict[str, Any]], now: datetime.datetime) -> list[Expired]:
    """The application credentials whose life is over at `now` (pure)."""
    found = []
    for account in accounts:
        meta = account.get("metadata", {})
        if (meta.get("labels") or {}).get(APP_CREDENTIAL_LABEL) != "true":
            continue
        end = expiry_of(account)
        if end is not None and end <= now and not meta.get("deletionTimestamp"):
            found.append(Expired(meta["namespace"], meta["name"], meta["uid"], end))
    return found


def register(op: Operator) -> None:
    async def expire_app_credentials() -> None:
        listed = await op.kube.request(
            "GET",
            SERVICEACCOUNTS.collection(None),
            query={"labelSelector": f"{APP_CREDENTIAL_LABEL}=true", "resourceVersion": "0"},
        )
        accounts: list[dict[str, Any]] = listed.get("items", [])
        now = datetime.datetime.now(datetime.UTC)
        for cred in expired(accounts, now):
            try:
                deleted = await op.kube.delete_raw(
                    SERVICEACCOUNTS, cred.name, cred.namespace, uid=cred.uid
                )
            except ApiError as e:
                if e.conflict:
                    continue  # made again under the same name: not this one
                raise
            if deleted:
                log.info(
                    "application credential expired",
                    namespace=cred.namespace,
                    name=cred.name,
                    expired_at=cred.expired_at.isoformat(),
                )

    op.every(PERIOD, expire_app_credentials)
