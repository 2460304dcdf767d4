"""A tiny TCP service for reachability checks across routers: it answers
every connection with its own name and the address the connection came
from, so a check shows both who answered and what NAT made of the source."""

from __future__ import annotations

import subprocess
import sys

from tests.nodes import sh

SERVICE_PORT = 7000

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
while True:
    c, (peer, _) = s.accept()
    c.sendall(f"{sys.argv[2]} {peer}\\n".encode()); c.close()
"""
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(200).decode().strip())
except OSError as e:
    print("ERROR", e)
"""


def serve(netns: str, name: str) -> subprocess.Popen[bytes]:
    """Answers each connection with `NAME PEER-ADDRESS`."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, str(SERVICE_PORT), name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def ask(netns: str, address: str, timeout: float = 3) -> tuple[str, str] | None:
    """(server name, the address the server saw us come from), or None."""
    out = sh(
        sys.executable, "-c", CLIENT, address, str(SERVICE_PORT), str(timeout), netns=netns
    ).stdout.strip()
    if out.startswith("ERROR") or " " not in out:
        return None
    name, peer = out.split(" ", 1)
    return name, peer
