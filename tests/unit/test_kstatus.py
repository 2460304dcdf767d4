"""Every kind in every state, judged by the real kstatus library
(sigs.k8s.io/cli-utils/pkg/kstatus through hack/kstatus): what Flux, kpt and
cli-utils appliers report while they wait on a Nubes object."""

from __future__ import annotations

import pytest

from nubes.api.registry import ALL_KINDS
from tests.gitops import STATES, kstatus, obj


@pytest.mark.parametrize("state", list(STATES))
def test_kstatus_of_every_kind(state: str) -> None:
    want = STATES[state][3]
    objects = [obj(kind, state) for kind in ALL_KINDS]
    got = {r["kind"]: r["status"] for r in kstatus(objects)}
    assert got == {kind.crd.kind: want for kind in ALL_KINDS}


def test_kstatus_messages_carry_the_reason() -> None:
    """Failed and InProgress name why, so a pipeline's log says it."""
    [stalled] = kstatus([obj(ALL_KINDS[0], "stalled")])
    assert "no free address" in stalled["message"]
    [changed] = kstatus([obj(ALL_KINDS[0], "spec-changed")])
    assert "observed generation is 2" in changed["message"]


def test_a_fresh_object_is_in_progress_by_the_crds_status_default() -> None:
    """Before the controller's first status write the API server serves the
    CRD's default `status: {observedGeneration: 0}`; without it kstatus
    would say Current (the gap this default closes)."""
    for kind in ALL_KINDS:
        fresh = obj(kind, "new")
        assert fresh["status"] == {"observedGeneration": 0}, kind.crd.kind
    [verdict] = kstatus([obj(ALL_KINDS[0], "new")])
    assert "observed generation is 0" in verdict["message"], verdict
    bare = {k: v for k, v in obj(ALL_KINDS[0], "new").items() if k != "status"}
    assert kstatus([bare])[0]["status"] == "Current"
