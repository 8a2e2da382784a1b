"""Which file (or kind of memory) an address of a process maps, from /proc/PID/maps.

A page fault names only an address; search indexes are usually mmapped, so the file
behind the address is what says a fault was a storage read."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

REFRESH_S = 0.2  # a miss rereads the maps at most this often per process


@dataclass
class _Maps:
    loaded: float
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def _parse(text: str) -> tuple[list[int], list[int], list[str]]:
    starts, ends, names = [], [], []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        starts.append(int(lo, 16))
        ends.append(int(hi, 16))
        # No name: anonymous memory (a heap of malloc arenas, thread stacks...).
        names.append(parts[5].strip() if len(parts) == 6 else "[anon]")
    return starts, ends, names


class MemoryMaps:
    def __init__(self, max_processes: int = 4096) -> None:
        self._maps: dict[int, _Maps] = {}
        self._max = max_processes

    def _load(self, pid: int) -> _Maps:
        m = _Maps(time.monotonic())
        try:
            with open(f"/proc/{pid}/maps") as f:
                m.starts, m.ends, m.names = _parse(f.read())
        except OSError:
            pass  # gone: the fault stays unnamed
        if len(self._maps) >= self._max:
            self._maps.clear()
        self._maps[pid] = m
        return m

    def name_at(self, pid: int, addr: int) -> str | None:
        m = self._maps.get(pid) or self._load(pid)
        for attempt in range(2):
            i = bisect.bisect_right(m.starts, addr) - 1
            if i >= 0 and addr < m.ends[i]:
                return m.names[i]
            if attempt or time.monotonic() - m.loaded < REFRESH_S:
                break
            m = self._load(pid)  # mapped since we last looked
        return None

    def forget(self, pid: int) -> None:
        self._maps.pop(pid, None)
