"""The flight recorder's user-space side: the per-CPU recent history and the per-request
summaries that the BPF programs keep when a session records instead of shipping.

Nothing here runs per event in steady state. Summaries are read in bulk once a second
(one map entry per finished request); the history is read through a shared mapping of the
BPF array only when a query's detail is asked for, in one copy, then filtered."""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import enum
import mmap
import time
from dataclasses import dataclass
from typing import Any

from agent import abi

_SLOT_WORDS = abi.HSLOT_SIZE // 8

# The history's size per node when a session does not say: ~520k events, about 10 s at
# 50k events/s, minutes for a service at a few thousand requests per second.
DEFAULT_HISTORY_BYTES = 64 << 20
MIN_HISTORY_BYTES = 1 << 20
MAX_HISTORY_BYTES = 4 << 30


class Detail(enum.StrEnum):
    """What leaves the kernel during a session."""

    full = "full"  # every event, as it happens
    recorder = "recorder"  # summaries per request; detail fetched from the recent history


@dataclass(frozen=True)
class Window:
    """What one read of the history found for a time window (CLOCK_MONOTONIC)."""

    records: list[bytes]  # raw slots (event + its payload), oldest first
    # The oldest moment every CPU's history still covers; a window starting earlier may
    # have lost events to newer ones.
    covered_from_ns: int
    complete: bool


@dataclass(frozen=True)
class Summary:
    """One finished request, as the kernel summed it (``abi.SUMCATS`` times, in ns)."""

    req_key: int
    tgid: int
    tid: int
    fd: int
    start_ns: int
    end_ns: int  # the end of its last response write; its start when it never answered
    events: int
    ns: dict[str, int]
    qid: bytes | None  # the query id the kernel found; None: user space has it


class Intervals:
    """Time ranges already fetched (disjoint, sorted): overlapping fetches send each event
    once."""

    def __init__(self) -> None:
        self._spans: list[tuple[int, int]] = []

    def holds(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._spans, (lo, 1 << 64)) - 1
        return i >= 0 and self._spans[i][0] <= lo and hi <= self._spans[i][1]

    def add(self, lo: int, hi: int) -> None:
        merged = []
        for a, b in self._spans:
            if b < lo or a > hi:
                merged.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        merged.append((lo, hi))
        self._spans = sorted(merged)

    def forget_before(self, t: int) -> None:
        self._spans = [(a, b) for a, b in self._spans if b >= t]


class History:
    """The BPF array ``history`` (``cpus`` rings of ``slots`` slots), mapped read-only."""

    def __init__(self, table: Any, heads: Any, slots: int, cpus: int) -> None:
        self.slots = slots
        self.cpus = cpus
        self._heads = heads
        self._map = mmap.mmap(
            table.get_fd(), slots * cpus * abi.HSLOT_SIZE, mmap.MAP_SHARED, mmap.PROT_READ
        )
        self.started_ns = time.monotonic_ns()

    def close(self) -> None:
        self._map.close()

    def heads(self) -> list[int]:
        return [int(v) for v in self._heads.getvalue(ctypes.c_int(0))][: self.cpus]

    def coverage(self) -> tuple[int, int]:
        """(covered_from_ns, slots written): since when every CPU's ring still holds all
        it recorded."""
        heads = self.heads()
        oldest = self.started_ns
        for cpu, head in enumerate(heads):
            if head > self.slots:  # wrapped: its oldest whole slot bounds the coverage
                seq = head - self.slots + 1
                off = (cpu * self.slots + seq % self.slots) * abi.HSLOT_SIZE
                ts = int.from_bytes(self._map[off : off + 8], "little")
                oldest = max(oldest, ts)
        return oldest, sum(heads)

    def window(self, from_ns: int, to_ns: int, sent: Intervals | None = None) -> Window:
        """Every recorded event overlapping [from_ns, to_ns], oldest first, but those
        wholly inside what was ``sent`` before."""
        h0 = self.heads()
        data = self._map[:]  # one copy; slots written meanwhile are told by the heads
        h1 = self.heads()
        words = memoryview(data).cast("Q")
        # Only a ring that went round has lost anything: before the session began there
        # was nothing to record.
        covered = 0
        records: list[tuple[int, bytes]] = []
        for cpu in range(self.cpus):
            # Whole and not overwritten during the copy: sequence numbers [lo, hi).
            hi, lo = h0[cpu], max(0, h1[cpu] - self.slots + 1)
            if lo >= hi:
                continue
            base = cpu * self.slots
            if h1[cpu] > self.slots:
                first = (lo % self.slots + base) * _SLOT_WORDS
                covered = max(covered, int(words[first]))
            enters = words[base * _SLOT_WORDS : (base + self.slots) * _SLOT_WORDS : _SLOT_WORDS]
            exits = words[base * _SLOT_WORDS + 1 : (base + self.slots) * _SLOT_WORDS : _SLOT_WORDS]
            ent, ext = enters.tolist(), exits.tolist()
            for seq in range(lo, hi):
                i = seq % self.slots
                if (
                    ext[i] >= from_ns
                    and ent[i] <= to_ns
                    and not (sent and sent.holds(ent[i], ext[i]))
                ):
                    off = (base + i) * abi.HSLOT_SIZE
                    records.append((ent[i], data[off : off + abi.HSLOT_SIZE]))
        records.sort(key=lambda r: r[0])
        return Window([r for _, r in records], covered, complete=covered <= from_ns)


def harvest(table: Any, idle_ns: int, now_ns: int | None = None) -> list[Summary]:
    """Take the summaries of requests with no event for ``idle_ns`` out of the kernel."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    done: list[Summary] = []
    keys = []
    try:
        items = list(table.items_lookup_batch())
    except Exception:
        items = list(table.items())
    cats = abi.SUMCATS
    for k, v in items:
        key = int(k if isinstance(k, int) else k.value)
        raw = bytes(v)
        f = abi.REQSUM.unpack_from(raw)
        start, end, last = f[0], f[1], f[2]
        if now - last < idle_ns:
            continue
        n = abi.SUMCAT_MAX
        at_end = f[3 + n : 3 + 2 * n]
        tgid, tid, fd, events, events_at_end, qid_len, qid = f[3 + 2 * n : 10 + 2 * n]
        ns = f[3 : 3 + n] if not end else at_end
        keys.append(key)
        done.append(
            Summary(
                req_key=key,
                tgid=tgid,
                tid=tid,
                fd=fd,
                start_ns=start,
                end_ns=end or last,
                events=events_at_end if end else events,
                ns={name: int(ns[i]) for name, i in cats.items()},
                qid=qid[:qid_len] if qid_len else None,
            )
        )
    for k in keys:
        with contextlib.suppress(KeyError):
            del table[table.Key(k)]
    return done
