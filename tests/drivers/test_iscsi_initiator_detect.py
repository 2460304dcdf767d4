"""Initiator detection on this very node, checked against the kernel itself."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from nubes.drivers.iscsi.initiator import AttachMode, QemuInitiator, detect_initiator, initiator_for
from nubes.drivers.runner import SubprocessRunner


def kernel_initiator_possible() -> tuple[bool, str]:
    """Asked independently of the driver: module loaded, or modprobe can load it."""
    if shutil.which("iscsiadm") is None:
        return False, "no iscsiadm"
    if os.path.exists("/sys/module/iscsi_tcp"):
        return True, "loaded"
    probe = subprocess.run(
        ["modprobe", "--dry-run", "iscsi_tcp"], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0, probe.stderr.strip()


def test_detection_matches_what_the_kernel_can_do() -> None:
    possible, why = kernel_initiator_possible()
    support = detect_initiator(SubprocessRunner())
    assert (support.mode is AttachMode.KERNEL) == possible, (support, why)
    if not possible:
        # The reason carries the node's own words, for the Hypervisor status.
        assert "iscsi_tcp" in support.reason or "iscsiadm" in support.reason
        assert isinstance(initiator_for(SubprocessRunner(), support), QemuInitiator)


def test_the_node_initiator_name_is_read_when_configured() -> None:
    support = detect_initiator(SubprocessRunner())
    path = Path("/etc/iscsi/initiatorname.iscsi")
    if path.exists() and "InitiatorName=" in path.read_text():
        assert support.initiator_name is not None
        assert support.initiator_name.startswith("iqn.")
