"""The LVM backend's exact command sequences, answered by a scripted lvm."""

from __future__ import annotations

import json

import pytest

from nubes.drivers.runner import RecordingRunner, Result
from nubes.drivers.volumes.base import (
    GIB,
    BackendUnavailable,
    NoSpace,
    NotFound,
    ShrinkRefused,
    VolumeBackend,
    VolumeBusy,
)
from nubes.drivers.volumes.lvm import LvmBackend, detect_lvm, mapper_name, parse_lvs

VG = "nubes-vg"
LVS = (
    "lvs --reportformat json --units b --nosuffix -o "
    "lv_name,lv_size,lv_attr,origin,pool_lv,lv_path,data_percent nubes-vg"
)
VGS = "vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free nubes-vg"


def lv(
    name: str,
    gib: float,
    attr: str = "-wi-a-----",
    origin: str = "",
    pool: str = "",
    data: str = "",
) -> dict[str, str]:
    return {
        "lv_name": name,
        "lv_size": str(int(gib * GIB)),
        "lv_attr": attr,
        "origin": origin,
        "pool_lv": pool,
        "lv_path": f"/dev/{VG}/{name}",
        "data_percent": data,
    }


def lvs_json(*rows: dict[str, str]) -> str:
    return json.dumps({"report": [{"lv": list(rows)}]})


def vgs_json(size_gib: int, free_gib: int) -> str:
    return json.dumps(
        {
            "report": [
                {
                    "vg": [
                        {
                            "vg_name": VG,
                            "vg_size": str(size_gib * GIB),
                            "vg_free": str(free_gib * GIB),
                        }
                    ]
                }
            ]
        }
    )


class FakeLvm:
    """Answers lvs from a changing list, so a sequence reads back its effects."""

    def __init__(self, *rows: dict[str, str], vg_gib: int = 100, free_gib: int = 90) -> None:
        self.rows = list(rows)
        self.runner = RecordingRunner(
            answers={
                LVS: lambda argv: lvs_json(*self.rows),
                VGS: vgs_json(vg_gib, free_gib),
                "lvcreate": self._create,
                "lvremove": self._remove,
            }
        )

    def _create(self, argv: list[str]) -> str:
        name = argv[argv.index("-n") + 1]
        if "-L" in argv:
            size = float(argv[argv.index("-L") + 1].rstrip("g"))
        elif "-V" in argv:
            size = float(argv[argv.index("-V") + 1].rstrip("g"))
        else:
            size = 1
        attr = "swi-a-s---" if "-s" in argv and "-L" in argv else "-wi-a-----"
        if "--thinpool" in argv or ("-s" in argv and "-L" not in argv):
            attr = "Vwi-a-tz--"
        origin = argv[-1].split("/")[1] if "-s" in argv else ""
        self.rows.append(lv(name, size, attr, origin))
        return ""

    def _remove(self, argv: list[str]) -> str:
        name = argv[-1].split("/")[1]
        self.rows = [r for r in self.rows if r["lv_name"] != name]
        return ""

    def changes(self) -> list[str]:
        """Commands other than the read-only reports."""
        return [c for c in self.runner.commands() if not c.startswith(("lvs ", "vgs "))]


def test_thick_create_is_lvcreate_with_a_size_and_idempotent() -> None:
    fake = FakeLvm()
    backend = LvmBackend(fake.runner, VG)
    assert isinstance(backend, VolumeBackend)
    info = backend.create_volume("abc", 10)
    assert fake.changes() == [f"lvcreate -n volume-abc -L 10g --yes {VG}"]
    assert (info.id, info.size_gib, info.path) == ("abc", 10, f"/dev/{VG}/volume-abc")
    backend.create_volume("abc", 10)
    assert len(fake.changes()) == 1


