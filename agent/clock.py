"""Kernel CLOCK_MONOTONIC to wall clock, re-measured so that NTP slews are followed."""

from __future__ import annotations

import os
import time

# Tests stand in for nodes whose clocks disagree by skewing an agent's wall clock; in
# production this is 0 and the collector's offset estimate is what corrects real skew.
SKEW_NS = int(os.environ.get("QTRACE_CLOCK_SKEW_NS", "0"))


def wall_ns() -> int:
    """This node's wall clock (ns since the epoch)."""
    return time.time_ns() + SKEW_NS


def measure_offset(samples: int = 7) -> tuple[int, int]:
    """(offset, uncertainty) such that wall = mono + offset, from the tightest bracket."""
    best: tuple[int, int] | None = None
    for _ in range(samples):
        m0 = time.monotonic_ns()
        w = wall_ns()
        m1 = time.monotonic_ns()
        width = m1 - m0
        if best is None or width < best[1]:
            best = (w - (m0 + m1) // 2, width)
    assert best is not None
    return best[0], best[1] // 2 + 1


class WallClock:
    def __init__(self, refresh_s: float = 1.0) -> None:
        self._refresh_ns = int(refresh_s * 1e9)
        self.offset_ns, self.uncertainty_ns = measure_offset()
        self._measured = time.monotonic_ns()

    def to_wall(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def maybe_refresh(self) -> None:
        now = time.monotonic_ns()
        if now - self._measured >= self._refresh_ns:
            self.offset_ns, self.uncertainty_ns = measure_offset()
            self._measured = now
