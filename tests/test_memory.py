"""The memory and sched probe groups on a real server: major faults on an mmapped file
name the file, mmap_lock waits name the neighbour holding the lock, and sleeps outside
any syscall are measured rather than lumped into "other"."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.extract import QueryIdExtractor
from agent.groups import DEFAULT_GROUPS
from agent.model import Event
from agent.probes import ProbeConfig
from agent.targets import TargetSpec
from tests.conftest import REPO, background_tracer


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.memserver"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    yield proc.pid, port
    proc.terminate()
    proc.wait()


def get(port: int, path: str, qid: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"X-Query-Id": qid})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    finally:
        conn.close()


def traced(pid: int, port: int, requests: list[tuple[str, str]]) -> list[Event]:
    config = ProbeConfig(groups=frozenset(DEFAULT_GROUPS))
    with background_tracer(TargetSpec(pids=[pid]), QueryIdExtractor.header(), config) as (
        _tracer,
        sink,
    ):
        for path, qid in requests:
            get(port, path, qid)
    return sink.events


def test_major_faults_on_a_mapped_file_name_it(server: tuple[int, int], tmp_path: Path) -> None:
    pid, port = server
    index = tmp_path / "index.bin"
    with open(index, "wb") as f:
        f.write(os.urandom(4 << 20))
        os.fsync(f.fileno())
    events = traced(pid, port, [(f"/fault?path={index}", "q-fault")])
    faults = [e for e in events if e.kind == "page_fault"]
    assert faults, "a read through a mapping of an uncached file must fault and wait"
    assert all(e.query_id == "q-fault" and e.group == "memory" for e in faults)
    on_file = [e for e in faults if e.target == str(index)]
    # Page by page (MADV_RANDOM): most of the 1024 pages waited for the disk.
    assert len(on_file) > 100
    assert sum(e.dur_ns for e in on_file) > 0
    assert all(e.detail and e.detail["fault_ns"] <= e.ts_ns for e in on_file)


def test_mmap_lock_waits_name_the_neighbour_reading_smaps(server: tuple[int, int]) -> None:
    pid, port = server
    reader = subprocess.Popen(
        [sys.executable, "-c",
         f"import sys\nwhile True:\n    open('/proc/{pid}/smaps').read()"],
    )  # fmt: skip
    try:
        events = traced(pid, port, [("/mmap?n=300", "q-mmap")])
    finally:
        reader.kill()
        reader.wait()
    waits = [e for e in events if e.kind == "mmap_lock" and e.query_id == "q-mmap"]
    assert waits, "mapping memory while smaps is read must wait for mmap_lock"
    holders = {e.detail.get("holder_pid") for e in waits if e.detail}
    assert reader.pid in holders
    assert all(e.target == f"mmap_lock of pid {pid}" for e in waits)


def test_sleeps_outside_syscalls_are_off_cpu_time(server: tuple[int, int]) -> None:
    pid, port = server
    events = traced(pid, port, [("/sleep?ms=40", "q-sleep")])
    off = [e for e in events if e.kind == "offcpu" and e.query_id == "q-sleep"]
    assert off and max(e.dur_ns for e in off) >= 40_000_000
    assert all(e.group == "sched" for e in off)
