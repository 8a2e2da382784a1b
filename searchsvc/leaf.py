"""Leaf process: answers ``/search`` from its on-disk index with preads.

Run as ``python -m searchsvc.leaf --index DIR [--host H] [--port P]
[--fault-rate F --faults stale-index,deadline,cpu-starved,lock-held,net-delay,disk-io
--deadline-ms MS --fault-seed S] [--cpu N]``; prints the bound port on stdout
once listening (with net-delay: ``PORT netdelay=PROXY_PORT``).

With a fault rate (the "new deployment"), each query may be answered from the
stale ``.idx.next`` twins (journaled ``"fault": "stale-index"``), delayed by
1.5 x the root's deadline (``"fault": "slow"``), starved of CPU by a busy
neighbour process (``"fault": "cpu-starved"`` and ``"hog_pid"``), blocked on
a neighbour's file lock (``"lock-held"``), held up in the network
(``"net-delay"``) or slowed by a neighbour's disk I/O (``"disk-io"``), see
:mod:`searchsvc.faults`.  Every leaf record has ``"pread_ns"``, the time its
preads took.

The helper processes below are the leaf's children but separate processes
with names of their own, so tracing the leaf's pid does not trace them.

With ``cpu-starved`` enabled, the leaf pins itself (every thread, before it
starts any) to one CPU, ``--cpu`` or by default ``(leaf id + 1)`` modulo the
CPUs it may use (leaf0 -> CPU 1, leaf1 -> CPU 0 on two CPUs), and starts a
:mod:`searchsvc.hog` child process pinned to the same CPU.  On the fault, the
handler thread tells the hog to spin for :data:`STARVE_MS` at SCHED_FIFO, waits
only until the hog says it is spinning, and goes on with its normal work: the
thread is woken but cannot run until the spin is over, so the answer (the same
as without the fault) is that much late.  The hog is stopped with the leaf.

With ``lock-held`` enabled, the leaf creates ``<index>/refresh.lock`` and starts
a :mod:`searchsvc.locker` child process on it; every query then reads its index
under ``flock(LOCK_SH)`` taken through its own fresh open of that file.  On the
fault (``"fault": "lock-held"`` and ``"locker_pid"``), the handler tells the
locker to hold ``LOCK_EX`` for :data:`LOCK_HOLD_MS` (one hold per leaf at a
time), waits until it says it has the lock, and goes on: its ``LOCK_SH`` blocks
until the locker lets go, so the same answer is that much late.  Queries that
take their ``LOCK_SH`` meanwhile share the wait.  The locker is stopped with
the leaf.

With ``net-delay`` enabled, the leaf starts a :mod:`searchsvc.netdelay` child
process, a TCP proxy to the leaf that stands in for the network: the root is
given the proxy's port (announced after the leaf's own), and every query
reaches the leaf through it.  The leaf still makes the fault's draw; on the
fault (``"fault": "net-delay"`` and ``"proxy_pid"``) it computes its answer as
usual, then tells the proxy to hold the next bytes coming back on the
connection the query came in on (the proxy's end of it is the leaf's client
port) for 1.5 x the root's deadline, waits until the proxy says it will, and
sends the answer at once: the leaf's span stays short, the root gives up on
the leaf at its deadline, and the answer reaches the root's late fan-out
thread only after the hold.  A query that did not come through the proxy
cannot be held and is journaled without the fault.

With ``disk-io`` enabled, the leaf starts a :mod:`searchsvc.diskio` child
process, which writes a :data:`SCRATCH_MB` MiB scratch file
``<index>/diskio.scratch`` on the same file system as the index.  On the fault
(``"fault": "disk-io"``, ``"diskio_pid"``, ``"evicted_pages"``,
``"diskio_start_ns"`` and ``"diskio_end_ns"``) the query that drew it arms a
storm from a background thread: the neighbour drops the leaf's index shards from
the page cache and starts its O_DIRECT readers.  The next query the leaf serves
(without a fault of its own) suffers it and is journaled with the fault: its
usual preads miss the page cache and queue for the disk behind the neighbour's
reads, and the storm is calmed when it is done (or ends after
:data:`ARMED_STORM_MS`).  Arming one query ahead keeps the wait for the
neighbour to get going out of every query's time, as with a real neighbour,
which does not wait for anyone.  The answer is the same, later.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import itertools
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from searchsvc.diskio import StormWindow
from searchsvc.faults import FaultConfig, FaultDice, add_fault_args
from searchsvc.index import BLOCK_SIZE, Index, build_twins, shard_path, twin_path
from searchsvc.journal import Journal, Role, Span
from searchsvc.server import JsonHandler, Server, connect_host, serve, set_process_name

TOP_K = 10
REFRESH_INTERVAL_S = 0.05
SLOW_FACTOR = 1.5
# How long the hog takes the leaf's CPU on a cpu-starved fault.
STARVE_MS = 80
# How long the locker holds the leaf's lock file on a lock-held fault.
LOCK_HOLD_MS = 80
LOCK_FILE = "refresh.lock"
# How long the disk-io neighbour keeps reading after a disk-io fault; the
# faulty query's cold preads take a few tens of milliseconds within it.
DISK_STORM_MS = 100
# An armed storm lasts until its query is done (calm), or this long if none comes.
ARMED_STORM_MS = 2000
SCRATCH_FILE = "diskio.scratch"
SCRATCH_MB = 256
CHILD_START_TIMEOUT_S = 10.0
CHILD_STOP_TIMEOUT_S = 5.0

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def top_hits(scores: dict[int, float], k: int = TOP_K) -> list[list[float]]:
    best = heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [[doc, score] for doc, score in best]


class TwinRefresher:
    """Keeps rewriting the ``.idx.next`` twins, one block per pwrite every ~50 ms.

    It always writes the content the twin already has, so readers never see a
    torn or changed file; the point is the steady background write traffic.
    """

    def __init__(
        self, directory: Path, contents: list[bytes], interval_s: float = REFRESH_INTERVAL_S
    ) -> None:
        self._contents = contents
        self._interval_s = interval_s
        self._fds: list[int] = []
        try:
            for shard in range(len(contents)):
                self._fds.append(os.open(twin_path(directory, shard), os.O_WRONLY))
        except BaseException:
            self._close_fds()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twin-refresher", daemon=True)

    def start(self) -> TwinRefresher:
        self._thread.start()
        return self

    def _run(self) -> None:
        blocks = itertools.cycle(
            (fd, content, off)
            for fd, content in zip(self._fds, self._contents, strict=True)
            for off in range(0, len(content), BLOCK_SIZE)
        )
        # Event.wait is the refresh period here, not synchronisation.
        while not self._stop.wait(self._interval_s):
            fd, content, off = next(blocks)
            os.pwrite(fd, content[off : off + BLOCK_SIZE], off)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def default_cpu(leaf_id: int) -> int:
    """The CPU leaf ``leaf_id`` shares with its hog: ``leaf_id + 1`` modulo the
    CPUs this process may use (leaf0 -> CPU 1, leaf1 -> CPU 0 on two CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[(leaf_id + 1) % len(cpus)]


def pin_process(cpu: int) -> None:
    """Pin every thread of this process to ``cpu``; threads it creates later
    inherit that.  (``sched_setaffinity(0)`` alone only pins the calling thread.)"""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})


