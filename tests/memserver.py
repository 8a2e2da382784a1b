"""A traced HTTP server whose requests do memory work on demand, run as its own process:

- ``/fault?path=P``: maps P, drops it from the page cache, then reads every page through
  the mapping, so each page is a major fault that waits for the disk;
- ``/mmap?n=N``: maps and unmaps an anonymous page N times (each takes mmap_lock for
  writing, which a neighbour reading our /proc/PID/smaps keeps busy);
- ``/sleep?ms=M``: sleeps outside any traced syscall.

A large populated anonymous mapping makes every smaps read long. Prints its port."""

from __future__ import annotations

import mmap
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

BALLAST = 256 << 20


def fault_in(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            m.madvise(mmap.MADV_RANDOM)  # one page per fault: no readahead hides them
            return sum(m[i] for i in range(0, size, mmap.PAGESIZE))
    finally:
        os.close(fd)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/fault":
            out = fault_in(q["path"])
        elif url.path == "/mmap":
            for _ in range(int(q["n"])):
                mmap.mmap(-1, mmap.PAGESIZE).close()
            out = 0
        elif url.path == "/sleep":
            time.sleep(int(q["ms"]) / 1000)
            out = 0
        body = str(out).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    ballast = mmap.mmap(-1, BALLAST)
    for i in range(0, BALLAST, mmap.PAGESIZE):
        ballast[i] = 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    finally:
        ballast.close()


if __name__ == "__main__":
    main()
