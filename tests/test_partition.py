"""No silent loss, end to end: a killed agent, a partitioned network, a full spool, a full
disk. Real processes, real probes, a real network namespace; every event the workload made
is stored exactly once, or counted where it was lost."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from agent.spool import SUFFIX, read_batches
from tests.procs import (
    Agent,
    Collector,
    qtrace,
    qtrace_json,
    session_status,
    wait_for,
)
from tests.test_targets import workload


def prog_ids(pid: int) -> set[int]:
    """The BPF programs a process holds open (bpftool here does not list owners' pids):
    the other engineers' tests load programs on this machine too."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog":
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                ids |= {int(line.split()[1]) for line in info.splitlines() if "prog_id" in line}
    return ids


def loaded_prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "prog", "list", "-j"], check=True, capture_output=True, text=True
    ).stdout
    return {int(p["id"]) for p in json.loads(out)}


def agent_row(addr: str, sid: str, agent_id: str) -> dict[str, Any] | None:
    rows = [a for a in session_status(addr, sid)["agents"] if a["agent_id"] == agent_id]
    return rows[0] if rows else None


def row_complete(addr: str, sid: str, agent_id: str) -> bool:
    row = agent_row(addr, sid, agent_id)
    return row is not None and bool(row["complete"])


def start(addr: str, pid: int, duration: str = "5m") -> str:
    sid: str = qtrace_json(
        "session", "start", "--pid", str(pid), "--probes", "storage",
        "--duration", duration, "--collector", addr,
    )["session_id"]  # fmt: skip
    return sid


def stored(db: Path, pid: int) -> dict[str, int]:
    """Per kind, the events of a pid in a stopped collector's file; and the duplicates."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        kinds = dict(
            con.execute(
                "SELECT kind, count(*) FROM events WHERE pid = ? GROUP BY kind", [pid]
            ).fetchall()
        )
        dup_batches = con.execute(
            "SELECT count(*) - count(DISTINCT (agent_id, seq)) FROM batches"
        ).fetchone()
        dup_events = con.execute(
            "SELECT count(*) - count(DISTINCT (agent_id, tid, mono_ns, kind)) FROM events"
        ).fetchone()
    finally:
        con.close()
    assert dup_batches == (0,), "a batch was stored twice"
    assert dup_events == (0,), "an event was stored twice"
    return {str(k): int(v) for k, v in kinds.items()}


def spooled(spool: Path, pid: int, kind: str) -> int:
    return sum(e.pid == pid and e.kind == kind for b in read_batches(spool) for e in b.events)


def test_agent_killed_mid_session_resumes_and_ships_its_spool_once(tmp_path: Path) -> None:
    db = tmp_path / "q.duckdb"
    spool = tmp_path / "spool"
    col = Collector(db)
    port = col.port
    a = Agent(col.addr, "node-a", spool=spool)
    b: Agent | None = None
    try:
        with workload(tmp_path) as w:
            sid = start(col.addr, w.pid)
            wait_for(lambda: agent_row(col.addr, sid, a.agent_id), 30, "the agent to trace")
            held = prog_ids(a.proc.pid)
            assert held, "the agent should hold its probes"
            w.do("pwrite 1000")
            col.kill()
            w.do("pread 2000")  # only the agent's spool has these now
            wait_for(lambda: spooled(spool, w.pid, "pread64") == 2000, 30, "preads on disk")
            a.kill()
            wait_for(lambda: not held & loaded_prog_ids(), 30, "the kernel to free its probes")

            col = Collector(db, port)
            b = Agent(col.addr, "node-a", spool=spool)
            assert b.agent_id != a.agent_id
            wait_for(lambda: agent_row(col.addr, sid, b.agent_id), 30, "the new agent to trace")
            w.do("pwrite 500")  # tracing resumed: these come from the new agent
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: row_complete(col.addr, sid, b.agent_id), 60, "the final batch")
            dead = agent_row(col.addr, sid, a.agent_id)
            assert dead is not None and dead["complete"] and "died" in dead["error"]
            assert not list(spool.glob(f"*{SUFFIX}")), "acked segments are deleted"
            pid = w.pid
    finally:
        a.stop()
        if b is not None:
            b.stop()
        col.stop()
    kinds = stored(db, pid)
    assert kinds["pread64"] == 2000 and kinds["pwrite64"] == 1500


# -- a partition made with a network namespace -----------------------------------------------


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A namespace for the agent, linked to the host by a veth pair:
    (namespace, host-side address, the agent-side link's name)."""
    tag = os.getpid() % 100_000
    ns, host_if, ns_if = f"qtp{tag}", f"qtph{tag}", f"qtpa{tag}"
    net = f"10.77.{tag % 250 + 1}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{net}.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, f"{net}.1", ns_if
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


PARTITION_S = 60.0


