"""A hostile-or-honest image server for fetch tests, on a loopback address:
canned routes (data, redirects, errors), a source that trickles a byte per
`trickle_delay` seconds and never ends, and one that sends headers and then
nothing."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

Route = tuple[int, dict[str, str], bytes]


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}
    trickle_delay = 0.0

    def do_GET(self) -> None:
        if self.path.startswith("/trickle"):
            self._headers_only()
            try:
                for _ in range(100_000):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(self.trickle_delay)
            except OSError:
                pass  # the client gave up, as it should
            return
        if self.path == "/silent":
            self._headers_only()
            time.sleep(5)
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _headers_only(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


def serve(address: str) -> Iterator[str]:
    """Serve on `address` (a free port); yields the base URL."""
    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{address}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
