"""The quota ledger's decisions (reserve, grow, give back, refuse) and what
each consumer holds, without an API server."""

from __future__ import annotations

from typing import Any

from nubes.api.compute import Flavor, Instance
from nubes.api.identity import ProjectUsage, Quotas, Reservation
from nubes.api.storage import Volume
from nubes.controllers.quota import (
    COUNTED,
    SUMMED,
    Amounts,
    Change,
    Refusal,
    covers,
    decide,
    hard_limits,
    image_amounts,
    instance_amounts,
    resize_amounts,
    totals,
    usage_summary,
    volume_amounts,
)


def quotas(**limits: int) -> Quotas:
    return Quotas.model_validate(limits)


def entry(kind: str = "Instance", **amounts: int) -> Reservation:
    return Reservation(kind=kind, **amounts)


def flavor(vcpus: int, ram: int) -> Flavor:
    return Flavor.model_validate(
        {"metadata": {"name": "f"}, "spec": {"vcpus": vcpus, "ramMib": ram}}
    )


def instance(**status: Any) -> Instance:
    spec = {"flavor": "f", "powerState": status.pop("powerState", "Running")}
    return Instance.model_validate(
        {"metadata": {"name": "i", "namespace": "p", "uid": "u"}, "spec": spec, "status": status}
    )


def test_reserve_within_limit() -> None:
    ledger = {"a": entry(cores=4, ram_mib=1024)}
    result = decide(ledger, quotas(cores=8), "b", "Instance", Amounts(cores=4, ram_mib=512))
    assert isinstance(result, Change)
    assert result.entry == entry(cores=4, ram_mib=512)


def test_refused_over_limit_with_message() -> None:
    ledger = {"a": entry(cores=6), "b": entry(cores=2)}
    result = decide(ledger, quotas(cores=8), "c", "Instance", Amounts(cores=2))
    assert isinstance(result, Refusal)
    assert result.message("instance") == "cores: 8 of 8 in use, this instance needs 2"


def test_ram_and_gigabytes_refusals_name_their_quota() -> None:
    ram = decide({}, quotas(ram_mib=1024), "x", "Instance", Amounts(cores=1, ram_mib=2048))
    assert isinstance(ram, Refusal)
    assert ram.message("instance") == "ramMib: 0 of 1024 in use, this instance needs 2048"
    gib = decide(
        {"v": entry("Volume", gigabytes=3)}, quotas(gigabytes=4), "s", "VolumeSnapshot",
        Amounts(gigabytes=3),
    )  # fmt: skip
    assert isinstance(gib, Refusal)
    assert gib.message("snapshot") == "gigabytes: 3 of 4 in use, this snapshot needs 3"


def test_image_data_is_held_in_whole_mib() -> None:
    assert image_amounts(0) == Amounts() and image_amounts(1) == Amounts(image_size_mib=1)
    assert image_amounts(2 * 2**20) == Amounts(image_size_mib=2)
    assert image_amounts(2 * 2**20 + 1) == Amounts(image_size_mib=3)
    ledger = {"a": entry("Image", image_size_mib=2)}
    refused = decide(ledger, quotas(image_size_mib=3), "b", "Image", image_amounts(2 * 2**20))
    assert isinstance(refused, Refusal)
    assert refused.message("image") == "imageSizeMib: 2 of 3 in use, this image needs 2"
    # Data already in the store is recorded without a check (a restart, a lowered quota).
    held = image_amounts(2 * 2**20)
    kept = decide(ledger, quotas(image_size_mib=1), "b", "Image", held, held)
    assert isinstance(kept, Change) and kept.entry == entry("Image", image_size_mib=2)


def test_already_recorded_is_no_change() -> None:
    ledger = {"a": entry(cores=2)}
    assert decide(ledger, quotas(cores=1), "a", "Instance", Amounts(cores=2)) is None
    assert decide({}, quotas(), "a", "Instance", Amounts()) is None


def test_growth_checks_only_the_difference() -> None:
    ledger = {"v": entry("Volume", gigabytes=5), "w": entry("Volume", gigabytes=3)}
    ok = decide(ledger, quotas(gigabytes=10), "v", "Volume", Amounts(gigabytes=7))
    assert isinstance(ok, Change)
    refused = decide(ledger, quotas(gigabytes=10), "v", "Volume", Amounts(gigabytes=8))
    assert isinstance(refused, Refusal)
    assert refused.message("volume") == "gigabytes: 8 of 10 in use, this volume needs 3 more"


def test_shrinking_and_release_always_allowed() -> None:
    ledger = {"a": entry(cores=4), "b": entry(cores=4)}
    smaller = decide(ledger, quotas(cores=2), "a", "Instance", Amounts(cores=1))
    assert isinstance(smaller, Change) and smaller.entry == entry(cores=1)
    gone = decide(ledger, quotas(cores=2), "a", "Instance", Amounts())
    assert gone == Change(None)


