"""Leaf process: answers ``/search`` from its on-disk index with preads.

Run as ``python -m searchsvc.leaf --index DIR [--host H] [--port P]
[--fault-rate F --faults stale-index,deadline,cpu-starved --deadline-ms MS
--fault-seed S] [--cpu N]``; prints the bound port on stdout once listening.

With a fault rate (the "new deployment"), each query may be answered from the
stale ``.idx.next`` twins (journaled ``"fault": "stale-index"``), delayed by
1.5 x the root's deadline (``"fault": "slow"``) or starved of CPU by a busy
neighbour process (``"fault": "cpu-starved"`` and ``"hog_pid"``), see
:mod:`searchsvc.faults`.

With ``cpu-starved`` enabled, the leaf pins itself (every thread, before it
starts any) to one CPU, ``--cpu`` or by default ``(leaf id + 1)`` modulo the
CPUs it may use (leaf0 -> CPU 1, leaf1 -> CPU 0 on two CPUs), and starts a
:mod:`searchsvc.hog` child process pinned to the same CPU.  On the fault, the
handler thread tells the hog to spin for :data:`STARVE_MS` at SCHED_FIFO, waits
only until the hog says it is spinning, and goes on with its normal work: the
thread is woken but cannot run until the spin is over, so the answer (the same
as without the fault) is that much late.  The hog is stopped with the leaf.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from searchsvc.faults import FaultConfig, FaultDice, add_fault_args
from searchsvc.index import BLOCK_SIZE, Index, build_twins, twin_path
from searchsvc.journal import Journal, Role, Span
from searchsvc.server import JsonHandler, Server, serve, set_process_name

TOP_K = 10
REFRESH_INTERVAL_S = 0.05
SLOW_FACTOR = 1.5
# How long the hog takes the leaf's CPU on a cpu-starved fault.
STARVE_MS = 80
HOG_START_TIMEOUT_S = 10.0
HOG_STOP_TIMEOUT_S = 5.0

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


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


def default_cpu(leaf_id: int) -> int:
    """The CPU leaf ``leaf_id`` shares with its hog: ``leaf_id + 1`` modulo the
    CPUs this process may use (leaf0 -> CPU 1, leaf1 -> CPU 0 on two CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[(leaf_id + 1) % len(cpus)]


def pin_process(cpu: int) -> None:
    """Pin every thread of this process to ``cpu``; threads it creates later
    inherit that.  (``sched_setaffinity(0)`` alone only pins the calling thread.)"""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})


class Hog:
    """A :mod:`searchsvc.hog` child process pinned to ``cpu``, driven over its
    stdin and stdout; one spin at a time."""

    def __init__(self, cpu: int, start_timeout_s: float = HOG_START_TIMEOUT_S) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "searchsvc.hog", "--cpu", str(cpu)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._lock = threading.Lock()
        try:
            assert self._proc.stdout is not None
            # The selector only bounds a hung start; the line is the readiness signal.
            with selectors.DefaultSelector() as sel:
                sel.register(self._proc.stdout, selectors.EVENT_READ)
                if not sel.select(start_timeout_s):
                    raise TimeoutError(f"hog on CPU {cpu} did not report ready")
            self._expect(b"ready")
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _expect(self, word: bytes) -> None:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != word:
            raise RuntimeError(f"hog {self.pid}: expected {word!r}, got {line!r}")

    @contextlib.contextmanager
    def spinning(self, ms: int) -> Iterator[None]:
        """Run the body while the hog spins ``ms`` on its CPU, then consume its
        ``done``.  The body starts once the hog is spinning, so a thread on that
        CPU runs its first instruction only after the spin."""
        with self._lock:
            assert self._proc.stdin is not None
            self._proc.stdin.write(f"spin {ms}\n".encode())
            self._proc.stdin.flush()
            self._expect(b"spinning")
            try:
                yield
            finally:
                self._expect(b"done")

    def stop(self, timeout_s: float = HOG_STOP_TIMEOUT_S) -> int:
        """EOF the hog (after any spin in progress) and reap it; its exit status."""
        locked = self._lock.acquire(timeout=timeout_s)
        try:
            if self._proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            return self._proc.returncode
        finally:
            if locked:
                self._lock.release()


class LeafHandler(JsonHandler):
    role: ClassVar[Role] = "leaf"
    index: ClassVar[Index]
    # The .idx.next twins; None unless the stale-index fault is enabled.
    twin: ClassVar[Index | None] = None
    dice: ClassVar[FaultDice]
    # The CPU hog; None unless the cpu-starved fault is enabled.
    hog: ClassVar[Hog | None] = None

    def search(self, span: Span, q: str) -> tuple[int, Any]:
        fault = self.dice.draw()
        index = self.index
        if fault == "stale-index" and self.twin is not None:
            index = self.twin
            span.fault = "stale-index"
        starving: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if fault == "cpu-starved" and self.hog is not None:
            span.fault = "cpu-starved"
            span.hog_pid = self.hog.pid
            starving = self.hog.spinning(STARVE_MS)
        with starving:
            scores: dict[int, float] = {}
            for term in q.split():
                postings, preads = index.lookup(term)
                span.preads += preads
                self.journal.count_preads(preads)
                for doc, score in postings:
                    scores[doc] = scores.get(doc, 0.0) + score
            hits = top_hits(scores)
        if fault == "deadline":
            span.fault = "slow"
            # This sleep is the simulated fault: answer after the root gave up.
            time.sleep(self.dice.config.deadline_s * SLOW_FACTOR)
        return 200, {
            "leaf": self.index.leaf_id,
            "query_id": span.query_id,
            "hits": hits,
        }


def main(argv: list[str] | None = None) -> int:
    # Before any thread exists, so every handler thread inherits the name.
    set_process_name("qt-leaf")
    parser = argparse.ArgumentParser(prog="searchsvc.leaf")
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    add_fault_args(parser)
    parser.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="with cpu-starved: the CPU shared with the hog (default: leaf id + 1, modulo)",
    )
    args = parser.parse_args(argv)
    config = FaultConfig.from_args(args)

    index = Index.open(args.index)
    twin: Index | None = None
    refresher: TwinRefresher | None = None
    hog: Hog | None = None
    try:
        if config.enabled("cpu-starved"):
            cpu = default_cpu(index.leaf_id) if args.cpu is None else args.cpu
            # Before any thread starts, so every thread inherits the pinning.
            pin_process(cpu)
            hog = Hog(cpu)
        if config.enabled("stale-index"):
            contents = build_twins(args.index)
            twin = Index.open(args.index, twin=True)
            refresher = TwinRefresher(args.index, contents).start()
        attrs = {
            "index": index,
            "twin": twin,
            "dice": FaultDice(config, index.leaf_id),
            "hog": hog,
        }
        handler = type("BoundLeafHandler", (LeafHandler,), attrs)
        return serve(Server((args.host, args.port), handler, Journal()))
    finally:
        if hog is not None:
            hog.stop()
        if refresher is not None:
            refresher.stop()
        if twin is not None:
            twin.close()
        index.close()


if __name__ == "__main__":
    raise SystemExit(main())
