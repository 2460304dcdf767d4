"""The Nubes test guest (hack/guest-image) for tests that boot real domains:
building it, and following its `nubes-guest: ...` lines on the console log."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
MARKER = re.compile(r"nubes-guest: (.*)$")


def build_guest_image() -> Path:
    """The cached qcow2 (built on first use; see hack/guest-image/build.sh)."""
    out = subprocess.run(
        [str(ROOT / "hack" / "guest-image" / "build.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise AssertionError(f"guest image build failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class GuestConsole:
    """Reads the serial log libvirt appends to; `mark()` remembers where the
    log ends so later waits only see what the guest printed afterwards."""

    path: Path
    offset: int = 0
    _seen: list[str] = field(default_factory=list)

    def text(self) -> str:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace").replace("\r", "")

    def mark(self) -> None:
        self.offset = len(self.text())

    def markers(self) -> list[str]:
        """Every `nubes-guest:` message since the mark, in order."""
        out = []
        for line in self.text()[self.offset :].splitlines():
            m = MARKER.search(line)
            if m:
                out.append(m.group(1).strip())
        return out

    def wait_for(self, pattern: str, *, timeout: float = 90) -> re.Match[str]:
        """The first marker since the mark matching `pattern` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for message in self.markers():
                m = regex.fullmatch(message)
                if m:
                    return m
            if time.monotonic() > deadline:
                tail = self.text()[self.offset :][-3000:]
                raise AssertionError(
                    f"guest never printed {pattern!r} within {timeout}s; console since mark:\n"
                    f"{tail}"
                )
            time.sleep(0.2)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for m in self.markers() if regex.fullmatch(m))
