"""When an application credential ends, and which ones the controller deletes,
without an API server."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from nubes.controllers.app_credentials import Expired, expired
from nubes.runtime.credentials import (
    APP_MIN_DURATION,
    LIFETIME_ANNOTATION,
    CredentialError,
    expiry_of,
    parse_duration,
)

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def account(
    name: str,
    life: str | None = "30",
    *,
    label: str | None = "true",
    created: str | None = "2026-01-01T12:00:00Z",
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "p", "uid": f"uid-{name}"}
    if label is not None:
        meta["labels"] = {"nubes.io/app-credential": label}
    if life is not None:
        meta["annotations"] = {LIFETIME_ANNOTATION: life}
    if created is not None:
        meta["creationTimestamp"] = created
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T12:00:40Z"
    return {"metadata": meta}


def test_expiry_counts_from_the_creation_on_the_servers_clock() -> None:
    assert expiry_of(account("a", "30")) == T0 + datetime.timedelta(seconds=30)
    assert expiry_of(account("a", "86400")) == T0 + datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "broken",
    [account("a", None), account("a", "soon"), account("a", created=None), {"metadata": {}}],
)
def test_no_recorded_life_means_no_expiry_here(broken: dict[str, Any]) -> None:
    assert expiry_of(broken) is None


def test_only_labelled_credentials_past_their_life_expire() -> None:
    accounts = [
        account("over", "30"),
        account("exactly", "40"),
        account("later", "41"),
        account("unlabelled", "1", label=None),
        account("other-label", "1", label="false"),
        account("no-life", None),
        account("going", "1", deleting=True),
    ]
    now = T0 + datetime.timedelta(seconds=40)
    assert expired(accounts, now) == [
        Expired("p", "over", "uid-over", T0 + datetime.timedelta(seconds=30)),
        Expired("p", "exactly", "uid-exactly", now),
    ]
    assert expired(accounts, T0) == []


def test_durations() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("10s", APP_MIN_DURATION) == 10
    with pytest.raises(CredentialError, match="minimum is 10m"):
        parse_duration("5m")
    with pytest.raises(CredentialError, match="minimum is 10s"):
        parse_duration("5s", APP_MIN_DURATION)
    with pytest.raises(CredentialError, match="use a number"):
        parse_duration("forever")
