"""tgtadm output parsing and the exporter's command sequences."""

from __future__ import annotations

import pytest

from nubes.drivers.iscsi.connection import ChapCredentials
from nubes.drivers.iscsi.tgt import ExportError, TgtExporter, iqn_for, parse_targets
from nubes.drivers.runner import RecordingRunner, Result
from nubes.drivers.volumes.base import InvalidId

SHOW = "tgtadm --lld iscsi --op show --mode target"

# Captured from tgtd 1.0.85 with a QEMU initiator logged in.
REAL_SHOW = """\
Target 7: iqn.2010-10.io.nubes:volume-abc
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 5
            Initiator: iqn.2008-11.org.linux-kvm alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     03850000
            SCSI SN: beaf9010
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags:
        LUN: 1
            Type: disk
            SCSI ID: IET     03850001
            SCSI SN: beaf9011
            Size: 67 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: rdwr
            Backing store path: /pool/volumes/abc.raw
            Backing store flags:
    Account information:
        nubes-abc
        someone (outgoing)
    ACL information:
        127.0.0.1
        ALL
Target 9: iqn.2003-01.org.other:disk
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
    Account information:
    ACL information:
""".replace("flags:\n", "flags: \n")  # tgtadm prints a trailing space there

CHAP = ChapCredentials("nubes-abc", "s3cretPassw0rdXXXXXXXXXX")


def test_parse_reads_tids_luns_accounts_acls_and_sessions() -> None:
    mine, other = parse_targets(REAL_SHOW)
    assert (mine.tid, mine.iqn) == (7, "iqn.2010-10.io.nubes:volume-abc")
    assert mine.luns == {1: "/pool/volumes/abc.raw"}
    assert mine.accounts == ("nubes-abc",)
    assert mine.initiators == ("127.0.0.1", "ALL")
    assert mine.sessions == 1
    assert (other.tid, other.luns, other.accounts, other.initiators, other.sessions) == (
        9,
        {},
        (),
        (),
        0,
    )
    assert parse_targets("") == []


def test_iqn_is_derived_from_the_volume_id_and_must_be_iqn_safe() -> None:
    assert iqn_for("0f1e-22") == "iqn.2010-10.io.nubes:volume-0f1e-22"
    for bad in ("Upper", "under_score", "-lead", "", "abc\n"):
        with pytest.raises(InvalidId):
            iqn_for(bad)


def shows(*texts: str) -> RecordingRunner:
    """tgtd answering `show` with each text in turn (the last one repeats)."""
    queue = list(texts)

    def answer(argv: list[str]) -> str:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return RecordingRunner(answers={SHOW: answer})


def changes(runner: RecordingRunner) -> list[str]:
    return [c.removeprefix("tgtadm --lld iscsi ") for c in runner.commands() if c != SHOW]


def test_first_export_creates_target_lun_account_binding_and_acl() -> None:
    runner = shows("Target 3: iqn.x:other\n    LUN information:\n")
    conn = TgtExporter(runner, portal_host="192.0.2.10").ensure_export(
        "abc", "/pool/volumes/abc.raw", chap=CHAP, initiators=["192.0.2.20"]
    )
    assert changes(runner) == [
        "--op new --mode target --tid 4 -T iqn.2010-10.io.nubes:volume-abc",
        "--op new --mode logicalunit --tid 4 --lun 1 --backing-store /pool/volumes/abc.raw",
        "--op delete --mode account --user nubes-abc",
        f"--op new --mode account --user nubes-abc --password {CHAP.password}",
        "--op bind --mode account --tid 4 --user nubes-abc",
        "--op bind --mode target --tid 4 --initiator-address 192.0.2.20",
    ]
    assert conn.url() == "iscsi://192.0.2.10:3260/iqn.2010-10.io.nubes:volume-abc/1"
    assert conn.chap == CHAP


