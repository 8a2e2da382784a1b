"""Leaf process: answers ``/search`` from its on-disk index with preads.

Run as ``python -m searchsvc.leaf --index DIR [--host H] [--port P]``; prints
the bound port on stdout once listening.
"""

from __future__ import annotations

import argparse
import heapq
from pathlib import Path
from typing import Any, ClassVar

from searchsvc.index import Index
from searchsvc.journal import Journal, Role, Span
from searchsvc.server import JsonHandler, Server, serve, set_process_name

TOP_K = 10


def top_hits(scores: dict[int, float], k: int = TOP_K) -> list[list[float]]:
    best = heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [[doc, score] for doc, score in best]


class LeafHandler(JsonHandler):
    role: ClassVar[Role] = "leaf"
    index: ClassVar[Index]

    def search(self, span: Span, q: str) -> tuple[int, Any]:
        scores: dict[int, float] = {}
        for term in q.split():
            postings, preads = self.index.lookup(term)
            span.preads += preads
            self.journal.count_preads(preads)
            for doc, score in postings:
                scores[doc] = scores.get(doc, 0.0) + score
        return 200, {
            "leaf": self.index.leaf_id,
            "query_id": span.query_id,
            "hits": top_hits(scores),
        }


def main(argv: list[str] | None = None) -> int:
    # Before any thread exists, so every handler thread inherits the name.
    set_process_name("qt-leaf")
    parser = argparse.ArgumentParser(prog="searchsvc.leaf")
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    index = Index.open(args.index)
    handler = type("BoundLeafHandler", (LeafHandler,), {"index": index})
    try:
        return serve(Server((args.host, args.port), handler, Journal()))
    finally:
        index.close()


if __name__ == "__main__":
    raise SystemExit(main())