class _Child:
    """A helper child process (``python -m MODULE ARGS``) driven over its stdin
    and stdout, one command at a time; started once it prints ``ready``."""

    name: ClassVar[str] = "child"

    def __init__(
        self, module: str, args: list[str], start_timeout_s: float = CHILD_START_TIMEOUT_S
    ) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._lock = threading.Lock()
        try:
            assert self._proc.stdout is not None
            # The selector only bounds a hung start; the line is the readiness signal.
            with selectors.DefaultSelector() as sel:
                sel.register(self._proc.stdout, selectors.EVENT_READ)
                if not sel.select(start_timeout_s):
                    raise TimeoutError(f"{self.name} {args} did not report ready")
            # Whatever follows "ready" on its line is for the subclass.
            self.ready_words = self._expect(b"ready")
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _expect(self, word: bytes) -> list[str]:
        """Read a line that starts with ``word``; the words after it."""
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        words = line.split()
        if not words or words[0] != word:
            raise RuntimeError(f"{self.name} {self.pid}: expected {word!r}, got {line!r}")
        return [w.decode() for w in words[1:]]

    def _ask(self, command: str) -> list[str]:
        """Send ``command`` and return the words of the one line it answers."""
        with self._lock:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(f"{command}\n".encode())
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} {self.pid} exited")
        return [w.decode() for w in line.split()]

    @contextlib.contextmanager
    def _command(self, command: str, started: bytes) -> Iterator[None]:
        """Send ``command``, run the body once the child answers ``started``,
        then consume its ``done``; one command at a time."""
        with self._lock:
            assert self._proc.stdin is not None
            self._proc.stdin.write(f"{command}\n".encode())
            self._proc.stdin.flush()
            self._expect(started)
            try:
                yield
            finally:
                self._expect(b"done")

    def stop(self, timeout_s: float = CHILD_STOP_TIMEOUT_S) -> int:
        """EOF the child (after any command in progress) and reap it; its exit status."""
        locked = self._lock.acquire(timeout=timeout_s)
        try:
            if self._proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            return self._proc.returncode
        finally:
            if locked:
                self._lock.release()


