"""Per-process ground-truth journal of which thread served which query id."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, NotRequired, TypedDict

Role = Literal["root", "leaf", "fanout"]


class Record(TypedDict):
    query_id: str | None
    role: Role
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    preads: int
    # Wall time this span spent in those preads (0 outside leaves).
    pread_ns: int
    # None, or the fault this record's work suffered: leaf "stale-index" (answered
    # from the .next twins), "slow" (answer delayed past the root's deadline),
    # "cpu-starved" (the leaf's CPU was taken by its SCHED_FIFO hog process),
    # "lock-held" (the leaf waited for a file lock its locker process held),
    # "net-delay" (the leaf answered promptly, but its proxy process held the
    # answer past the root's deadline) or "disk-io" (the leaf's index was dropped
    # from the page cache and read back while a neighbour flooded the disk);
    # root "dropped-leaf" (answered without some leaf); fanout "late" (the root
    # had already answered without this leaf's reply).
    fault: str | None
    # Root records only: indexes of the leaves the root answered without.
    dropped_leaves: NotRequired[list[int]]
    # "cpu-starved" leaf records only: pid of the hog process that took the CPU.
    hog_pid: NotRequired[int]
    # "lock-held" leaf records only: pid of the locker process that held the lock.
    locker_pid: NotRequired[int]
    # "net-delay" leaf records only: pid of the proxy process that held the answer.
    proxy_pid: NotRequired[int]
    # "disk-io" leaf records only: pid of the neighbour that evicted the index and
    # read the disk, how many index pages it dropped from the page cache, and the
    # CLOCK_MONOTONIC window of its O_DIRECT reads (they start before the leaf's
    # preads; in-flight reads may complete a little after the end).
    diskio_pid: NotRequired[int]
    evicted_pages: NotRequired[int]
    diskio_start_ns: NotRequired[int]
    diskio_end_ns: NotRequired[int]


class Snapshot(TypedDict):
    pid: int
    records: list[Record]
    total_preads: int
    # Spans started but not yet finished when the snapshot was taken.
    in_flight: int


@dataclass
class Span:
    """An open record; its fields are set by the owning thread only."""

    query_id: str | None
    role: Role
    # monotonic_ns is CLOCK_MONOTONIC, the same clock as bpf_ktime_get_ns().
    start_ns: int = field(default_factory=time.monotonic_ns)
    tid: int = field(default_factory=threading.get_native_id)
    preads: int = 0
    pread_ns: int = 0
    fault: str | None = None
    dropped_leaves: list[int] = field(default_factory=list)
    hog_pid: int | None = None
    locker_pid: int | None = None
    proxy_pid: int | None = None
    diskio_pid: int | None = None
    evicted_pages: int = 0
    diskio_start_ns: int = 0
    diskio_end_ns: int = 0
    # Set by Journal.start: counted in the journal's in-flight spans.
    tracked: bool = False


class Journal:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._records: list[Record] = []
        self._total_preads = 0
        self._in_flight = 0
        self.pid = os.getpid()

    def start(self, query_id: str | None, role: Role) -> Span:
        """Open a span on the calling thread; it is in flight until ``finish``."""
        span = Span(query_id, role, tracked=True)
        with self._lock:
            self._in_flight += 1
        return span

    def finish(self, span: Span, end_ns: int | None = None) -> Record:
        record = Record(
            query_id=span.query_id,
            role=span.role,
            pid=self.pid,
            tid=span.tid,
            start_ns=span.start_ns,
            end_ns=time.monotonic_ns() if end_ns is None else end_ns,
            preads=span.preads,
            pread_ns=span.pread_ns,
            fault=span.fault,
        )
        if span.role == "root":
            record["dropped_leaves"] = list(span.dropped_leaves)
        if span.hog_pid is not None:
            record["hog_pid"] = span.hog_pid
        if span.locker_pid is not None:
            record["locker_pid"] = span.locker_pid
        if span.proxy_pid is not None:
            record["proxy_pid"] = span.proxy_pid
        if span.diskio_pid is not None:
            record["diskio_pid"] = span.diskio_pid
            record["evicted_pages"] = span.evicted_pages
            record["diskio_start_ns"] = span.diskio_start_ns
            record["diskio_end_ns"] = span.diskio_end_ns
        with self._lock:
            self._records.append(record)
            if span.tracked:
                span.tracked = False
                self._in_flight -= 1
                if not self._in_flight:
                    self._settled.notify_all()
        return record

    def count_preads(self, n: int) -> None:
        """Add to the process-wide pread total (journaled or not)."""
        with self._lock:
            self._total_preads += n

    def snapshot(self, settle_s: float = 0.0) -> Snapshot:
        """The records so far; first wait up to ``settle_s`` for no span in flight.

        A reply is sent before its span is finished, and a root may answer before
        a late fan-out (and the slow leaf behind it) is done, so a client that
        wants every record of the queries it already got answers settles first.
        """
        with self._lock:
            if settle_s > 0:
                self._settled.wait_for(lambda: not self._in_flight, settle_s)
            return Snapshot(
                pid=self.pid,
                records=list(self._records),
                total_preads=self._total_preads,
                in_flight=self._in_flight,
            )