def test_lowered_quota_keeps_what_is_held_and_refuses_new() -> None:
    ledger = {"a": entry(cores=4), "b": entry(cores=4)}
    # An instance already on a node whose entry was lost is recorded unchecked.
    held = decide(ledger, quotas(cores=2), "c", "Instance", Amounts(cores=2), Amounts(cores=2))
    assert isinstance(held, Change)
    new = decide(ledger, quotas(cores=2), "d", "Instance", Amounts(cores=1))
    assert isinstance(new, Refusal)
    assert new.message("instance") == "cores: 8 of 2 in use, this instance needs 1"


def test_unlimited() -> None:
    ledger = {"a": entry(cores=1000)}
    assert isinstance(decide(ledger, quotas(cores=-1), "b", "Instance", Amounts(cores=5)), Change)
    assert usage_summary(3, None).patch() == {"used": 3, "limit": None, "summary": "3/unlimited"}
    assert usage_summary(3, 10).patch() == {"used": 3, "limit": 10, "summary": "3/10"}


def test_every_quota_has_a_usage_field() -> None:
    # The Project reconciler builds ProjectUsage from these names; a name
    # without a field would be dropped silently (models ignore extra keys).
    names = {name for name, _ in COUNTED} | set(SUMMED)
    assert names <= set(ProjectUsage.model_fields)
    usage = ProjectUsage(**{name: usage_summary(1, None) for name in names})
    assert set(usage.patch()) == {ProjectUsage.model_fields[n].alias for n in names}


def test_zero_quota_refuses_everything() -> None:
    refused = decide({}, quotas(gigabytes=0), "v", "Volume", Amounts(gigabytes=1))
    assert isinstance(refused, Refusal)
    assert refused.message("volume") == "gigabytes: 0 of 0 in use, this volume needs 1"


def test_totals() -> None:
    ledger = {"a": entry(cores=1, ram_mib=2), "b": entry("Volume", gigabytes=3)}
    assert totals(ledger) == Amounts(1, 2, 3)
    assert totals(ledger, without="a") == Amounts(0, 0, 3)


def test_hard_limits_count_custom_resources() -> None:
    hard = hard_limits(quotas(instances=3, volumes=-1, ports=7))
    assert hard["count/instances.compute.nubes.io"] == "3"
    assert hard["count/ports.network.nubes.io"] == "7"
    assert "count/volumes.storage.nubes.io" not in hard
    assert hard["count/securitygroups.network.nubes.io"] == "10"  # the default


def test_instance_amounts() -> None:
    f = flavor(2, 512)
    assert instance_amounts(instance(), f) == (Amounts(2, 512), Amounts())
    placed = instance(node="n1")
    assert instance_amounts(placed, f) == (Amounts(2, 512), Amounts(2, 512))
    offloaded = instance(powerState="Shelved", shelvedDisk={"ref": "x", "sha256": "y"})
    assert instance_amounts(offloaded, f) == (Amounts(), Amounts())
    # Unshelving: the disk is still in the store, the node was freed.
    unshelving = instance(powerState="Running", shelvedDisk={"ref": "x", "sha256": "y"})
    assert instance_amounts(unshelving, f) == (Amounts(2, 512), Amounts())


def test_resize_reserves_growth_only() -> None:
    assert resize_amounts(flavor(1, 512), flavor(4, 256)) == Amounts(cores=3)
    assert resize_amounts(flavor(4, 512), flavor(2, 256)) == Amounts()


def test_volume_amounts() -> None:
    def vol(size: int, **status: Any) -> Volume:
        return Volume.model_validate(
            {
                "metadata": {"name": "v", "namespace": "p"},
                "spec": {"sizeGib": size},
                "status": status,
            }
        )

    assert volume_amounts(vol(2)) == (Amounts(gigabytes=2), Amounts())
    backed = vol(5, node="n", backing={"node": "n", "sizeGib": 2, "sourceDone": True})
    assert volume_amounts(backed) == (Amounts(gigabytes=5), Amounts(gigabytes=2))
    placed = vol(5, node="n", grantedSizeGib=3)
    assert volume_amounts(placed) == (Amounts(gigabytes=5), Amounts(gigabytes=3))


def test_a_done_resize_hands_its_growth_to_the_instance_before_giving_it_back() -> None:
    """Cores limit 8: i1 holds 2 and its Resize to 8 holds the growth of 6.
    The action gives back only once the instance's own entry covers 8 (the
    instance records its new size unchecked: it runs with it). Released
    first, a waiting i2 would take the 6 and the project would end at 14."""
    limits = quotas(cores=8)
    ledger = {"i1": entry(cores=2), "resize": entry("InstanceAction", cores=6)}
    new_size = Amounts(cores=8)
    assert not covers(ledger, "i1", new_size)  # the action keeps its entry
    assert isinstance(decide(ledger, limits, "i2", "Instance", Amounts(cores=6)), Refusal)
    change = decide(ledger, limits, "i1", "Instance", new_size, held=new_size)
    assert isinstance(change, Change) and change.entry is not None
    ledger["i1"] = change.entry
    assert covers(ledger, "i1", new_size)
    del ledger["resize"]  # now given back
    assert isinstance(decide(ledger, limits, "i2", "Instance", Amounts(cores=6)), Refusal)
    assert totals(ledger).get("cores") == 8
