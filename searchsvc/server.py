"""HTTP plumbing shared by the root and leaf processes."""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import threading
import time
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


MAX_BODY = 1 << 20
MAX_SETTLE_S = 20.0


class JsonHandler(BaseHTTPRequestHandler):
    """Routes ``GET /search?q=`` and ``POST /search`` with body ``{"q": ...}`` (both
    journaled), ``GET /_journal[?settle_ms=N]`` and ``GET /_health``."""

    protocol_version = "HTTP/1.1"
    # Buffer the status line, headers and body so the reply is a single send().
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    role: ClassVar[Role]
    # Add "server_time_ns" (wall clock, differs on every call) to /search answers.
    stamp_server_time: ClassVar[bool] = False

    @property
    def journal(self) -> Journal:
        return cast(Server, self.server).journal

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/search":
            self.answer_search(parse_qs(url.query).get("q", [""])[0])
        elif url.path == "/_journal":
            settle_ms = parse_qs(url.query).get("settle_ms", ["0"])[0]
            try:
                settle_s = min(max(0.0, float(settle_ms) / 1000.0), MAX_SETTLE_S)
            except ValueError:
                self.send_json(400, {"error": f"bad settle_ms {settle_ms!r}"})
                return
            self.send_json(200, self.journal.snapshot(settle_s))
        elif url.path == "/_health":
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, {"error": f"no route {url.path}"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else -1
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            # The body cannot be skipped reliably, so this connection is done.
            self.close_connection = True
            status = 411 if length_text is None else 400
            self.send_json(status, {"error": f"bad Content-Length {length_text!r}"})
            return
        raw = self.rfile.read(length)
        if url.path != "/search":
            self.send_json(404, {"error": f"no POST route {url.path}"})
            return
        try:
            payload = json.loads(raw)
            q = payload.get("q", "") if isinstance(payload, dict) else None
        except ValueError:
            q = None
        if not isinstance(q, str):
            self.send_json(400, {"error": 'expected a JSON body {"q": "..."}'})
            return
        self.answer_search(q)

    def answer_search(self, q: str) -> None:
        span = self.journal.start(self.headers.get("X-Query-Id"), self.role)
        try:
            try:
                status, body = self.search(span, q)
            except Exception as exc:
                status, body = 500, {"error": repr(exc)}
            if self.stamp_server_time and isinstance(body, dict):
                body["server_time_ns"] = time.time_ns()
            self.send_json(status, body)
        finally:
            self.journal.finish(span)

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


def connect_host(bind_host: str) -> str:
    """The address a local client connects to for a server bound to ``bind_host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind_host, bind_host)


def serve(server: Server, extra: str = "") -> int:
    """Announce the bound port (then ``extra``, if any, on the same line) on
    stdout and serve until SIGTERM/SIGINT."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever(), which runs in this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Handlers first: the parent may signal us as soon as it reads the port.
    print(f"{server.server_address[1]} {extra}".rstrip(), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
