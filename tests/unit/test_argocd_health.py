"""The Argo CD health check shipped with the chart (files/argocd/health.lua),
run by a Lua interpreter on every kind in every state: the same objects the
kstatus table uses, the verdict Argo CD shows."""

from __future__ import annotations

import pytest

from nubes.api.registry import ALL_KINDS
from tests.gitops import ARGOCD, STATES, argocd_cm, argocd_health, obj


@pytest.mark.parametrize("state", list(STATES))
def test_argocd_health_of_every_kind(state: str) -> None:
    want = STATES[state][4]
    for kind in ALL_KINDS:
        status, _ = argocd_health(obj(kind, state))
        assert status == want, (kind.crd.kind, state)


def test_messages_name_the_reason() -> None:
    assert argocd_health(obj(ALL_KINDS[0], "stalled")) == (
        "Degraded",
        "IpAddressExhausted: no free address in 10.0.0.0/30",
    )
    assert argocd_health(obj(ALL_KINDS[0], "in-progress"))[1] == "Scheduling: waiting for a node"
    assert argocd_health(obj(ALL_KINDS[0], "deleting"))[1] == "Deleting"
    assert argocd_health(obj(ALL_KINDS[0], "new"))[1] == (
        "Waiting for the controller to observe generation 3"
    )


def test_an_object_without_any_status_is_progressing() -> None:
    """Without the CRD's status default (an older CRD, a tool reading the
    stored object), Argo CD still waits for the controller."""
    for kind in ALL_KINDS:
        bare = {k: v for k, v in obj(kind, "new").items() if k != "status"}
        assert argocd_health(bare) == ("Progressing", "Waiting for the Nubes controller")


def test_kstatus_and_argocd_agree() -> None:
    """In every state but deletion (Argo CD has no Terminating), Argo CD says
    what kstatus says; a fresh object is Progressing for both."""
    same = {"Current": "Healthy", "InProgress": "Progressing", "Failed": "Degraded"}
    for state, (_, _, _, ks, argo) in STATES.items():
        if ks in same:
            assert same[ks] == argo, state


def test_argocd_cm_lists_every_kind_with_the_script() -> None:
    """argocd-cm.yaml is generated (python -m tests.gitops) and in step."""
    text = (ARGOCD / "argocd-cm.yaml").read_text()
    assert text == argocd_cm()
    for kind in ALL_KINDS:
        assert f"health.{kind.crd.group}_{kind.crd.kind}:" in text