class Hog(_Child):
    """A :mod:`searchsvc.hog` child process pinned to ``cpu``; one spin at a time."""

    name: ClassVar[str] = "hog"

    def __init__(self, cpu: int, start_timeout_s: float = CHILD_START_TIMEOUT_S) -> None:
        super().__init__("searchsvc.hog", ["--cpu", str(cpu)], start_timeout_s)

    def spinning(self, ms: int) -> contextlib.AbstractContextManager[None]:
        """Run the body while the hog spins ``ms`` on its CPU, then consume its
        ``done``.  The body starts once the hog is spinning, so a thread on that
        CPU runs its first instruction only after the spin."""
        return self._command(f"spin {ms}", b"spinning")


class Locker(_Child):
    """A :mod:`searchsvc.locker` child process that flocks ``path``; one hold at a time."""

    name: ClassVar[str] = "locker"

    def __init__(self, path: Path, start_timeout_s: float = CHILD_START_TIMEOUT_S) -> None:
        super().__init__("searchsvc.locker", ["--path", str(path)], start_timeout_s)

    def holding(self, ms: int) -> contextlib.AbstractContextManager[None]:
        """Run the body once the locker holds its exclusive lock (for ``ms`` from
        when it took it), then consume its ``done``: a ``LOCK_SH`` in the body
        blocks until the locker lets go."""
        return self._command(f"hold {ms}", b"locked")


class NetDelay(_Child):
    """A :mod:`searchsvc.netdelay` child process: a TCP proxy to ``upstream``,
    listening on ``host`` at :attr:`port`."""

    name: ClassVar[str] = "netdelay"

    def __init__(
        self,
        upstream: tuple[str, int],
        host: str,
        start_timeout_s: float = CHILD_START_TIMEOUT_S,
    ) -> None:
        up_host, up_port = upstream
        up = f"[{up_host}]:{up_port}" if ":" in up_host else f"{up_host}:{up_port}"
        args = ["--upstream", up, "--host", host]
        super().__init__("searchsvc.netdelay", args, start_timeout_s)
        self.port = int(self.ready_words[0])

    def hold(self, client_port: int, ms: int) -> bool:
        """Have the proxy hold the next answer bytes on the connection it opened
        from ``client_port`` for ``ms``; False if it has no such connection."""
        return self._ask(f"hold {client_port} {ms}") == ["holding"]


