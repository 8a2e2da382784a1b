"""Per-process ground-truth journal of which thread served which query id."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, TypedDict

Role = Literal["root", "leaf", "fanout"]


class Record(TypedDict):
    query_id: str | None
    role: Role
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    preads: int


class Snapshot(TypedDict):
    pid: int
    records: list[Record]
    total_preads: int


@dataclass
class Span:
    """An open record; ``preads`` is bumped by the owning thread only."""

    query_id: str | None
    role: Role
    # monotonic_ns is CLOCK_MONOTONIC, the same clock as bpf_ktime_get_ns().
    start_ns: int = field(default_factory=time.monotonic_ns)
    tid: int = field(default_factory=threading.get_native_id)
    preads: int = 0


class Journal:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._total_preads = 0
        self.pid = os.getpid()

    def finish(self, span: Span, end_ns: int | None = None) -> Record:
        record = Record(
            query_id=span.query_id,
            role=span.role,
            pid=self.pid,
            tid=span.tid,
            start_ns=span.start_ns,
            end_ns=time.monotonic_ns() if end_ns is None else end_ns,
            preads=span.preads,
        )
        with self._lock:
            self._records.append(record)
        return record

    def count_preads(self, n: int) -> None:
        """Add to the process-wide pread total (journaled or not)."""
        with self._lock:
            self._total_preads += n

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                pid=self.pid,
                records=list(self._records),
                total_preads=self._total_preads,
            )
