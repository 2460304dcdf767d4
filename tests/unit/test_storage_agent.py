"""The storage agent's and controller's pure helpers: settings, names, how
driver errors are reported, pool reports, merge-patch values."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from nubes.agent.chap_secrets import chap_secret_name
from nubes.agent.config import AgentConfig
from nubes.agent.storage import (
    NodeStorage,
    classify,
    pool_report,
)
from nubes.api.storage import VolumeExport
from nubes.controllers.storage import merged
from nubes.drivers.backup.posix import BackupInUse, CorruptBackup
from nubes.drivers.images.cache import ChecksumMismatch, ImageFetchError
from nubes.drivers.problem import Problem, fail
from nubes.drivers.runner import Result
from nubes.drivers.volumes.base import NoSpace, PoolStats, VolumeBusy
from nubes.drivers.volumes.node import BackendSpec, parse_portal
from nubes.runtime.operator import Operator


def test_backend_specs() -> None:
    assert BackendSpec.parse("fast:file:/srv/vols") == BackendSpec("fast", "file", "/srv/vols")
    assert BackendSpec.parse("lvm:lvm:vg0/thin") == BackendSpec("lvm", "lvm", "vg0/thin")
    for bad in ("fast", "fast:nfs:/x", ":file:/x", "fast:file:"):
        with pytest.raises(ValueError, match="NAME:file:DIR"):
            BackendSpec.parse(bad)


def test_portals() -> None:
    assert parse_portal("127.0.0.1") == ("127.0.0.1", 3260)
    assert parse_portal("10.0.0.5:3261") == ("10.0.0.5", 3261)
    assert parse_portal("[fd00::1]:3260") == ("fd00::1", 3260)
    assert parse_portal("[fd00::1]") == ("fd00::1", 3260)


def test_chap_secret_names_are_per_volume_uid() -> None:
    # One namespace holds the Secrets of every project's volumes: names by uid.
    uid = "0f8e2c1a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
    assert chap_secret_name(uid) == f"iscsi-chap-{uid}"
    assert chap_secret_name(uid) != chap_secret_name(uid.replace("0f", "1f"))


def test_driver_errors_become_reasons_people_can_act_on() -> None:
    corrupt = classify(CorruptBackup("b1", 12, "/s/chunk-00000012.zlib", "bad"), "restoring")
    assert (corrupt.reason, corrupt.retryable) == ("BackupCorrupt", False)
    assert corrupt.message.startswith("restoring: backup b1 chunk 12")
    assert classify(NoSpace("volume v", 5, 1, "p"), "x").reason == "InsufficientSpace"
    assert classify(VolumeBusy("v", "open"), "x").retryable
    assert classify(BackupInUse("b", ["c"]), "x").retryable
    assert classify(ImageFetchError("down"), "x").reason == "ImageFetchFailed"
    mismatch = classify(ChecksumMismatch("file:///i", "a" * 64, "b" * 64), "x")
    assert (mismatch.reason, mismatch.retryable) == ("ChecksumMismatch", False)
    assert classify(RuntimeError("boom"), "x").reason == "NodeError"
    explicit = classify(fail("PoolNotServed", "no pool", retryable=False), "volume v")
    assert explicit == Problem("PoolNotServed", "volume v: no pool", retryable=False)


def test_pool_report_rounds_conservatively_and_stringifies_capabilities() -> None:
    stats = PoolStats(
        backend_name="file",
        pool_name="default",
        total_gib=99.9,
        free_gib=10.7,
        provisioned_gib=20.1,
        total_volumes=3,
        capabilities={"thin_provisioning_support": True, "max_over_subscription_ratio": 20.0},
    )
    report = pool_report(stats)
    assert (report["totalGib"], report["freeGib"], report["provisionedGib"]) == (99, 10, 21)
    assert report["maxOverSubscriptionRatio"] == 20.0
    assert report["capabilities"]["thin_provisioning_support"] == "True"


def test_merge_patch_values_null_what_went_away() -> None:
    current = VolumeExport(portal="p:3260", iqn="iqn", chap_secret="s", initiator_node="n1", lun=1)
    wanted = VolumeExport(portal="p:3260", iqn="iqn", lun=1, chap_secret="s", initiator_node=None)
    body = {"portal": "p:3260", "iqn": "iqn", "lun": 1, "chapSecret": "s"}
    cleared = merged(current, wanted)
    assert cleared is not None and cleared.patch() == {**body, "initiatorNode": None}
    fresh = merged(None, wanted)
    assert fresh is not None and fresh.patch() == body
    assert merged(current, None) is None


class FakeTgt:
    """Answers tgtadm like a tgtd holding one target per listed volume id."""

    def __init__(self, volume_ids: list[str]) -> None:
        self.targets = {i + 1: v for i, v in enumerate(volume_ids)}
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **_: object) -> Result:
        self.calls.append(list(argv))
        out = ""
        if "show" in argv:
            out = "".join(
                f"Target {tid}: iqn.2010-10.io.nubes:volume-{v}\n"
                for tid, v in self.targets.items()
            )
        elif "delete" in argv and "target" in argv:
            self.targets.pop(int(argv[argv.index("--tid") + 1]))
        return Result(tuple(argv), 0, out, "")


async def test_periodic_clean_up_removes_only_unwanted_exports_of_this_nodes_volumes(
    tmp_path: Path,
) -> None:
    tgt = FakeTgt(["mine", "someone-elses"])
    storage = NodeStorage(AgentConfig(node="n1", state_dir=str(tmp_path)), runner=tgt)
    storage.register(Operator("unit", kube=None))  # type: ignore[arg-type]
    storage.disks.backends[0].create_volume("mine", 1)
    await storage.prune()
    assert list(tgt.targets.values()) == ["someone-elses"]
    storage.disks.backends[0].delete_volume("mine")
