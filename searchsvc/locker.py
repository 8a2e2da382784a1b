"""A lock holder: the neighbour process behind the ``lock-held`` fault.

Run as ``python -m searchsvc.locker --path FILE``.  It names itself
``qt-locker``, opens ``FILE`` (creating it if missing), prints ``ready`` and
serves one command per stdin line:

* ``hold MS``: take ``flock(LOCK_EX)`` on the file, print ``locked``, keep the
  lock for ``MS`` milliseconds (at most :data:`MAX_HOLD_MS`, counted by
  ``time.monotonic`` from the moment the lock was taken), release it and print
  ``done``.  While it holds the lock, any ``flock(LOCK_SH)`` on the same file
  from another open file description blocks until the release.
* anything else: print ``error ...`` and carry on.

It exits with status 0 on EOF of stdin or on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from searchsvc.server import set_process_name

PROCESS_NAME = "qt-locker"
MAX_HOLD_MS = 500


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_hold(line: str) -> int | None:
    """The milliseconds of a ``hold MS`` command, clamped to MAX_HOLD_MS; else None."""
    match line.split():
        case ["hold", ms] if ms.isdecimal():
            return min(int(ms), MAX_HOLD_MS)
        case _:
            return None


def hold(fd: int, ms: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_EX)
    end = time.monotonic() + ms / 1000.0
    try:
        say("locked")
        # This wait is the simulated fault: the lock is held, nothing else happens.
        while (left := end - time.monotonic()) > 0:
            time.sleep(left)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    say("done")


def serve(fd: int) -> None:
    while line := sys.stdin.readline():
        ms = parse_hold(line)
        if ms is None:
            say(f"error: expected 'hold MS', got {line.strip()!r}")
            continue
        hold(fd, ms)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    set_process_name(PROCESS_NAME)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(prog="searchsvc.locker")
    parser.add_argument("--path", type=Path, required=True, help="the file to flock")
    args = parser.parse_args(argv)
    fd = os.open(args.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        say("ready")
        # A broken pipe means the parent is gone: nobody is left to block.
        with contextlib.suppress(BrokenPipeError):
            serve(fd)
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
