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
# An event that ends this long after a window is not looked for in it (a sleep or a poll
# that began inside the window and lasted longer): reading on would mean every newer slot.
LONGEST_NS = 2_000_000_000
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

    def copy(self) -> Intervals:
        other = Intervals()
        other._spans = list(self._spans)
        return other

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
        # A fetch may still be reading it (the session ended meanwhile): the mapping
        # then goes with its last reader.
        with contextlib.suppress(BufferError):
            self._map.close()

    def heads(self) -> list[int]:
        return [int(v) for v in self._heads.getvalue(ctypes.c_int(0))][: self.cpus]

    def _lost_before(self, heads: list[int]) -> int:
        """Since when every CPU's ring still holds all it recorded, given its heads: the
        oldest whole slot of each ring that went round; 0 when none has."""
        oldest = 0
        for cpu, head in enumerate(heads):
            if head > self.slots:
                seq = head - self.slots + 1
                off = (cpu * self.slots + seq % self.slots) * abi.HSLOT_SIZE
                oldest = max(oldest, int.from_bytes(self._map[off : off + 8], "little"))
        return oldest

    def coverage(self) -> tuple[int, int]:
        """(covered_from_ns, slots written): since when the history holds everything
        (at most since it began)."""
        heads = self.heads()
        return max(self.started_ns, self._lost_before(heads)), sum(heads)

    def window(self, from_ns: int, to_ns: int, sent: Intervals | None = None) -> Window:
        """Every recorded event overlapping [from_ns, to_ns], oldest first, but those
        wholly inside what was ``sent`` before.

        Times come straight from the shared mapping (no copy of the whole history: it may
        be gigabytes), then only the chosen slots are copied; whatever was overwritten
        meanwhile is told by the heads read afterwards. Each CPU's slots are in the order
        their events ended, so the window's first slot is found by bisection."""
        h0 = self.heads()
        words = memoryview(self._map).cast("Q")
        picked: list[tuple[int, int, int, int]] = []  # (start, cpu, seq, offset)
        try:
            for cpu in range(self.cpus):
                hi, lo = h0[cpu], max(0, h0[cpu] - self.slots + 1)
                if lo >= hi:
                    continue
                base = cpu * self.slots
                w0, w1 = base * _SLOT_WORDS, (base + self.slots) * _SLOT_WORDS
                ext = words[w0 + 1 : w1 : _SLOT_WORDS].tolist()
                r = lo % self.slots
                ends = (ext[r:] + ext[:r])[: hi - lo]  # in sequence order
                first = bisect.bisect_left(ends, from_ns)
                for k in range(first, len(ends)):
                    if ends[k] > to_ns + LONGEST_NS:
                        break
                    i = (lo + k) % self.slots
                    start = int(words[(base + i) * _SLOT_WORDS])
                    if start > to_ns or (sent and sent.holds(start, ends[k])):
                        continue
                    picked.append((start, cpu, lo + k, (base + i) * abi.HSLOT_SIZE))
            copies = [self._map[off : off + abi.HSLOT_SIZE] for *_, off in picked]
        finally:
            words.release()
        h1 = self.heads()
        # Only a ring that went round has lost anything: before the session began there
        # was nothing to record.
        covered = self._lost_before(h1)
        floor = [h1[cpu] - self.slots + 1 for cpu in range(self.cpus)]
        records = sorted(
            (start, rec)
            for (start, cpu, seq, _), rec in zip(picked, copies, strict=True)
            if seq >= floor[cpu]  # not overwritten while we read
        )
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
