"""Node clocks refined by happens-before pairs (DESIGN.md, Time).

Each agent's offset to the collector is measured NTP-style on its stream; what that cannot
see (an asymmetric path, a wrong kernel-to-wall offset on the node) the traffic itself
bounds: bytes sent on node A are received on node B after they were sent. Every exchange
of a session between two nodes narrows the interval in which the true shift of B against
A lies. A node whose stored clock falls outside its interval is moved to its nearest edge,
and the width left is the uncertainty that a timeline carries."""

from __future__ import annotations

import time
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
    """Shift every node so that each pair's bound holds, moving each as little as it can.

    A bound (x, y, b) says shift(y) - shift(x) > b. Bounds chain: a leaf that only talks
    to a mid-tier service is bounded through it. The node that talks to the most others
    (the root's) stays put; the others are fixed one by one, nearest first, each at the
    point nearest 0 of the interval that every bound, through every chain, leaves it once
    the nodes before it are fixed (difference constraints: such a point always extends to
    a solution). A pair whose own bounds contradict each other (a clock stepped
    mid-session) is left out; if longer chains still contradict, nothing moves and the NTP
    offsets stand."""
    need: dict[tuple[str, str], int] = {}  # shift(y) - shift(x) >= need[(x, y)]
    for x, y, b in bounds:
        if x != y:
            need[(x, y)] = max(need.get((x, y), b + 1), b + 1)
    for x, y in list(need):
        if (y, x) in need and need[(x, y)] + need[(y, x)] > 0:
            del need[(x, y)], need[(y, x)]
    if not need:
        return Alignment({}, 0)
    peers: dict[str, set[str]] = {}
    for x, y in need:
        peers.setdefault(x, set()).add(y)
        peers.setdefault(y, set()).add(x)
    degree = {n: len(p) for n, p in peers.items()}
    nodes = sorted(degree)
    ref = max(nodes, key=lambda n: degree[n])
    # longest[x][y]: the most that shift(y) - shift(x) must be, over every chain.
    longest = {x: {y: (0 if x == y else None) for y in nodes} for x in nodes}
    for (x, y), v in need.items():
        longest[x][y] = v
    for k in nodes:
        for x in nodes:
            xk = longest[x][k]
            if xk is None:
                continue
            row = longest[x]
            for y in nodes:
                ky, xy = longest[k][y], row[y]
                if ky is not None and (xy is None or xk + ky > xy):
                    row[y] = xk + ky
    if any((longest[n][n] or 0) > 0 for n in nodes):
        return Alignment({}, 0, ref)  # contradictory along a chain: trust NTP

    def interval(node: str, fixed: dict[str, int]) -> tuple[int | None, int | None]:
        lows = [s + d for f, s in fixed.items() if (d := longest[f][node]) is not None]
        highs = [s - d for f, s in fixed.items() if (d := longest[node][f]) is not None]
        return (max(lows) if lows else None), (min(highs) if highs else None)

    fixed = {ref: 0}
    width = 0
    for node in sorted(nodes, key=lambda n: (n != ref, -degree[n], n)):
        if node == ref:
            continue
        low, high = interval(node, {ref: 0})
        if low is not None and high is not None:
            width = max(width, high - low + 2)  # the open interval the bounds leave
        low, high = interval(node, fixed)
        shift = 0
        if low is not None and shift < low:
            shift = low
        if high is not None and shift > high:
            shift = high
        fixed[node] = shift
    return Alignment({n: s for n, s in fixed.items() if n != ref}, width, ref)


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
