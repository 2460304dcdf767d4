"""iscsiadm sequences for attach/detach and the node's initiator detection."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nubes.drivers.iscsi.connection import ChapCredentials, IscsiConnection
from nubes.drivers.iscsi.initiator import (
    AttachError,
    AttachMode,
    BlockDeviceAttachment,
    IscsiadmInitiator,
    NetworkDiskAttachment,
    QemuInitiator,
    detect_initiator,
    initiator_for,
)
from nubes.drivers.runner import RecordingRunner, Result

IQN = "iqn.2010-10.io.nubes:volume-abc"
CONN = IscsiConnection("192.0.2.10", 3260, IQN, 1, ChapCredentials("nubes-abc", "pw0123456789"))
NODE = f"iscsiadm -m node -T {IQN} -p 192.0.2.10:3260"


def rc(code: int, stderr: str = "") -> Callable[[list[str]], Result]:
    return lambda argv: Result(tuple(argv), code, "", stderr)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    by_path, sys_dir = tmp_path / "by-path", tmp_path / "sys"
    by_path.mkdir()
    (sys_dir / "module" / "iscsi_tcp").mkdir(parents=True)
    return by_path, sys_dir


def test_attach_is_new_chap_update_login_rescan_then_the_by_path_device(
    dirs: tuple[Path, Path],
) -> None:
    by_path, sys_dir = dirs
    device = by_path / f"ip-192.0.2.10:3260-iscsi-{IQN}-lun-1"

    def login(argv: list[str]) -> str:
        device.touch()  # udev would make the link once the session is up
        return ""

    runner = RecordingRunner(answers={f"{NODE} --login": login})
    initiator = IscsiadmInitiator(runner, by_path_dir=str(by_path), sys_dir=str(sys_dir))
    attached = initiator.connect(CONN)
    assert runner.commands() == [
        f"{NODE} --interface default --op new",
        f"{NODE} --op update -n node.session.auth.authmethod -v CHAP",
        f"{NODE} --op update -n node.session.auth.username -v nubes-abc",
        f"{NODE} --op update -n node.session.auth.password -v pw0123456789",
        f"{NODE} --login",
        f"{NODE} --rescan",
    ]
    assert attached == BlockDeviceAttachment(CONN, str(device))


def test_attach_loads_the_module_when_needed_and_accepts_an_existing_session(
    dirs: tuple[Path, Path],
) -> None:
    by_path, sys_dir = dirs
    os.rmdir(sys_dir / "module" / "iscsi_tcp")
    (by_path / f"ip-192.0.2.10:3260-iscsi-{IQN}-lun-1").touch()
    runner = RecordingRunner(answers={f"{NODE} --login": rc(15, "session exists")})
    IscsiadmInitiator(runner, by_path_dir=str(by_path), sys_dir=str(sys_dir)).connect(CONN)
    assert runner.commands()[0] == "modprobe iscsi_tcp"


def test_a_device_that_never_appears_is_an_error(dirs: tuple[Path, Path]) -> None:
    by_path, sys_dir = dirs
    initiator = IscsiadmInitiator(
        RecordingRunner(),
        by_path_dir=str(by_path),
        sys_dir=str(sys_dir),
        device_timeout=0.05,
        sleep=lambda s: None,
    )
    with pytest.raises(AttachError, match="did not appear"):
        initiator.connect(CONN)


def test_failed_login_names_the_target_but_not_the_password(dirs: tuple[Path, Path]) -> None:
    by_path, sys_dir = dirs
    runner = RecordingRunner(answers={f"{NODE} --op update": rc(8, "auth failed")})
    with pytest.raises(AttachError) as err:
        IscsiadmInitiator(runner, by_path_dir=str(by_path), sys_dir=str(sys_dir)).connect(CONN)
    assert IQN in str(err.value)
    assert "pw0123456789" not in str(err.value)


def test_detach_flushes_deletes_the_scsi_device_logs_out_and_deletes_the_node(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    by_path, sys_dir = dirs
    real = tmp_path / "sdz"
    real.touch()
    (by_path / f"ip-192.0.2.10:3260-iscsi-{IQN}-lun-1").symlink_to(real)
    delete = sys_dir / "block" / "sdz" / "device" / "delete"
    delete.parent.mkdir(parents=True)
    delete.touch()
    runner = RecordingRunner()
    IscsiadmInitiator(runner, by_path_dir=str(by_path), sys_dir=str(sys_dir)).disconnect(CONN)
    assert runner.commands() == [
        f"blockdev --flushbufs {real}",
        f"{NODE} --logout",
        f"{NODE} --op delete",
    ]
    assert delete.read_text() == "1\n"


def test_detach_of_something_already_gone_succeeds(dirs: tuple[Path, Path]) -> None:
    by_path, sys_dir = dirs
    runner = RecordingRunner(answers={f"{NODE} --logout": rc(21), f"{NODE} --op delete": rc(21)})
    IscsiadmInitiator(runner, by_path_dir=str(by_path), sys_dir=str(sys_dir)).disconnect(CONN)
    assert [c.split(" -p ")[1] for c in runner.commands()] == [
        "192.0.2.10:3260 --logout",
        "192.0.2.10:3260 --op delete",
    ]


def test_detection_picks_kernel_only_with_iscsiadm_and_a_loadable_module(tmp_path: Path) -> None:
    name_file = tmp_path / "initiatorname.iscsi"
    name_file.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    sys_module = tmp_path / "module"
    sys_module.mkdir()
    args = {"sys_module_dir": str(sys_module), "initiator_name_file": str(name_file)}

    loadable = detect_initiator(RecordingRunner(), **args)
    assert loadable.mode is AttachMode.KERNEL
    assert loadable.initiator_name == "iqn.1993-08.org.debian:01:abc"

    missing = RecordingRunner(
        answers={
            "modprobe --dry-run iscsi_tcp": rc(1, "modprobe: FATAL: Module iscsi_tcp not found")
        }
    )
    support = detect_initiator(missing, **args)
    assert support.mode is AttachMode.QEMU
    assert "Module iscsi_tcp not found" in support.reason

    no_tool = RecordingRunner(answers={"iscsiadm --version": rc(127, "not found")})
    assert detect_initiator(no_tool, **args).mode is AttachMode.QEMU

    (sys_module / "iscsi_tcp").mkdir()
    loaded = detect_initiator(missing, **args)
    assert (loaded.mode, loaded.module_loaded) == (AttachMode.KERNEL, True)


def test_qemu_mode_hands_the_connection_to_the_domain() -> None:
    initiator = initiator_for(
        RecordingRunner(),
        detect_initiator(RecordingRunner(answers={"iscsiadm --version": rc(1)})),
    )
    assert isinstance(initiator, QemuInitiator)
    assert initiator.connect(CONN) == NetworkDiskAttachment(CONN)
    initiator.disconnect(CONN)