def test_thin_create_uses_the_pool() -> None:
    fake = FakeLvm(lv("pool", 50, "twi-aotz--", data="10.00"))
    backend = LvmBackend(fake.runner, VG, thin_pool="pool")
    backend.create_volume("t1", 200)  # 200 GiB thin on a 50 GiB pool: over-subscribed, allowed
    assert fake.changes() == [f"lvcreate -n volume-t1 -V 200g --thinpool pool {VG}"]


def test_thick_delete_wipes_with_dd_direct_then_removes() -> None:
    fake = FakeLvm(lv("volume-abc", 3))
    LvmBackend(fake.runner, VG).delete_volume("abc")
    assert fake.changes() == [
        f"dd if=/dev/zero of=/dev/{VG}/volume-abc bs=1M count=3072 oflag=direct status=none",
        "lvremove --config activation { retry_deactivation = 1 } -f nubes-vg/volume-abc",
    ]


def test_delete_of_a_missing_volume_succeeds_without_commands() -> None:
    fake = FakeLvm()
    LvmBackend(fake.runner, VG).delete_volume("gone")
    assert fake.changes() == []


def test_thin_delete_does_not_write_zeros_into_the_pool() -> None:
    fake = FakeLvm(lv("volume-t", 5, "Vwi-a-tz--", pool="pool"))
    LvmBackend(fake.runner, VG, thin_pool="pool").delete_volume("t")
    assert [c.split()[0] for c in fake.changes()] == ["lvremove"]


def test_delete_refuses_open_volumes_and_volumes_with_snapshots() -> None:
    fake = FakeLvm(lv("volume-o", 1, "-wi-ao----"))
    with pytest.raises(VolumeBusy, match="open"):
        LvmBackend(fake.runner, VG).delete_volume("o")
    fake = FakeLvm(lv("volume-p", 1, "owi-a-s---"), lv("snapshot-s", 1, "swi-a-s---", "volume-p"))
    with pytest.raises(VolumeBusy, match="snapshots: s"):
        LvmBackend(fake.runner, VG).delete_volume("p")
    assert fake.changes() == []


def test_extend_is_lvextend_and_shrink_is_refused() -> None:
    fake = FakeLvm(lv("volume-e", 2))
    backend = LvmBackend(fake.runner, VG)
    backend.extend_volume("e", 2)
    assert fake.changes() == []
    with pytest.raises(ShrinkRefused):
        backend.extend_volume("e", 1)
    backend.extend_volume("e", 5)
    assert fake.changes() == ["lvextend -L 5g nubes-vg/volume-e"]
    with pytest.raises(NotFound):
        backend.extend_volume("nope", 5)


def test_thick_snapshot_gets_a_cow_as_big_as_the_origin_and_is_wiped_on_delete() -> None:
    fake = FakeLvm(lv("volume-v", 4))
    backend = LvmBackend(fake.runner, VG)
    snap = backend.create_snapshot("s1", "v")
    assert fake.changes() == ["lvcreate -n snapshot-s1 -s -L 4g nubes-vg/volume-v"]
    assert (snap.id, snap.volume_id) == ("s1", "v")
    backend.delete_snapshot("s1")
    assert fake.changes()[1:] == [
        "dd if=/dev/zero of=/dev/mapper/nubes--vg-snapshot--s1-cow bs=1M count=4096"
        " oflag=direct status=none",
        "lvremove --config activation { retry_deactivation = 1 } -f nubes-vg/snapshot-s1",
    ]


def test_thin_snapshot_and_clone_are_thin_snapshots_that_activate() -> None:
    fake = FakeLvm(lv("pool", 50, "twi-aotz--", data="1.0"), lv("volume-v", 4, "Vwi-a-tz--"))
    backend = LvmBackend(fake.runner, VG, thin_pool="pool")
    backend.create_snapshot("s1", "v")
    backend.clone_volume("c1", "v", size_gib=6)
    assert fake.changes() == [
        "lvcreate -n snapshot-s1 -s --setactivationskip n nubes-vg/volume-v",
        "lvcreate -n volume-c1 -s --setactivationskip n nubes-vg/volume-v",
        "lvextend -L 6g nubes-vg/volume-c1",
    ]


