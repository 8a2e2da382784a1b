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


# A bracket this tight pins the offset to within a few µs; under load (the GIL, a busy
# CPU) most brackets are far wider, so measuring keeps trying until one is this tight.
TIGHT_NS = 20_000
# Between two refreshes the offset moves at most this much (50 ppm at one refresh a second):
# events of one hop are decoded up to a second apart, and a stepped offset would reorder
# them (a sleep that began after a read would seem to begin before it).
MAX_SLEW_NS = 50_000
# A bigger disagreement is a clock that was set, not a slew: it is followed at once.
STEP_NS = 50_000_000


def slew(current: int, target: int, room: int) -> int:
    """An offset moved towards ``target`` by at most ``room``, or all the way when they
    disagree by STEP_NS or more (a clock that was set, not one that drifts)."""
    delta = target - current
    if abs(delta) >= STEP_NS:
        return target
    return current + max(-room, min(room, delta))


def measure_offset(samples: int = 7, max_samples: int = 200) -> tuple[int, int]:
    """(offset, uncertainty) such that wall = mono + offset, from the tightest bracket."""
    best: tuple[int, int] | None = None
    for i in range(max_samples):
        m0 = time.monotonic_ns()
        w = wall_ns()
        m1 = time.monotonic_ns()
        width = m1 - m0
        if best is None or width < best[1]:
            best = (w - (m0 + m1) // 2, width)
        if i + 1 >= samples and best[1] <= TIGHT_NS:
            break
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
        if now - self._measured < self._refresh_ns:
            return
        self._measured = now
        offset, uncertainty = measure_offset()
        self.follow(offset, uncertainty)

    def follow(self, offset: int, uncertainty: int) -> None:
        """Move towards a new measurement: slew small differences, step big ones, and
        ignore a measurement too loose to tell (a bracket wider than the slew)."""
        if uncertainty > MAX_SLEW_NS and abs(offset - self.offset_ns) < STEP_NS:
            return
        self.offset_ns = slew(self.offset_ns, offset, MAX_SLEW_NS)
        # What is not caught up yet is part of the uncertainty until it is.
        self.uncertainty_ns = uncertainty + abs(offset - self.offset_ns)
