"""The command runner keeps secrets out of logs and error messages."""

from __future__ import annotations

import sys

import pytest
import structlog

from nubes.drivers.runner import CommandError, SubprocessRunner, redact


def test_redact_masks_flag_values_and_named_iscsiadm_settings() -> None:
    argv = ["tgtadm", "--op", "new", "--mode", "account", "--user", "u", "--password", "s3cret"]
    assert redact(argv)[-2:] == ["--password", "***"]
    iscsiadm = ["iscsiadm", "-o", "update", "-n", "node.session.auth.password", "-v", "pw"]
    assert redact(iscsiadm)[-1] == "***"
    username = ["iscsiadm", "-o", "update", "-n", "node.session.auth.username", "-v", "user"]
    assert redact(username) == username


def test_subprocess_runner_never_logs_or_raises_the_password() -> None:
    argv = [sys.executable, "-c", "import sys; sys.exit(3)", "--password", "s3cret"]
    with structlog.testing.capture_logs() as logs, pytest.raises(CommandError) as err:
        SubprocessRunner()(argv)
    assert err.value.returncode == 3
    assert "s3cret" not in repr(logs) and "s3cret" not in " ".join(err.value.argv)
    assert logs and logs[0]["argv"][-1] == "***"