def test_an_export_in_place_needs_no_change_once_this_process_set_the_password() -> None:
    runner = shows(REAL_SHOW)
    exporter = TgtExporter(runner, portal_host="127.0.0.1")
    exporter.ensure_export(
        "abc", "/pool/volumes/abc.raw", chap=CHAP, initiators=["127.0.0.1", "ALL"]
    )
    first = changes(runner)
    # After a restart the password is unknown: the account is re-set, nothing else.
    assert first == [
        "--op delete --mode account --user nubes-abc",
        f"--op new --mode account --user nubes-abc --password {CHAP.password}",
        "--op bind --mode account --tid 7 --user nubes-abc",
    ]
    exporter.ensure_export(
        "abc", "/pool/volumes/abc.raw", chap=CHAP, initiators=["127.0.0.1", "ALL"]
    )
    assert changes(runner) == first


def test_acl_and_lun_converge_to_the_request() -> None:
    runner = shows(REAL_SHOW)
    exporter = TgtExporter(runner, portal_host="127.0.0.1")
    exporter.ensure_export("abc", "/elsewhere.raw", chap=CHAP, initiators=["127.0.0.1", "10.9.9.9"])
    assert [c for c in changes(runner) if "account" not in c] == [
        "--op delete --mode logicalunit --tid 7 --lun 1",
        "--op new --mode logicalunit --tid 7 --lun 1 --backing-store /elsewhere.raw",
        "--op bind --mode target --tid 7 --initiator-address 10.9.9.9",
        "--op unbind --mode target --tid 7 --initiator-address ALL",
    ]


def test_a_taken_target_id_is_retried_with_the_next_one() -> None:
    taken = {"n": 0}

    def new_target(argv: list[str]) -> Result:
        taken["n"] += 1
        if taken["n"] == 1:
            return Result(tuple(argv), 22, "", "tgtadm: this target already exists\n")
        return Result(tuple(argv), 0, "", "")

    runner = RecordingRunner(
        answers={
            SHOW: lambda a: "Target 1: iqn.x:a\n" if taken["n"] == 0 else "Target 2: iqn.x:b\n",
            "tgtadm --lld iscsi --op new --mode target": new_target,
        }
    )
    TgtExporter(runner, portal_host="127.0.0.1").ensure_export(
        "abc", "/p", chap=CHAP, initiators=["ALL"]
    )
    assert [c for c in changes(runner) if "--mode target --tid" in c and "new" in c] == [
        "--op new --mode target --tid 2 -T iqn.2010-10.io.nubes:volume-abc",
        "--op new --mode target --tid 3 -T iqn.2010-10.io.nubes:volume-abc",
    ]


def test_remove_deletes_the_target_by_force_then_its_accounts() -> None:
    runner = shows(REAL_SHOW)
    TgtExporter(runner, portal_host="127.0.0.1").remove_export("abc")
    assert changes(runner) == [
        "--op delete --mode target --force --tid 7",
        "--op delete --mode account --user nubes-abc",
    ]
    runner = shows("")
    TgtExporter(runner, portal_host="127.0.0.1").remove_export("abc")
    assert changes(runner) == []


def test_list_exports_only_ours_and_remove_only_the_named() -> None:
    runner = shows(REAL_SHOW)
    exporter = TgtExporter(runner, portal_host="127.0.0.1")
    assert [e.volume_id for e in exporter.list_exports()] == ["abc"]
    assert exporter.remove_exports_of(["other"]) == []
    assert exporter.remove_exports_of(["abc", "other"]) == ["abc"]


def test_errors_never_show_the_password_and_exports_need_an_initiator() -> None:
    def refuse(argv: list[str]) -> Result:
        return Result(tuple(argv), 22, "", "tgtadm: out of memory\n")

    runner = RecordingRunner(
        answers={SHOW: "", "tgtadm --lld iscsi --op new --mode account": refuse}
    )
    exporter = TgtExporter(runner, portal_host="127.0.0.1")
    with pytest.raises(ExportError) as err:
        exporter.ensure_export("abc", "/p", chap=CHAP, initiators=["ALL"])
    assert CHAP.password not in str(err.value)
    assert "out of memory" in str(err.value)
    with pytest.raises(ExportError, match="at least one initiator"):
        exporter.ensure_export("abc", "/p", chap=CHAP, initiators=[])
