"""Real tgtd exports, checked from the initiator side with libiscsi and QEMU.

Only loopback: the portal is 127.0.0.1. Volume ids are random per test, so
concurrent runs on the shared tgtd never meet; each test removes its export
and checks that tgtd holds nothing of it afterwards.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.iscsi.connection import ChapCredentials, IscsiConnection
from nubes.drivers.iscsi.tgt import LUN, TgtExporter, iqn_for
from nubes.drivers.runner import SubprocessRunner
from nubes.drivers.volumes.base import VolumeBusy
from nubes.drivers.volumes.file import FileBackend
from tests.drivers.storage_helpers import tgt_accounts, tgt_show, tgtd_running

SIZE = 64 * 1024 * 1024

pytestmark = pytest.mark.skipif(not tgtd_running(), reason="tgtd is not running")


@pytest.fixture
def exporter() -> TgtExporter:
    return TgtExporter(SubprocessRunner(), portal_host="127.0.0.1")


@pytest.fixture
def volume(tmp_path: Path, exporter: TgtExporter) -> Iterator[tuple[str, str]]:
    volume_id = f"t-{uuid.uuid4()}"
    path = tmp_path / "lun.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    yield volume_id, str(path)
    exporter.remove_export(volume_id)
    assert iqn_for(volume_id) not in tgt_show(), "target leaked"
    assert not [a for a in tgt_accounts() if volume_id in a], "CHAP account leaked"


def libiscsi(
    tool: str, conn: IscsiConnection, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    url = conn.url(with_secret=True)
    if password is not None:
        assert conn.chap is not None
        url = url.replace(f"%{conn.chap.password}@", f"%{password}@")
    return subprocess.run([tool, url], capture_output=True, text=True, timeout=30, check=False)


def test_chap_export_is_reachable_with_the_password_and_only_with_it(
    exporter: TgtExporter, volume: tuple[str, str]
) -> None:
    volume_id, path = volume
    chap = ChapCredentials.generate(volume_id)
    conn = exporter.ensure_export(volume_id, path, chap=chap, initiators=["127.0.0.1"])
    assert conn.iqn == f"iqn.2010-10.io.nubes:volume-{volume_id}"
    assert (conn.portal, conn.lun) == ("127.0.0.1:3260", LUN)

    inq = libiscsi("iscsi-inq", conn)
    assert inq.returncode == 0, inq.stderr
    assert "VIRTUAL-DISK" in inq.stdout
    cap = libiscsi("iscsi-readcapacity16", conn)
    assert cap.returncode == 0, cap.stderr
    assert f"Total size:{SIZE}" in cap.stdout

    wrong = libiscsi("iscsi-inq", conn, password="x" + chap.password[1:])
    assert wrong.returncode != 0
    assert "Authentication failure" in wrong.stderr + wrong.stdout
    anonymous = subprocess.run(
        ["iscsi-inq", conn.url()], capture_output=True, text=True, timeout=30, check=False
    )
    assert anonymous.returncode != 0


def test_qemu_reads_what_the_volume_file_holds(
    exporter: TgtExporter, volume: tuple[str, str]
) -> None:
    volume_id, path = volume
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"\x6b" * 65536, 1024 * 1024)
    os.fsync(fd)
    os.close(fd)
    chap = ChapCredentials.generate(volume_id)
    conn = exporter.ensure_export(volume_id, path, chap=chap, initiators=["127.0.0.1"])

    info = subprocess.run(
        ["qemu-img", "info", "--output", "json", "--image-opts", conn.qemu_image_opts()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert info.returncode == 0, info.stderr
    assert f'"virtual-size": {SIZE}' in info.stdout
    read = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x6b 1M 64k", conn.url(with_secret=True)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert read.returncode == 0, read.stderr
    assert "Pattern verification failed" not in read.stdout + read.stderr


def test_the_acl_refuses_initiators_not_listed(
    exporter: TgtExporter, volume: tuple[str, str]
) -> None:
    volume_id, path = volume
    chap = ChapCredentials.generate(volume_id)
    conn = exporter.ensure_export(volume_id, path, chap=chap, initiators=["127.0.0.2"])
    assert libiscsi("iscsi-inq", conn).returncode != 0
    exporter.ensure_export(volume_id, path, chap=chap, initiators=["127.0.0.1"])
    assert libiscsi("iscsi-inq", conn).returncode == 0
    export = exporter.get_export(volume_id)
    assert export is not None
    assert export.target.initiators == ("127.0.0.1",)


def test_ensure_is_idempotent_and_a_restarted_agent_re_adopts(
    exporter: TgtExporter, volume: tuple[str, str]
) -> None:
    volume_id, path = volume
    chap = ChapCredentials.generate(volume_id)
    exporter.ensure_export(volume_id, path, chap=chap, initiators=["127.0.0.1"])
    first = exporter.get_export(volume_id)
    exporter.ensure_export(volume_id, path, chap=chap, initiators=["127.0.0.1"])
    assert exporter.get_export(volume_id) == first
    assert first is not None
    assert first.backing_path == path
    assert first.target.accounts == (chap.username,)

    restarted = TgtExporter(SubprocessRunner(), portal_host="127.0.0.1")
    assert volume_id in [e.volume_id for e in restarted.list_exports()]
    # New password after the restart (the caller lost the old one): it takes effect.
    new_chap = ChapCredentials.generate(volume_id)
    conn = restarted.ensure_export(volume_id, path, chap=new_chap, initiators=["127.0.0.1"])
    assert restarted.get_export(volume_id) == first  # same target, same tid
    assert libiscsi("iscsi-inq", conn).returncode == 0
    assert libiscsi("iscsi-inq", conn, password=chap.password).returncode != 0


def test_remove_export_deletes_target_and_account_and_is_idempotent(
    exporter: TgtExporter, volume: tuple[str, str]
) -> None:
    volume_id, path = volume
    chap = ChapCredentials.generate(volume_id)
    exporter.ensure_export(volume_id, path, chap=chap, initiators=["127.0.0.1"])
    assert iqn_for(volume_id) in tgt_show()
    assert chap.username in tgt_accounts()
    exporter.remove_export(volume_id)
    exporter.remove_export(volume_id)
    assert iqn_for(volume_id) not in tgt_show()
    assert chap.username not in tgt_accounts()
    assert exporter.get_export(volume_id) is None


def test_two_exports_get_distinct_target_ids(
    exporter: TgtExporter, volume: tuple[str, str], tmp_path: Path
) -> None:
    volume_id, path = volume
    other_id = f"t-{uuid.uuid4()}"
    other_path = tmp_path / "other.raw"
    with open(other_path, "wb") as f:
        f.truncate(SIZE)
    try:
        exporter.ensure_export(
            volume_id, path, chap=ChapCredentials.generate(volume_id), initiators=["ALL"]
        )
        exporter.ensure_export(
            other_id,
            str(other_path),
            chap=ChapCredentials.generate(other_id),
            initiators=["127.0.0.1"],
        )
        a, b = exporter.get_export(volume_id), exporter.get_export(other_id)
        assert a is not None and b is not None
        assert a.target.tid != b.target.tid
        assert exporter.remove_exports_of([other_id, "never-exported"]) == [other_id]
        assert exporter.get_export(other_id) is None
        assert exporter.get_export(volume_id) is not None
    finally:
        exporter.remove_export(other_id)


def test_an_exported_file_volume_cannot_be_deleted_until_unexported(
    exporter: TgtExporter, tmp_path: Path
) -> None:
    pool = FileBackend(SubprocessRunner(), tmp_path / "pool")
    volume_id = f"t-{uuid.uuid4()}"
    vol = pool.create_volume(volume_id, 1)
    try:
        exporter.ensure_export(
            volume_id, vol.path, chap=ChapCredentials.generate(volume_id), initiators=["127.0.0.1"]
        )
        with pytest.raises(VolumeBusy, match="open by another process"):
            pool.delete_volume(volume_id)
        with pytest.raises(VolumeBusy):
            pool.extend_volume(volume_id, 2)
    finally:
        exporter.remove_export(volume_id)
    pool.extend_volume(volume_id, 2)
    pool.delete_volume(volume_id)
    assert pool.list_volumes() == []
    assert iqn_for(volume_id) not in tgt_show()
