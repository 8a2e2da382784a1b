"""A trivial, fast HTTP target for the replay throughput benchmark.

``python bench/replay_target.py [--host H] --port 0`` prints the bound port on
one line, then answers every GET/POST (any path, any body) with the fixed JSON
``{"ok": true, "n": 3}`` over HTTP/1.1 keep-alive, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import FrameType
from typing import Any

BODY = b'{"ok": true, "n": 3}'
_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
)
# The whole reply prebuilt, so each one is a single send() with no formatting.
KEEP_ALIVE = _HEAD + b"\r\n" + BODY
CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _answer(self) -> None:
        length = self.headers.get("Content-Length")
        if length:
            try:
                self.rfile.read(int(length))  # drain the body to keep the connection usable
            except ValueError:
                self.close_connection = True
        elif self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # chunked bodies are not parsed: do not reuse
        self.wfile.write(CLOSE if self.close_connection else KEEP_ALIVE)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # listen backlog: many clients connect at once

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) we do not need.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port")
    args = ap.parse_args(argv)

    if ":" in args.host:
        Server.address_family = socket.AF_INET6
    server = Server((args.host, args.port), Handler)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever(), which runs in this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