def test_partition_under_load_stores_every_event_once(
    tmp_path: Path, netns: tuple[str, str, str]
) -> None:
    ns, host_addr, ns_if = netns
    db = tmp_path / "q.duckdb"
    spool = tmp_path / "spool"
    col = Collector(db, args=["--insecure"], host=host_addr)  # a trusted test link
    agent = Agent(col.addr, "node-p", spool=spool, netns=ns)
    issued = 0
    try:
        with workload(tmp_path) as w:
            sid = start(col.addr, w.pid)
            wait_for(lambda: agent_row(col.addr, sid, agent.agent_id), 30, "the agent to trace")
            w.do("pwrite 1000")
            issued += 1000
            subprocess.run(["ip", "-n", ns, "link", "set", ns_if, "down"], check=True)
            cut = time.monotonic()
            saw_spool = False
            # Load all through the partition: about 5000 pwrites a second.
            while time.monotonic() - cut < PARTITION_S:
                w.do("pwrite 500")
                issued += 500
                saw_spool = saw_spool or any(spool.glob(f"*{SUFFIX}"))
                time.sleep(0.1)  # the load's pace, not a wait for anything
            subprocess.run(["ip", "-n", ns, "link", "set", ns_if, "up"], check=True)
            assert saw_spool, "the agent should have spooled while cut off"
            assert agent.proc.poll() is None
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: row_complete(col.addr, sid, agent.agent_id), 90, "the final batch")
            row = agent_row(col.addr, sid, agent.agent_id)
            assert row is not None and row["dropped"] == 0, row
            assert row["drops"]["pwrite64"]["received"] == issued
            pid = w.pid
    finally:
        agent.stop()
        col.stop()
    assert stored(db, pid)["pwrite64"] == issued


# -- bounded: a full spool, a full disk ---------------------------------------------------


def accounted(row: dict[str, Any]) -> tuple[int, int, int]:
    """(events the agent received, stored, lost by the agent) of one agent's row."""
    received = sum(d["received"] for k, d in row["drops"].items() if k != "*")
    star = row["drops"].get("*", {})
    return received, row["events_stored"], star.get("lost_spool", 0) + star.get("lost_agent", 0)


def test_a_full_spool_is_counted_and_shown(tmp_path: Path) -> None:
    db = tmp_path / "q.duckdb"
    col = Collector(db)
    port = col.port
    # 256 KiB holds a couple of thousand events; under a 64 MiB cap nothing waits in memory.
    agent = Agent(col.addr, "node-a", extra=["--spool-max-bytes", "256K", "--max-memory", "64"])
    try:
        with workload(tmp_path) as w:
            sid = start(col.addr, w.pid)
            wait_for(lambda: agent_row(col.addr, sid, agent.agent_id), 30, "the agent to trace")
            col.kill()
            w.do("pwrite 20000")
            wait_for(lambda: agent.logged("is full"), 30, "the agent to say the spool is full")
            col = Collector(db, port)
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: row_complete(col.addr, sid, agent.agent_id), 60, "the final batch")
            row = agent_row(col.addr, sid, agent.agent_id)
            assert row is not None
            received, kept, lost = accounted(row)
            assert row["drops"]["*"]["lost_spool"] > 0 and row["dropped"] >= lost
            # The agent may decline a few records it received (a neighbour's lock on an
            # unrelated file): never more arrive than were received.
            assert 0 <= received - (kept + lost) <= 16, row
            # Every write is accounted for in the kernel too: shipped, or lost there when
            # a loaded machine starves the agent (counted), or shed by the rate limit.
            d = row["drops"]["pwrite64"]
            assert d["produced"] + d["shed"] == 20000, d
            assert d["received"] + d["lost_ringbuf"] + d["lost_mapfull"] == d["produced"], d
            status = qtrace_json("status", "--collector", col.addr)
            mine = [s for s in status["sessions"] if s["agent_id"] == agent.agent_id]
            assert mine and mine[0]["drops"]["*"]["lost_spool"] == lost
            text = qtrace("session", "status", sid, "--collector", col.addr).stdout
            assert str(row["dropped"]) in text
    finally:
        agent.stop()
        col.stop()


def test_a_full_disk_is_a_clear_error_and_counted(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], check=True)
    db = tmp_path / "q.duckdb"
    col = Collector(db)
    port = col.port
    agent: Agent | None = None
    try:
        agent = Agent(col.addr, "node-a", spool=disk / "spool", extra=["--max-memory", "64"])
        with workload(tmp_path) as w:
            sid = start(col.addr, w.pid)
            wait_for(lambda: agent_row(col.addr, sid, agent.agent_id), 30, "the agent to trace")
            col.kill()
            w.do("pwrite 20000")
            wait_for(lambda: agent.logged("No space left on device"), 30, "a disk-full error")
            line = next(x for x in agent.log if "No space left on device" in x)
            assert "cannot write to spool" in line and "lost_spool" in line
            assert sum("No space left" in x for x in agent.log) == 1, "said once, not per batch"
            assert agent.proc.poll() is None, "the agent keeps running"
            col = Collector(db, port)
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: row_complete(col.addr, sid, agent.agent_id), 60, "the final batch")
            row = agent_row(col.addr, sid, agent.agent_id)
            assert row is not None
            received, kept, lost = accounted(row)
            assert lost > 0 and 0 <= received - (kept + lost) <= 16, row
    finally:
        if agent is not None:
            agent.stop()
        col.stop()
        subprocess.run(["umount", str(disk)], check=False)


def test_sessions_expire_on_the_agent_without_the_collector(tmp_path: Path) -> None:
    col = Collector(tmp_path / "q.duckdb")
    agent = Agent(col.addr, "node-a")
    try:
        with workload(tmp_path) as w:
            sid = start(col.addr, w.pid, duration="3s")
            wait_for(lambda: agent_row(col.addr, sid, agent.agent_id), 30, "the agent to trace")
            held = prog_ids(agent.proc.pid)
            assert held
            col.kill()
            wait_for(lambda: not prog_ids(agent.proc.pid), 30, "the agent to detach at expiry")
            assert not held & loaded_prog_ids(), "its programs are gone from the kernel"
            assert agent.proc.poll() is None, "the agent keeps running"
    finally:
        agent.stop()
        col.stop()
