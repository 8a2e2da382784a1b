"""HTTP plumbing shared by the root and leaf processes."""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import FrameType
from typing import Any, ClassVar, cast
from urllib.parse import parse_qs, urlsplit

from searchsvc.journal import Journal, Role, Span

PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Set the calling thread's comm; threads created later inherit it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_NAME, {name!r}) failed")


class Server(ThreadingHTTPServer):
    # The root opens a fresh connection per fan-out; the default backlog of 5
    # drops SYNs under concurrency and costs a 1 s retransmit.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        journal: Journal,
    ) -> None:
        self.journal = journal
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can
        # stall startup; the name is only used for CGI variables.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class JsonHandler(BaseHTTPRequestHandler):
    """GET router: ``/search`` (journaled), ``/_journal``, ``/_health``."""

    protocol_version = "HTTP/1.1"
    # Buffer the status line, headers and body so the reply is a single send().
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    role: ClassVar[Role]

    @property
    def journal(self) -> Journal:
        return cast(Server, self.server).journal

    def do_GET(self) -> None:
        span = Span(self.headers.get("X-Query-Id"), self.role)
        url = urlsplit(self.path)
        if url.path == "/search":
            try:
                q = parse_qs(url.query).get("q", [""])[0]
                try:
                    status, body = self.search(span, q)
                except Exception as exc:
                    status, body = 500, {"error": repr(exc)}
                self.send_json(status, body)
            finally:
                self.journal.finish(span)
        elif url.path == "/_journal":
            self.send_json(200, self.journal.snapshot())
        elif url.path == "/_health":
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, {"error": f"no route {url.path}"})

    def search(self, span: Span, q: str) -> tuple[int, Any]:
        raise NotImplementedError

    def send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(server: Server) -> int:
    """Announce the bound port on stdout and serve until SIGTERM/SIGINT."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever(), which runs in this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Handlers first: the parent may signal us as soon as it reads the port.
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
