"""A CPU hog: the busy neighbour process behind the ``cpu-starved`` fault.

Run as ``python -m searchsvc.hog --cpu N``.  It names itself ``qt-hog``, pins
itself to CPU ``N``, checks that it may use SCHED_FIFO, then prints ``ready``
and serves one command per stdin line:

* ``spin MS``: switch to SCHED_FIFO priority 10, print ``spinning``, busy-loop
  for ``MS`` milliseconds (at most :data:`MAX_SPIN_MS`) by ``time.monotonic_ns``,
  print ``done`` and switch back to SCHED_OTHER.  While it spins, no SCHED_OTHER
  task can run on CPU ``N``: a thread pinned there that is woken by the
  ``spinning`` line waits runnable for the whole spin.  ``done`` is written
  before the switch back, so it is already in the pipe when such a thread runs.
* anything else: print ``error ...`` and carry on.

It exits with status 0 on EOF of stdin and dies on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from searchsvc.server import set_process_name

PROCESS_NAME = "qt-hog"
MAX_SPIN_MS = 500
FIFO_PRIORITY = 10


def to_fifo() -> None:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))


def to_other() -> None:
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def busy_loop(ms: int) -> None:
    end = time.monotonic_ns() + min(ms, MAX_SPIN_MS) * 1_000_000
    while time.monotonic_ns() < end:
        pass


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_spin(line: str) -> int | None:
    """The milliseconds of a ``spin MS`` command, clamped to MAX_SPIN_MS; else None."""
    match line.split():
        case ["spin", ms] if ms.isdecimal():
            return min(int(ms), MAX_SPIN_MS)
        case _:
            return None


def serve() -> None:
    while line := sys.stdin.readline():
        ms = parse_spin(line)
        if ms is None:
            say(f"error: expected 'spin MS', got {line.strip()!r}")
            continue
        to_fifo()
        try:
            say("spinning")
            busy_loop(ms)
            say("done")
        finally:
            to_other()


def main(argv: list[str] | None = None) -> int:
    set_process_name(PROCESS_NAME)
    # Die with the default action even if the parent ignored SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parser = argparse.ArgumentParser(prog="searchsvc.hog")
    parser.add_argument("--cpu", type=int, required=True, help="the CPU to pin to and hog")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    # Fail at startup, not on the first fault, if real-time scheduling is denied.
    to_fifo()
    to_other()
    say("ready")
    # A broken pipe means the parent is gone: nobody is left to starve.
    with contextlib.suppress(BrokenPipeError):
        serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