class DiskIo(_Child):
    """A :mod:`searchsvc.diskio` child process that evicts ``evict`` and reads
    its own ``scratch`` file; one storm request at a time."""

    name: ClassVar[str] = "diskio"

    def __init__(
        self,
        scratch: Path,
        evict: list[Path],
        size_mb: int = SCRATCH_MB,
        start_timeout_s: float = CHILD_START_TIMEOUT_S,
    ) -> None:
        args = ["--scratch", str(scratch), "--size-mb", str(size_mb)]
        for path in evict:
            args += ["--evict", str(path)]
        super().__init__("searchsvc.diskio", args, start_timeout_s)

    def storm(self, ms: int) -> tuple[int, StormWindow]:
        """Evict the files and start the readers for ``ms``; returns once they
        read: the pages evicted and the readers' window."""
        match self._ask(f"storm {ms}"):
            case ["storming", evicted, start, end]:
                return int(evicted), StormWindow(int(start), int(end))
            case other:
                raise RuntimeError(f"{self.name} {self.pid}: bad answer {other!r}")

    def calm(self) -> None:
        """End the current storm early."""
        if self._ask("calm") != ["calm"]:
            raise RuntimeError(f"{self.name} {self.pid}: bad answer to calm")


@contextlib.contextmanager
def shared_lock(path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_SH)`` on ``path`` through a fresh open file description:
    flock locks belong to the description, so concurrent handler threads must
    not share one fd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class LeafHandler(JsonHandler):
    role: ClassVar[Role] = "leaf"
    index: ClassVar[Index]
    # The .idx.next twins; None unless the stale-index fault is enabled.
    twin: ClassVar[Index | None] = None
    dice: ClassVar[FaultDice]
    # The CPU hog; None unless the cpu-starved fault is enabled.
    hog: ClassVar[Hog | None] = None
    # The lock file every query flocks (shared) and its locker; None unless the
    # lock-held fault is enabled.
    lock_path: ClassVar[Path | None] = None
    locker: ClassVar[Locker | None] = None
    # The proxy in front of this leaf; None unless net-delay is enabled.
    netdelay: ClassVar[NetDelay | None] = None
    # The disk neighbour; None unless disk-io is enabled.
    diskio: ClassVar[DiskIo | None] = None

    # disk-io storms armed by one query's draw, for the next query to suffer.
    armed: ClassVar[list[tuple[int, StormWindow]]] = []
    armed_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def _arm_storm(cls) -> None:
        assert cls.diskio is not None
        evicted, window = cls.diskio.storm(ARMED_STORM_MS)
        with cls.armed_lock:
            cls.armed.append((evicted, window))

    @classmethod
    def _take_storm(cls) -> tuple[int, StormWindow] | None:
        now = time.monotonic_ns()
        with cls.armed_lock:
            while cls.armed:
                evicted, window = cls.armed.pop(0)
                if window.end_ns - now > DISK_STORM_MS * 1_000_000:
                    return evicted, window
        return None

    def search(self, span: Span, q: str) -> tuple[int, Any]:
        fault = self.dice.draw()
        index = self.index
        storm = self._take_storm() if fault is None and self.diskio is not None else None
        if storm is not None and self.diskio is not None:
            evicted, window = storm
            span.fault = "disk-io"
            span.diskio_pid = self.diskio.pid
            span.evicted_pages = evicted
            span.diskio_start_ns = window.start_ns
            span.diskio_end_ns = window.end_ns
        if fault == "disk-io" and self.diskio is not None:
            # This query's draw arms the storm that the next query suffers: the disk must
            # be busy before that query's first read, and the wait for the neighbour to
            # get going is no query's time (a real neighbour does not wait for us).
            threading.Thread(target=self._arm_storm, name="arm-storm", daemon=True).start()
        if fault == "stale-index" and self.twin is not None:
            index = self.twin
            span.fault = "stale-index"
        starving: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if fault == "cpu-starved" and self.hog is not None:
            span.fault = "cpu-starved"
            span.hog_pid = self.hog.pid
            starving = self.hog.spinning(STARVE_MS)
        held: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if fault == "lock-held" and self.locker is not None:
            span.fault = "lock-held"
            span.locker_pid = self.locker.pid
            held = self.locker.holding(LOCK_HOLD_MS)
        locking: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self.lock_path is not None:
            locking = shared_lock(self.lock_path)
        with starving, held, locking:
            scores: dict[int, float] = {}
            for term in q.split():
                postings, preads, pread_ns = index.timed_lookup(term)
                span.preads += preads
                span.pread_ns += pread_ns
                self.journal.count_preads(preads)
                for doc, score in postings:
                    scores[doc] = scores.get(doc, 0.0) + score
            hits = top_hits(scores)
        if storm is not None and self.diskio is not None:
            self.diskio.calm()
            span.diskio_end_ns = time.monotonic_ns()  # when it really ended
        if fault == "deadline":
            span.fault = "slow"
            # This sleep is the simulated fault: answer after the root gave up.
            time.sleep(self.dice.config.deadline_s * SLOW_FACTOR)
        if fault == "net-delay" and self.netdelay is not None:
            hold_ms = round(self.dice.config.deadline_ms * SLOW_FACTOR)
            # The answer is ready; the proxy holds it once the handler sends it.
            if self.netdelay.hold(self.client_address[1], hold_ms):
                span.fault = "net-delay"
                span.proxy_pid = self.netdelay.pid
        return 200, {
            "leaf": self.index.leaf_id,
            "query_id": span.query_id,
            "hits": hits,
        }


