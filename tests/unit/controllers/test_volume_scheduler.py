"""The volume scheduler: filters, CapacityWeigher, extra specs and explanations (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubes.controllers.volume_scheduler import (
    FILTERS,
    Choice,
    InvalidSpec,
    NoValidBackend,
    PoolState,
    VolumeRequest,
    check_spec,
    match_spec,
    schedule,
)

THIN = {"thin_provisioning_support": "True", "storage_protocol": "iSCSI"}
THICK = {"thin_provisioning_support": "False", "storage_protocol": "iSCSI"}


def pool(node: str, **kw: object) -> PoolState:
    base: dict[str, object] = dict(
        backend="file",
        pool="default",
        zone="nova",
        usable=True,
        total_gib=100.0,
        free_gib=100.0,
        provisioned_gib=0.0,
        max_over_subscription_ratio=1.0,
        capabilities=THICK,
    )
    base.update(kw)
    return PoolState(node=node, **base)  # type: ignore[arg-type]


def test_explains_every_rejected_pool_like_the_issue_asks() -> None:
    pools = [pool("a", zone="east"), pool("b", free_gib=5.0)]
    result = schedule(pools, VolumeRequest(size_gib=20, zone="nova"))
    assert isinstance(result, NoValidBackend)
    assert result.explanation == (
        "0/2 pools: 1 insufficient capacity (needs 20 GiB, 5 free), 1 wrong availability zone"
    )


def test_explanation_counts_and_names_the_largest_free_capacity() -> None:
    pools = [
        pool("a", free_gib=3.0),
        pool("b", free_gib=7.5),
        pool("c", usable=False),
        pool("d", backend="lvm"),
    ]
    result = schedule(pools, VolumeRequest(size_gib=8, backend_name="file"))
    assert isinstance(result, NoValidBackend)
    assert result.explanation == (
        "0/4 pools: 2 insufficient capacity (needs 8 GiB, at most 7.5 free), "
        "1 node down or disabled, 1 not backend file"
    )


def test_no_pools_at_all() -> None:
    result = schedule([], VolumeRequest(size_gib=1))
    assert isinstance(result, NoValidBackend)
    assert result.explanation == "0/0 pools: no node reports a storage pool"


def test_thin_pools_count_provisioned_against_oversubscribed_total() -> None:
    thin = pool(
        "a",
        capabilities=THIN,
        total_gib=10.0,
        free_gib=10.0,
        provisioned_gib=180.0,
        max_over_subscription_ratio=20.0,
    )
    assert isinstance(schedule([thin], VolumeRequest(size_gib=20)), Choice)
    assert isinstance(schedule([thin], VolumeRequest(size_gib=21)), NoValidBackend)
    # What the scheduler placed but the node has not reported yet counts too.
    pending = PoolState(**{**thin.__dict__, "pending_gib": 10.0})
    result = schedule([pending], VolumeRequest(size_gib=11))
    assert isinstance(result, NoValidBackend)
    assert "needs 11 GiB, 10 free" in result.explanation


def test_thick_pools_need_real_free_space() -> None:
    thick = pool("a", free_gib=10.0, provisioned_gib=0.0)
    assert isinstance(schedule([thick], VolumeRequest(size_gib=10)), Choice)
    assert isinstance(schedule([thick], VolumeRequest(size_gib=11)), NoValidBackend)


def test_capacity_weigher_most_free_wins_ties_by_name() -> None:
    pools = [pool("a", free_gib=50.0), pool("b", free_gib=80.0), pool("c", free_gib=80.0)]
    assert schedule(pools, VolumeRequest(size_gib=1)) == Choice("b", "file", "default", 3)


def test_sources_pin_the_pool_or_node() -> None:
    pools = [pool("a"), pool("b", free_gib=200.0), pool("b", pool="other")]
    snap = VolumeRequest(size_gib=1, only_pool=("a", "file", "default"), source="snapshot s1")
    assert schedule(pools, snap) == Choice("a", "file", "default", 3)
    restore = VolumeRequest(size_gib=1, only_node="b")
    assert schedule(pools, restore) == Choice("b", "file", "default", 3)
    full = schedule(
        [pool("b")],
        VolumeRequest(size_gib=1, only_pool=("a", "file", "default"), source="snapshot s1"),
    )
    assert isinstance(full, NoValidBackend)
    assert full.explanation == "0/1 pools: 1 not the pool of snapshot s1"


def test_capabilities_filter_with_cinder_operators() -> None:
    fast = pool("a", backend="fast", capabilities={**THIN, "disk": "ssd nvme", "iops": "5000"})
    slow = pool("b", backend="slow", capabilities={**THICK, "disk": "hdd", "iops": "200"})
    pools = [fast, slow]

    def chosen(specs: dict[str, str], backend: str | None = None) -> str | None:
        result = schedule(pools, VolumeRequest(1, backend_name=backend, extra_specs=specs))
        return result.node if isinstance(result, Choice) else None

    assert chosen({"thin_provisioning_support": "<is> True"}) == "a"
    assert chosen({"capabilities:thin_provisioning_support": "<is> False"}) == "b"
    assert chosen({"disk": "<in> nv"}) == "a"
    assert chosen({"disk": "<all-in> ssd nvme"}) == "a"
    assert chosen({"disk": "<or> hdd <or> tape"}) == "b"
    assert chosen({"disk": "hdd"}) == "b"
    assert chosen({"iops": ">= 1000"}) == "a"
    assert chosen({"iops": "= 100"}) == "a"  # "=" is "at least"; a has more free space
    assert chosen({"volume_backend_name": "slow"}) == "b"
    assert chosen({}, backend="slow") == "b"
    assert chosen({"qos:read_iops": "100"}) == "a"  # not a capability: ignored
    assert chosen({"replication": "<is> True"}) is None  # no pool reports it
    result = schedule(pools, VolumeRequest(1, extra_specs={"disk": "tape"}))
    assert isinstance(result, NoValidBackend)
    assert result.explanation == "0/2 pools: 2 capability disk does not match 'tape'"


def test_spec_checks() -> None:
    check_spec("<is> True")
    check_spec("plain words are fine")
    check_spec(">= 10")
    for bad in ("<is> maybe", ">= ten", "<in>"):
        with pytest.raises(InvalidSpec):
            check_spec(bad)
    assert match_spec("True", "true")
    assert not match_spec("x", "<s> y")
    assert match_spec("abc", "s< abd")


pools_strategy = st.lists(
    st.builds(
        pool,
        node=st.text("abcdef", min_size=1, max_size=3),
        backend=st.sampled_from(["file", "lvm"]),
        zone=st.sampled_from(["nova", "east"]),
        usable=st.booleans(),
        total_gib=st.floats(1, 1000),
        free_gib=st.floats(0, 1000),
        provisioned_gib=st.floats(0, 5000),
        max_over_subscription_ratio=st.sampled_from([1.0, 2.0, 20.0]),
        capabilities=st.sampled_from([THIN, THICK]),
        pending_gib=st.floats(0, 100),
    ),
    max_size=8,
    unique_by=lambda p: p.key,
)
request_strategy = st.builds(
    VolumeRequest,
    size_gib=st.integers(1, 2000),
    zone=st.sampled_from([None, "nova", "east"]),
    backend_name=st.sampled_from([None, "file", "lvm"]),
    extra_specs=st.sampled_from(
        [{}, {"thin_provisioning_support": "<is> True"}, {"storage_protocol": "iSCSI"}]
    ),
)


@given(pools_strategy, request_strategy)
def test_choice_passes_every_filter_and_has_most_free_capacity(
    pools: list[PoolState], req: VolumeRequest
) -> None:
    result = schedule(pools, req)
    eligible = [p for p in pools if all(f(p, req) is None for f in FILTERS)]
    if isinstance(result, NoValidBackend):
        assert not eligible
        assert sum(result.reasons.values()) == len(pools) == result.considered
        assert result.explanation.startswith(f"0/{len(pools)} pools")
    else:
        chosen = next(p for p in pools if p.key == (result.node, result.backend, result.pool))
        assert chosen in eligible
        assert req.size_gib <= chosen.free_for_request
        assert chosen.free_for_request == max(p.free_for_request for p in eligible)
