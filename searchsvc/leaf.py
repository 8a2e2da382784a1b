"""Leaf process: answers ``/search`` from its on-disk index with preads.

Run as ``python -m searchsvc.leaf --index DIR [--host H] [--port P]
[--fault-rate F --faults stale-index,deadline --deadline-ms MS --fault-seed S]``;
prints the bound port on stdout once listening.

With a fault rate (the "new deployment"), each query may be answered from the
stale ``.idx.next`` twins (journaled ``"fault": "stale-index"``) or delayed by
1.5 x the root's deadline (``"fault": "slow"``), see :mod:`searchsvc.faults`.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from searchsvc.faults import FaultConfig, FaultDice, add_fault_args
from searchsvc.index import BLOCK_SIZE, Index, build_twins, twin_path
from searchsvc.journal import Journal, Role, Span
from searchsvc.server import JsonHandler, Server, serve, set_process_name

TOP_K = 10
REFRESH_INTERVAL_S = 0.05
SLOW_FACTOR = 1.5


def top_hits(scores: dict[int, float], k: int = TOP_K) -> list[list[float]]:
    best = heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [[doc, score] for doc, score in best]


class TwinRefresher:
    """Keeps rewriting the ``.idx.next`` twins, one block per pwrite every ~50 ms.

    It always writes the content the twin already has, so readers never see a
    torn or changed file; the point is the steady background write traffic.
    """

    def __init__(
        self, directory: Path, contents: list[bytes], interval_s: float = REFRESH_INTERVAL_S
    ) -> None:
        self._contents = contents
        self._interval_s = interval_s
        self._fds: list[int] = []
        try:
            for shard in range(len(contents)):
                self._fds.append(os.open(twin_path(directory, shard), os.O_WRONLY))
        except BaseException:
            self._close_fds()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twin-refresher", daemon=True)

    def start(self) -> TwinRefresher:
        self._thread.start()
        return self

    def _run(self) -> None:
        blocks = itertools.cycle(
            (fd, content, off)
            for fd, content in zip(self._fds, self._contents, strict=True)
            for off in range(0, len(content), BLOCK_SIZE)
        )
        # Event.wait is the refresh period here, not synchronisation.
        while not self._stop.wait(self._interval_s):
            fd, content, off = next(blocks)
            os.pwrite(fd, content[off : off + BLOCK_SIZE], off)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


class LeafHandler(JsonHandler):
    role: ClassVar[Role] = "leaf"
    index: ClassVar[Index]
    # The .idx.next twins; None unless the stale-index fault is enabled.
    twin: ClassVar[Index | None] = None
    dice: ClassVar[FaultDice]

    def search(self, span: Span, q: str) -> tuple[int, Any]:
        fault = self.dice.draw()
        index = self.index
        if fault == "stale-index" and self.twin is not None:
            index = self.twin
            span.fault = "stale-index"
        scores: dict[int, float] = {}
        for term in q.split():
            postings, preads = index.lookup(term)
            span.preads += preads
            self.journal.count_preads(preads)
            for doc, score in postings:
                scores[doc] = scores.get(doc, 0.0) + score
        if fault == "deadline":
            span.fault = "slow"
            # This sleep is the simulated fault: answer after the root gave up.
            time.sleep(self.dice.config.deadline_s * SLOW_FACTOR)
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
    add_fault_args(parser)
    args = parser.parse_args(argv)
    config = FaultConfig.from_args(args)

    index = Index.open(args.index)
    twin: Index | None = None
    refresher: TwinRefresher | None = None
    try:
        if config.enabled("stale-index"):
            contents = build_twins(args.index)
            twin = Index.open(args.index, twin=True)
            refresher = TwinRefresher(args.index, contents).start()
        attrs = {"index": index, "twin": twin, "dice": FaultDice(config, index.leaf_id)}
        handler = type("BoundLeafHandler", (LeafHandler,), attrs)
        return serve(Server((args.host, args.port), handler, Journal()))
    finally:
        if refresher is not None:
            refresher.stop()
        if twin is not None:
            twin.close()
        index.close()


if __name__ == "__main__":
    raise SystemExit(main())