def main(argv: list[str] | None = None) -> int:
    # Before any thread exists, so every handler thread inherits the name.
    set_process_name("qt-leaf")
    parser = argparse.ArgumentParser(prog="searchsvc.leaf")
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    add_fault_args(parser)
    parser.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="with cpu-starved: the CPU shared with the hog (default: leaf id + 1, modulo)",
    )
    args = parser.parse_args(argv)
    config = FaultConfig.from_args(args)

    index = Index.open(args.index)
    twin: Index | None = None
    refresher: TwinRefresher | None = None
    hog: Hog | None = None
    lock_fd: int | None = None
    locker: Locker | None = None
    lock_path: Path | None = None
    netdelay: NetDelay | None = None
    diskio: DiskIo | None = None
    server: Server | None = None
    try:
        # Bound before the proxy starts, which needs the port; its handler class
        # is set below.  No thread exists yet, so pinning still covers them all.
        server = Server((args.host, args.port), LeafHandler, Journal())
        # The proxy and the disk neighbour start before the pinning, so they do
        # not inherit it: they are the network and another tenant, not the leaf.
        if config.enabled("net-delay"):
            netdelay = NetDelay((connect_host(args.host), server.server_port), args.host)
        if config.enabled("disk-io"):
            shards = [shard_path(args.index, shard) for shard in range(index.shards)]
            diskio = DiskIo(args.index / SCRATCH_FILE, shards)
        if config.enabled("cpu-starved"):
            cpu = default_cpu(index.leaf_id) if args.cpu is None else args.cpu
            # Before any thread starts, so every thread inherits the pinning.
            pin_process(cpu)
            hog = Hog(cpu)
        if config.enabled("stale-index"):
            contents = build_twins(args.index)
            twin = Index.open(args.index, twin=True)
            refresher = TwinRefresher(args.index, contents).start()
        if config.enabled("lock-held"):
            lock_path = args.index / LOCK_FILE
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            locker = Locker(lock_path)
        attrs = {
            "index": index,
            "twin": twin,
            "dice": FaultDice(config, index.leaf_id),
            "hog": hog,
            "lock_path": lock_path,
            "locker": locker,
            "netdelay": netdelay,
            "diskio": diskio,
        }
        server.RequestHandlerClass = type("BoundLeafHandler", (LeafHandler,), attrs)
        extra = "" if netdelay is None else f"netdelay={netdelay.port}"
        # serve() closes the server, whatever happens.
        served, server = server, None
        return serve(served, extra)
    finally:
        if server is not None:
            server.server_close()
        if diskio is not None:
            diskio.stop()
        if netdelay is not None:
            netdelay.stop()
        if locker is not None:
            locker.stop()
        if lock_fd is not None:
            os.close(lock_fd)
        if hog is not None:
            hog.stop()
        if refresher is not None:
            refresher.stop()
        if twin is not None:
            twin.close()
        index.close()


if __name__ == "__main__":
    raise SystemExit(main())
