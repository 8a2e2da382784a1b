"""Root process: fans each ``/search`` out to every leaf in parallel.

Run as ``python -m searchsvc.root --leaf HOST:PORT --leaf HOST:PORT
[--host H] [--port P] [--fault-rate F --faults ... --deadline-ms MS]``; prints
the bound port on stdout once listening.

The answer holds every hit of every leaf that answered (up to 10 each), so any
change in one leaf's answer shows.  With the deadline or net-delay fault
enabled, the root waits for each leaf at most ``--deadline-ms`` and answers
without the late ones (journaled as ``dropped_leaves``); without them, it waits
for every leaf.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlencode

from searchsvc.faults import FaultConfig, add_fault_args
from searchsvc.journal import Journal, Role, Span
from searchsvc.server import JsonHandler, Server, serve, set_process_name

LEAF_TIMEOUT_S = 30.0


@dataclass(eq=False)
class LeafReply:
    """One fan-out's outcome, handed over under ``lock``: the root uses it only if
    ``done`` was set before the root gave up on it (``abandoned``)."""

    status: int = 0
    body: Any = None
    error: str | None = None
    done: bool = False
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self) -> bool:
        """Called by the fan-out thread; False if the root already answered."""
        with self.lock:
            self.done = True
            return not self.abandoned

    def abandon(self) -> bool:
        """Called by the root at its deadline; True if the reply is not in yet."""
        with self.lock:
            if not self.done:
                self.abandoned = True
            return self.abandoned


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def merge_hits(hit_lists: list[list[list[float]]]) -> list[list[float]]:
    """Every hit of every list, by score descending, then doc id."""
    return sorted((hit for hits in hit_lists for hit in hits), key=lambda h: (-h[1], h[0]))


class RootHandler(JsonHandler):
    role: ClassVar[Role] = "root"
    stamp_server_time: ClassVar[bool] = True
    leaves: ClassVar[list[tuple[str, int]]]
    faults: ClassVar[FaultConfig] = FaultConfig()

    def fanout(
        self, leaf: tuple[str, int], path: str, query_id: str | None, out: LeafReply
    ) -> None:
        span = self.journal.start(query_id, "fanout")
        try:
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
                if not out.complete():
                    span.fault = "late"
        finally:
            self.journal.finish(span)

    def search(self, span: Span, q: str) -> tuple[int, Any]:
        path = "/search?" + urlencode({"q": q})
        replies = [LeafReply() for _ in self.leaves]
        # A fresh thread per leaf, created by this request thread, so a tracer
        # following thread creation attributes the fan-out to this query.
        # Daemon: a late fan-out must not hold up the process's exit.
        threads = [
            threading.Thread(
                target=self.fanout, args=(leaf, path, span.query_id, reply), daemon=True
            )
            for leaf, reply in zip(self.leaves, replies, strict=True)
        ]
        for t in threads:
            t.start()
        if self.faults.enabled("deadline") or self.faults.enabled("net-delay"):
            deadline = time.monotonic() + self.faults.deadline_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
        else:
            for t in threads:
                t.join()
        dropped = [i for i, r in enumerate(replies) if r.abandon()]
        for i, t in enumerate(threads):
            if i not in dropped:
                t.join()  # its reply is in; at most its journal record is left
        span.dropped_leaves = dropped
        if dropped:
            span.fault = "dropped-leaf"

        answered = [i for i in range(len(replies)) if i not in dropped]
        good = [i for i in answered if replies[i].status == 200 and replies[i].error is None]
        body: dict[str, Any] = {
            "query_id": span.query_id,
            "hits": merge_hits([replies[i].body["hits"] for i in good]),
            "leaves": len(good),
            "leaf_hits": [
                len(reply.body["hits"]) if i in good else None for i, reply in enumerate(replies)
            ],
        }
        errors = [
            replies[i].error or f"status {replies[i].status}" for i in answered if i not in good
        ]
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
    add_fault_args(parser)
    args = parser.parse_args(argv)

    attrs = {"leaves": args.leaf, "faults": FaultConfig.from_args(args)}
    handler = type("BoundRootHandler", (RootHandler,), attrs)
    return serve(Server((args.host, args.port), handler, Journal()))


if __name__ == "__main__":
    raise SystemExit(main())
