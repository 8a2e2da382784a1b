"""A disk hog: the neighbour process behind the ``disk-io`` fault.

Run as ``python -m searchsvc.diskio --scratch FILE --evict FILE [--evict FILE ...]
[--size-mb N] [--threads T] [--block-kb B]``.  It names itself ``qt-diskio``,
writes ``--scratch`` once with real data (``N`` MiB, O_DIRECT: an fallocated
but never written extent reads as zeros without touching the disk), starts
``T`` idle reader threads, prints ``ready`` and serves one command per stdin
line:

* ``storm MS``: (a) drop the ``--evict`` files (a leaf's index) from the page
  cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, the files having been flushed
  once at start so that no page is dirty; any process that can open a file may
  do this), then (b) have every reader thread issue random O_DIRECT reads of
  ``B`` KiB from the scratch file, back to back.  Once every reader is
  issuing its reads of this storm (the victim must not wait longer), print
  ``storming EVICTED START_NS END_NS`` and go on reading until ``MS``
  milliseconds (at most :data:`MAX_STORM_MS`) from then, or later if a storm is
  already running longer: how many of the evicted files' pages were in the page
  cache before (a) and no longer after it, and the CLOCK_MONOTONIC window of
  the reads (from when they were started).  A reader on the evicted
  files now waits for the disk behind this process's reads.
* anything else: print ``error ...`` and carry on.

O_DIRECT keeps every read in this process's own context: the block layer
queues it from the reading thread (block:block_bio_queue and block_rq_insert
name this process; block_rq_issue may run in a kblockd worker under an I/O
scheduler such as mq-deadline), unlike buffered writes, which writeback
kworkers would issue.

It exits with status 0 on EOF of stdin or on SIGTERM, and removes the scratch
file on its way out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from searchsvc.server import set_process_name

PROCESS_NAME = "qt-diskio"
MAX_STORM_MS = 2000
DEFAULT_SIZE_MB = 256
DEFAULT_THREADS = 4
DEFAULT_BLOCK_KB = 1024
# How long ``storm`` waits for every reader's first read before it gives up.
CONFIRM_TIMEOUT_S = 10.0
_MiB = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_storm(line: str) -> int | None:
    """The milliseconds of a ``storm MS`` command, clamped to MAX_STORM_MS; else None."""
    match line.split():
        case ["storm", ms] if ms.isdecimal():
            return min(int(ms), MAX_STORM_MS)
        case _:
            return None


def resident_pages(fd: int) -> int:
    """How many pages of ``fd``'s file are in the page cache (mincore of a
    read-only mapping; mapping a file does not fault any page in)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    try:
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        if _libc.mincore(addr, size, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        return sum(b & 1 for b in vec)
    finally:
        _libc.munmap(addr, size)


def evict(fds: list[int]) -> int:
    """Drop the files from the page cache; how many resident pages went."""
    before = after = 0
    for fd in fds:
        before += resident_pages(fd)
        # DONTNEED skips dirty pages; the leaf's index is only read, and was flushed at
        # start (a flush now would wait behind the storm's queue, and the victim for it).
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        after += resident_pages(fd)
    return before - after


def write_scratch(path: Path, size_mb: int) -> None:
    """Fill ``path`` with ``size_mb`` MiB of real data, bypassing the page cache."""
    buf = mmap.mmap(-1, _MiB)  # page aligned, as O_DIRECT needs
    try:
        buf.write(random.Random(0).randbytes(_MiB))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            os.posix_fallocate(fd, 0, size_mb * _MiB)
            for off in range(0, size_mb * _MiB, _MiB):
                os.pwritev(fd, [buf], off)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        buf.close()


@dataclass(frozen=True)
class StormWindow:
    start_ns: int
    end_ns: int


class Readers:
    """``threads`` threads that read ``path`` with O_DIRECT, at random ``block``
    aligned offsets, whenever a storm is on."""

    def __init__(self, path: Path, threads: int, block: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self._blocks = os.fstat(self._fd).st_size // block
        if self._blocks < 1:
            os.close(self._fd)
            raise ValueError(f"{path} is smaller than one {block}-byte block")
        self._block = block
        self._cond = threading.Condition()
        self._until_ns = 0
        self._generation = 0
        self._confirmed = 0
        self._closing = False
        self._threads = [
            threading.Thread(target=self._read, args=(i,), name=f"reader-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def storm(self, ms: int) -> StormWindow:
        """Start reading; return once every reader is issuing its reads of this
        storm, and keep reading until ``ms`` from then (or longer if already
        storming)."""
        with self._cond:
            start = time.monotonic_ns()
            self._until_ns = max(self._until_ns, start + ms * 1_000_000)
            self._generation += 1
            self._confirmed = 0
            self._cond.notify_all()
            if not self._cond.wait_for(
                lambda: self._confirmed >= len(self._threads), CONFIRM_TIMEOUT_S
            ):
                raise TimeoutError("the readers did not start")
            # The victim reads after our answer: on a loaded machine the first
            # reads can take longer than the whole storm.
            self._until_ns = max(self._until_ns, time.monotonic_ns() + ms * 1_000_000)
            self._cond.notify_all()
            return StormWindow(start, self._until_ns)

    def calm(self) -> None:
        """End the storm now: each reader finishes the read it is in."""
        with self._cond:
            self._until_ns = time.monotonic_ns()

    def _read(self, seed: int) -> None:
        buf = mmap.mmap(-1, self._block)
        rng = random.Random(seed)
        confirmed = 0
        while True:
            with self._cond:
                # Each storm gets at least one read, however short it is.
                while (
                    not self._closing
                    and time.monotonic_ns() >= self._until_ns
                    and confirmed == self._generation
                ):
                    self._cond.wait()
                if self._closing:
                    return
                generation = self._generation
                # Confirmed as it issues its first read of the storm, not once that read
                # is done: the victim's wait for us would otherwise be part of its query.
                if confirmed != generation:
                    confirmed = generation
                    self._confirmed += 1
                    self._cond.notify_all()
            os.preadv(self._fd, [buf], rng.randrange(self._blocks) * self._block)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        os.close(self._fd)


def serve(fds: list[int], readers: Readers) -> None:
    while line := sys.stdin.readline():
        if line.strip() == "calm":
            readers.calm()
            say("calm")
            continue
        ms = parse_storm(line)
        if ms is None:
            say(f"error: expected 'storm MS' or 'calm', got {line.strip()!r}")
            continue
        evicted = evict(fds)
        window = readers.storm(ms)
        say(f"storming {evicted} {window.start_ns} {window.end_ns}")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    set_process_name(PROCESS_NAME)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(prog="searchsvc.diskio")
    parser.add_argument("--scratch", type=Path, required=True, help="the big file to read")
    parser.add_argument(
        "--evict", type=Path, action="append", required=True, help="a file to drop from the cache"
    )
    parser.add_argument("--size-mb", type=int, default=DEFAULT_SIZE_MB)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--block-kb", type=int, default=DEFAULT_BLOCK_KB)
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.threads < 1 or args.block_kb < 4 or args.block_kb % 4:
        parser.error("need --size-mb >= 1, --threads >= 1, --block-kb a multiple of 4")
    fds: list[int] = []
    readers: Readers | None = None
    try:
        for path in args.evict:
            fds.append(os.open(path, os.O_RDONLY))
            os.fdatasync(fds[-1])  # freshly built: make every page clean, so evictable
        write_scratch(args.scratch, args.size_mb)
        readers = Readers(args.scratch, args.threads, args.block_kb * 1024)
        say("ready")
        # A broken pipe means the parent is gone: nobody is left to disturb.
        with contextlib.suppress(BrokenPipeError):
            serve(fds, readers)
    finally:
        if readers is not None:
            readers.close()
        for fd in fds:
            os.close(fd)
        args.scratch.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
