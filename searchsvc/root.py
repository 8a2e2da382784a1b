"""Root process: fans each ``/search`` out to every leaf in parallel.

Run as ``python -m searchsvc.root --leaf HOST:PORT --leaf HOST:PORT
[--host H] [--port P]``; prints the bound port on stdout once listening.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import threading
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlencode

from searchsvc.journal import Journal, Role, Span
from searchsvc.server import JsonHandler, Server, serve, set_process_name

TOP_K = 10
LEAF_TIMEOUT_S = 30.0


@dataclass(eq=False)  # identity equality: `in` checks below
class LeafReply:
    status: int = 0
    body: Any = None
    error: str | None = None


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class RootHandler(JsonHandler):
    role: ClassVar[Role] = "root"
    leaves: ClassVar[list[tuple[str, int]]]

    def fanout(
        self, leaf: tuple[str, int], path: str, query_id: str | None, out: LeafReply
    ) -> None:
        span = Span(query_id, "fanout")
        try:
            conn = http.client.HTTPConnection(*leaf, timeout=LEAF_TIMEOUT_S)
            try:
                headers = {} if query_id is None else {"X-Query-Id": query_id}
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                out.body = json.loads(resp.read())
                out.status = resp.status
            finally:
                conn.close()
        except Exception as exc:
            out.error = repr(exc)
        finally:
            self.journal.finish(span)

    def search(self, span: Span, q: str) -> tuple[int, Any]:
        path = "/search?" + urlencode({"q": q})
        replies = [LeafReply() for _ in self.leaves]
        # A fresh thread per leaf, created by this request thread, so a tracer
        # following thread creation attributes the fan-out to this query.
        threads = [
            threading.Thread(target=self.fanout, args=(leaf, path, span.query_id, reply))
            for leaf, reply in zip(self.leaves, replies, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        good = [r for r in replies if r.status == 200 and r.error is None]
        hits = heapq.nsmallest(
            TOP_K, (hit for r in good for hit in r.body["hits"]), key=lambda h: (-h[1], h[0])
        )
        body: dict[str, Any] = {
            "query_id": span.query_id,
            "hits": hits,
            "leaves": len(good),
            # Top-10 may by chance come from one leaf; this proves both answered.
            "leaf_hits": [len(r.body["hits"]) if r in good else None for r in replies],
        }
        errors = [r.error or f"status {r.status}" for r in replies if r not in good]
        if errors:
            body["errors"] = errors
        return (200 if not errors else 502), body


def main(argv: list[str] | None = None) -> int:
    # Before any thread exists, so request and fan-out threads inherit the name.
    set_process_name("qt-root")
    parser = argparse.ArgumentParser(prog="searchsvc.root")
    parser.add_argument("--leaf", type=parse_hostport, action="append", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    handler = type("BoundRootHandler", (RootHandler,), {"leaves": args.leaf})
    return serve(Server((args.host, args.port), handler, Journal()))


if __name__ == "__main__":
    raise SystemExit(main())
