"""A child forked from a running controller or agent (pyroute2 forks helpers
into network namespaces) must not stop its parent when it gets SIGTERM:
asyncio's signal wakeup fd is shared across fork unless the child drops it,
which `nubes` arranges (runtime/cli.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

PROGRAM = """
import asyncio, os, signal, sys
from nubes.runtime import cli

async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if sys.argv[1] == "drop":
        os.register_at_fork(after_in_child=cli._drop_wakeup_fd)
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(0)
    os.waitpid(pid, 0)
    await asyncio.sleep(0.3)
    print("stopped" if stop.is_set() else "running")

asyncio.run(main())
"""


def parent_after_child_sigterm(mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    return out.stdout.strip()


def test_child_sigterm_reaches_the_parent_without_the_fix() -> None:
    # The hazard itself, so that the next test can fail.
    assert parent_after_child_sigterm("keep") == "stopped"


def test_child_drops_the_wakeup_fd() -> None:
    assert parent_after_child_sigterm("drop") == "running"
