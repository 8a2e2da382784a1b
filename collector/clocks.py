"""Node clocks refined by happens-before pairs (DESIGN.md, Time).

Each agent's offset to the collector is measured NTP-style on its stream; what that cannot
see (an asymmetric path, a wrong kernel-to-wall offset on the node) the traffic itself
bounds: bytes sent on node A are received on node B after they were sent. Every exchange
of a session between two nodes narrows the interval in which the true shift of B against
A lies. A node whose stored clock falls outside its interval is moved to its nearest edge,
and the width left is the uncertainty that a timeline carries."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from collector.store import Store
from qtrace.api.v1 import services_pb2

CACHE_S = 10.0


@dataclass(frozen=True)
class Alignment:
    shifts: dict[str, int]  # node -> ns to add to its stored timestamps
    uncertainty_ns: int  # the widest interval left; 0 when no pair bounded anything
    reference: str | None = None


def solve(bounds: list[tuple[str, str, int]]) -> Alignment:
    """Shift every node against the node that talks to the most others (the root's):
    for each, the interval (lo, hi) its shift must lie in, and the point of it nearest 0."""
    if not bounds:
        return Alignment({}, 0)
    degree: Counter[str] = Counter()
    for a, b, _ in bounds:
        degree[a] += 1
        degree[b] += 1
    ref = max(sorted(degree), key=lambda n: degree[n])
    lo: dict[str, int] = {}
    hi: dict[str, int] = {}
    for x, y, bound in bounds:
        if x == ref:  # shift(y) > bound
            lo[y] = max(lo.get(y, bound), bound)
        elif y == ref:  # shift(ref) - shift(x) > bound, so shift(x) < -bound
            hi[x] = min(hi.get(x, -bound), -bound)
    shifts: dict[str, int] = {}
    width = 0
    for node in set(lo) | set(hi):
        low, high = lo.get(node), hi.get(node)
        if low is not None and high is not None and low > high:
            continue  # contradictory (a clock stepped mid-session): trust the NTP offset
        shift = 0
        if low is not None and shift <= low:
            shift = low + 1
        if high is not None and shift >= high:
            shift = high - 1
        shifts[node] = shift
        if low is not None and high is not None:
            width = max(width, high - low)
    return Alignment(shifts, width, ref)


class Aligner:
    """Per session, cached: exchanges accumulate slowly and explains come in bursts."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, Alignment]] = {}

    def alignment(self, session_id: str) -> Alignment:
        hit = self._cache.get(session_id)
        if hit and time.monotonic() - hit[0] < CACHE_S:
            return hit[1]
        a = solve(self.store.happens_before(session_id))
        self._cache[session_id] = (time.monotonic(), a)
        return a

    def events(
        self, query_id: str, limit: int
    ) -> tuple[list[services_pb2.NodeEvent], bool, Alignment]:
        """The query's events, each node's moved onto the aligned clock, in time order."""
        events, truncated = self.store.query_events(query_id, limit)
        if not events:
            return events, truncated, Alignment({}, 0)
        a = self.alignment(events[0].session_id)
        if any(a.shifts.values()):
            for ne in events:
                ne.event.ts_ns += a.shifts.get(ne.node, 0)
            events.sort(key=lambda ne: ne.event.ts_ns)
        return events, truncated, a
