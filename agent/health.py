"""The agent's liveness and readiness over plain HTTP, for the kubelet's probes.

/healthz: the main loop turned recently (a stuck drain or a wedged lock fails it, and the
kubelet restarts the pod). /readyz: that, and the session watch has reached the collector."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A session start compiles its BPF programs on the main loop (seconds on a busy node).
STALE_SECONDS = 60.0


class HealthServer:
    def __init__(
        self, port: int, heartbeat: Callable[[], float], connected: Callable[[], bool]
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, text = outer.answer(self.path)
                body = text.encode() + b"\n"
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a probe every few seconds is not news

        self._heartbeat = heartbeat
        self._connected = connected
        self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="qtrace-health", daemon=True
        )

    def answer(self, path: str) -> tuple[int, str]:
        age = time.monotonic() - self._heartbeat()
        if path not in ("/healthz", "/readyz"):
            return 404, "try /healthz or /readyz"
        if age > STALE_SECONDS:
            return 503, f"main loop stuck for {age:.0f}s"
        if path == "/readyz" and not self._connected():
            return 503, "not connected to the collector yet"
        return 200, "ok"

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
