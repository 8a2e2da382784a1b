"""The node probe group: what untraced neighbours did to the targets' files, /proc entries
and disks is kept, and nothing else of theirs is."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.groups import DEFAULT_GROUPS
from agent.model import Event
from agent.probes import ProbeConfig
from agent.sink import ListSink
from agent.targets import TargetSpec
from agent.tracer import Tracer
from tests.conftest import REPO, background_tracer
from tests.procs import wait_for

NODE = ProbeConfig(groups=frozenset({*DEFAULT_GROUPS, "node"}))


class Workload:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "workload.py"), str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdin and self.proc.stdout
        assert self.proc.stdout.readline().strip() == "ready"

    def do(self, cmd: str) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[tuple[Workload, Path]]:
    path = tmp_path / "shard.idx"
    w = Workload(path)
    yield w, path
    w.close()


@pytest.fixture
def neighbours() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def spawn(procs: list[subprocess.Popen[str]], code: str, cwd: Path) -> int:
    """Run ``code`` in an untraced process that then stays alive (a relative path is
    resolved through the process's cwd); returns its pid once ``code`` has run."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('done', flush=True)\nimport sys\nsys.stdin.read()"],
        cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "done"
    return proc.pid


def watched(tracer: Tracer, sink: ListSink, w: Workload, path: Path) -> None:
    """The target touches its file until the tracer has taught the kernel about it."""

    def taught() -> bool:
        w.do("pread 1")
        return str(path) in tracer._decoder.watched

    wait_for(taught, 30, "the target's file to be watched")


def of(events: list[Event], pid: int) -> list[Event]:
    return [e for e in events if e.pid == pid]


def test_a_neighbour_writing_a_target_file_is_seen(
    workload: tuple[Workload, Path], tmp_path: Path, neighbours: list[subprocess.Popen[str]]
) -> None:
    w, path = workload
    other = tmp_path / "elsewhere"
    other.mkdir()
    with background_tracer(TargetSpec(pids=[w.proc.pid]), None, NODE) as (tracer, sink):
        watched(tracer, sink, w, path)
        # By a relative path, as a tool run from the data directory would.
        writer = spawn(
            neighbours,
            "import os\n"
            "fd = os.open('shard.idx', os.O_RDWR)\nos.pwrite(fd, b'y' * 512, 0)\nos.close(fd)",
            tmp_path,
        )
        # Same base name, another file: not the targets' business.
        (other / "shard.idx").write_bytes(b"z")
        bystander = spawn(
            neighbours,
            "import os\nfd = os.open('shard.idx', os.O_RDWR)\nos.pwrite(fd, b'y', 0)\nos.close(fd)",
            other,
        )
        w.do("pread 1")  # an event after theirs: drained once this one is
        wait_for(lambda: any(e.pid == w.proc.pid for e in sink.events[-50:]), 10, "drain")
    mine = of(sink.events, writer)
    kinds = {e.kind for e in mine}
    assert {"openat", "pwrite64", "close"} <= kinds, kinds
    odd = [(e.kind, e.target, e.query_id) for e in mine if e.target != str(path) or e.query_id]
    assert not odd, odd
    assert of(sink.events, bystander) == []


def test_a_neighbour_reading_a_target_proc_entry_is_seen(
    workload: tuple[Workload, Path], tmp_path: Path, neighbours: list[subprocess.Popen[str]]
) -> None:
    w, _path = workload
    pid = w.proc.pid
    with background_tracer(TargetSpec(pids=[pid]), None, NODE) as (_tracer, sink):
        reader = spawn(
            neighbours,
            f"import os\nopen('/proc/{pid}/status').read()\nopen('/proc/self/status').read()",
            tmp_path,
        )
    mine = of(sink.events, reader)
    assert {e.target for e in mine if e.kind == "openat"} == {f"/proc/{pid}/status"}
    assert any(e.kind == "read" and e.target == f"/proc/{pid}/status" for e in mine)


def test_a_neighbour_reading_a_pods_proc_entry_is_seen(
    workload: tuple[Workload, Path], tmp_path: Path, neighbours: list[subprocess.Popen[str]]
) -> None:
    from agent.targets import cgroup2_root

    w, _path = workload
    pid = w.proc.pid
    cg = cgroup2_root() / f"qtrace-node-{os.getpid()}"  # the pod's container cgroup
    cg.mkdir()
    try:
        (cg / "cgroup.procs").write_text(str(pid))
        spec = TargetSpec(cgroups=[str(cg)])
        with background_tracer(spec, None, NODE) as (_tracer, sink):
            # Its syscalls are how the kernel learns the process is a target's.
            def seen() -> bool:
                w.do("pread 1")
                return bool(of(sink.events, pid))

            wait_for(seen, 30, "the pod's events")
            reader = spawn(neighbours, f"open('/proc/{pid}/status').read()", tmp_path)
            n = len(sink.events)
            w.do("pread 1")  # an event after the reader's: drained once this one is
            wait_for(lambda: bool(of(sink.events[n:], pid)), 10, "drain")
        (cg.parent / "cgroup.procs").write_text(str(pid))
    finally:
        cg.rmdir()
    mine = of(sink.events, reader)
    assert {e.target for e in mine if e.kind == "openat"} == {f"/proc/{pid}/status"}


def test_neighbour_disk_io_on_a_target_disk_is_seen(
    workload: tuple[Workload, Path], tmp_path: Path, neighbours: list[subprocess.Popen[str]]
) -> None:
    w, path = workload
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.write(os.urandom(8 << 20))
        os.fsync(f.fileno())
    with background_tracer(TargetSpec(pids=[w.proc.pid]), None, NODE) as (tracer, sink):
        watched(tracer, sink, w, path)
        reader = spawn(
            neighbours,
            "import os, mmap\nopen('pid','w').write(str(os.getpid()))\n"
            "fd = os.open('big.bin', os.O_RDONLY | os.O_DIRECT)\n"
            "buf = mmap.mmap(-1, 1 << 20)\n"
            "while os.readv(fd, [buf]) > 0: pass\nos.close(fd)",
            tmp_path,
        )
    blocks = [e for e in of(sink.events, reader) if e.kind == "block_rq"]
    dev = os.stat(path).st_dev
    assert blocks, "8 MB of O_DIRECT reads must reach the disk"
    assert {e.target for e in blocks} == {f"dev {os.major(dev)}:{os.minor(dev)}"}
    # Its own file is not a target's: only its disk I/O is context.
    assert {e.kind for e in of(sink.events, reader)} == {"block_rq"}
