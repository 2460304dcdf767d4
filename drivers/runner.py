"""The one way drivers run commands: argument lists, never shell strings.

Drivers receive a `Runner` so that unit tests can record and answer commands
while integration tests run them for real.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from nubes.drivers.problem import Failure

log = structlog.get_logger()


SECRET_FLAGS = frozenset({"--password", "--chap-password"})


def redact(argv: Sequence[str]) -> list[str]:
    """argv with the values of secret-bearing flags masked, for logs and errors."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        # iscsiadm names the setting, then gives its value: -n ...password -v VALUE
        named_secret = arg == "-v" and i > 0 and out[i - 1].endswith(".password")
        if arg in SECRET_FLAGS or named_secret:
            out[i + 1] = "***"
    return out


class CommandError(Failure):
    reason = "CommandFailed"

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.argv = redact(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"{argv[0]} exited {returncode}: {stderr.strip() or stdout.strip()}")


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float | None = 60,
        netns: str | None = None,
    ) -> Result: ...


def in_netns(argv: Sequence[str], netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


class SubprocessRunner:
    """Runs commands for real."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float | None = 60,
        netns: str | None = None,
    ) -> Result:
        full = in_netns(argv, netns)
        started = time.monotonic()
        proc = subprocess.run(  # noqa: S603 - argument list, no shell
            full,
            input=input.encode() if isinstance(input, str) else input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        stdout = proc.stdout.decode(errors="replace")
        stderr = proc.stderr.decode(errors="replace")
        log.debug(
            "ran",
            argv=redact(full),
            rc=proc.returncode,
            ms=round((time.monotonic() - started) * 1000),
        )
        if check and proc.returncode != 0:
            raise CommandError(full, proc.returncode, stdout, stderr)
        return Result(tuple(full), proc.returncode, stdout, stderr)


Answer = Callable[[list[str]], Result | str | None]


@dataclass
class RecordingRunner:
    """For unit tests: records every command and answers from a script.

    `answers` maps an argv prefix (joined by spaces) to stdout text or to a
    function of the argv; commands without an answer succeed with no output.
    """

    answers: dict[str, str | Answer] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float | None = 60,
        netns: str | None = None,
    ) -> Result:
        full = in_netns(argv, netns)
        self.calls.append(full)
        joined = " ".join(full)
        for prefix in sorted(self.answers, key=len, reverse=True):
            if joined.startswith(prefix):
                answer = self.answers[prefix]
                out = answer(full) if callable(answer) else answer
                if isinstance(out, Result):
                    if check and out.returncode != 0:
                        raise CommandError(full, out.returncode, out.stdout, out.stderr)
                    return out
                return Result(tuple(full), 0, out or "", "")
        return Result(tuple(full), 0, "", "")

    def commands(self, program: str | None = None) -> list[str]:
        return [" ".join(c) for c in self.calls if program is None or c[0] == program]
