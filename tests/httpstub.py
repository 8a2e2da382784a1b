"""A real HTTP server in a thread whose answers a test chooses: the targets a replay
talks to when the point is how it copes (errors, non-JSON, slowness)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Answer = Callable[[str, dict[str, str], bytes], tuple[int, bytes]]


def json_answer(obj: Any) -> Answer:
    def answer(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        return 200, json.dumps(obj).encode()

    return answer


class Stub:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.cv = threading.Condition()

    def wait_requests(self, n: int, timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: len(self.requests) >= n, timeout)


@contextmanager
def http_stub(answer: Answer) -> Iterator[tuple[str, Stub]]:
    stub = Stub(answer)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            headers = {k: v for k, v in self.headers.items()}
            with stub.cv:
                stub.requests.append((self.command, self.path, headers, body))
                stub.cv.notify_all()
            status, payload = stub.answer(self.path, headers, body)
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stub
    finally:
        server.shutdown()
        server.server_close()


def send(url: str, method: str, path: str, headers: dict[str, str], body: bytes | None) -> int:
    """One request on its own connection; its status."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
