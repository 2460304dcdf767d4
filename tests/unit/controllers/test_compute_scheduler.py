"""The compute scheduler: filters, weigher and explanations (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nubes.controllers.compute_scheduler import (
    FILTERS,
    Choice,
    HostState,
    NoValidHost,
    RequestSpec,
    schedule,
    traits_from_extra_specs,
)


def host(name: str, **kw: object) -> HostState:
    base: dict[str, object] = dict(
        zone="nova",
        usable=True,
        vcpus=2,
        ram_mib=4096,
        disk_gib=100,
        ram_allocation_ratio=1.0,
        reserved_ram_mib=0,
    )
    base.update(kw)
    return HostState(name=name, **base)  # type: ignore[arg-type]


def test_explains_every_rejected_node() -> None:
    hosts = [
        host("a", ram_mib_used=3584),
        host("b", zone="east"),
        host("c", usable=False),
    ]
    result = schedule(hosts, RequestSpec(vcpus=1, ram_mib=1024, disk_gib=1, zone="nova"))
    assert isinstance(result, NoValidHost)
    assert result.explanation == (
        "0/3 nodes are available: 1 insufficient RAM (needs 1024 MiB), "
        "1 node down or disabled, 1 wrong availability zone (wants nova)"
    )


def test_most_free_ram_wins_and_ties_are_stable() -> None:
    hosts = [host("a", ram_mib_used=1024), host("b"), host("c")]
    assert schedule(hosts, RequestSpec(1, 512, 1)) == Choice("b", 3)


def test_allocation_ratios_allow_overcommit() -> None:
    h = host("a", vcpus=2, cpu_allocation_ratio=4.0, vcpus_used=7)
    assert isinstance(schedule([h], RequestSpec(1, 64, 0)), Choice)
    assert isinstance(schedule([h], RequestSpec(2, 64, 0)), NoValidHost)


def test_migration_excludes_the_current_node_and_honours_a_target() -> None:
    hosts = [host("a"), host("b")]
    assert schedule(hosts, RequestSpec(1, 64, 0, exclude=frozenset({"a"}))) == Choice("b", 2)
    result = schedule(hosts, RequestSpec(1, 64, 0, exclude=frozenset({"a"}), only="a"))
    assert isinstance(result, NoValidHost)


def test_traits_from_flavor_extra_specs() -> None:
    required, forbidden = traits_from_extra_specs(
        {"trait:ssd": "required", "trait:gpu": "forbidden", "hw:cpu_policy": "dedicated"}
    )
    assert required == {"ssd"} and forbidden == {"gpu"}
    hosts = [host("a", traits=frozenset({"ssd", "gpu"})), host("b", traits=frozenset({"ssd"}))]
    assert schedule(
        hosts, RequestSpec(1, 64, 0, required_traits=required, forbidden_traits=forbidden)
    ) == Choice("b", 2)


hosts_strategy = st.lists(
    st.builds(
        host,
        name=st.text("abcdefgh", min_size=1, max_size=4),
        zone=st.sampled_from(["nova", "east"]),
        usable=st.booleans(),
        vcpus=st.integers(1, 8),
        ram_mib=st.integers(256, 8192),
        disk_gib=st.integers(1, 50),
        ram_mib_used=st.integers(0, 8192),
        vcpus_used=st.integers(0, 64),
    ),
    max_size=8,
    unique_by=lambda h: h.name,
)
request_strategy = st.builds(
    RequestSpec,
    vcpus=st.integers(1, 4),
    ram_mib=st.integers(64, 4096),
    disk_gib=st.integers(0, 20),
    zone=st.sampled_from([None, "nova", "east"]),
)


@given(hosts_strategy, request_strategy)
def test_choice_passes_every_filter_and_has_most_free_ram(
    hosts: list[HostState], req: RequestSpec
) -> None:
    result = schedule(hosts, req)
    eligible = [h for h in hosts if all(f(h, req) is None for f in FILTERS)]
    if isinstance(result, NoValidHost):
        assert not eligible
        assert sum(result.reasons.values()) == len(hosts) == result.considered
    else:
        chosen = next(h for h in hosts if h.name == result.host)
        assert chosen in eligible
        assert chosen.free_ram_mib == max(h.free_ram_mib for h in eligible)