def test_thick_volume_from_snapshot_is_a_new_lv_filled_by_dd() -> None:
    fake = FakeLvm(lv("volume-v", 2, "owi-a-s---"), lv("snapshot-s", 2, "swi-a-s---", "volume-v"))
    LvmBackend(fake.runner, VG).create_volume_from_snapshot("n", "s")
    assert fake.changes() == [
        "lvcreate -n volume-n -L 2g --yes nubes-vg",
        "dd if=/dev/nubes-vg/snapshot-s of=/dev/nubes-vg/volume-n bs=1M count=2048"
        " iflag=direct oflag=direct status=none",
    ]


def test_pool_stats_and_listing_come_from_lvs_and_vgs() -> None:
    fake = FakeLvm(
        lv("volume-a", 2),
        lv("volume-b", 3, "owi-a-s---"),
        lv("snapshot-x", 3, "swi-a-s---", "volume-b"),
        lv("root", 20),  # not ours: not listed, not provisioned
        vg_gib=100,
        free_gib=72,
    )
    backend = LvmBackend(fake.runner, VG, backend_name="lvm-1")
    stats = backend.pool_stats()
    assert (stats.backend_name, stats.pool_name) == ("lvm-1", VG)
    assert (stats.total_gib, stats.free_gib, stats.provisioned_gib) == (100, 72, 8)
    assert stats.total_volumes == 2
    assert stats.capabilities["thick_provisioning_support"] is True
    assert [v.id for v in backend.list_volumes()] == ["a", "b"]
    assert [(s.id, s.volume_id) for s in backend.list_snapshots()] == [("x", "b")]


def test_thin_pool_stats_use_the_pool_fill() -> None:
    fake = FakeLvm(lv("pool", 40, "twi-aotz--", data="25.00"), lv("volume-a", 100, "Vwi-a-tz--"))
    stats = LvmBackend(fake.runner, VG, thin_pool="pool").pool_stats()
    assert (stats.total_gib, stats.free_gib, stats.provisioned_gib) == (40, 30, 100)
    assert stats.capabilities["thin_provisioning_support"] is True


def test_no_space_is_reported_before_lvcreate_runs() -> None:
    fake = FakeLvm(vg_gib=10, free_gib=2)
    with pytest.raises(NoSpace, match=r"needs 5\.00 GiB"):
        LvmBackend(fake.runner, VG).create_volume("big", 5)
    assert fake.changes() == []


def test_missing_device_mapper_becomes_backend_unavailable() -> None:
    stderr = "  striped: Required device-mapper target(s) not detected in your kernel.\n"

    def fail(argv: list[str]) -> Result:
        return Result(tuple(argv), 3, "", stderr)

    runner = RecordingRunner(answers={LVS: lvs_json(), VGS: vgs_json(10, 10), "lvcreate": fail})
    with pytest.raises(BackendUnavailable, match="not detected"):
        LvmBackend(runner, VG).create_volume("x", 1)


def test_detect_lvm_reports_dmsetup_in_its_own_words() -> None:
    def no_dm(argv: list[str]) -> Result:
        return Result(tuple(argv), 1, "", "/dev/mapper/control: open failed: No such device\n")

    support = detect_lvm(RecordingRunner(answers={"dmsetup targets": no_dm}))
    assert not support.usable
    assert "/dev/mapper/control: open failed" in support.reason
    ok = detect_lvm(RecordingRunner(answers={"dmsetup targets": "striped v1.6.0\nlinear v1.4.0\n"}))
    assert ok.usable


def test_names_and_parsing() -> None:
    assert mapper_name("my-vg", "snapshot-a-b") == "my--vg-snapshot--a--b"
    assert parse_lvs(json.dumps({"report": [{"lv": []}]})) == []
