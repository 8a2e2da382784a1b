"""Collector + two node agents + the test search service, all real processes."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from agent.targets import cgroup2_root
from searchsvc.client import make_queries, run_queries
from searchsvc.cluster import Cluster
from tests.conftest import qtrace_programs
from tests.procs import (
    Agent,
    Collector,
    complete,
    joined,
    move_to_cgroup,
    qtrace,
    qtrace_json,
    session_status,
    wait_for,
)
from tests.test_targets import workload


@pytest.fixture
def nodes() -> Iterator[dict[str, Path]]:
    """Two cgroup subtrees standing in for two nodes' process trees."""
    base = cgroup2_root() / f"qtrace-nodes-{os.getpid()}"
    cgs = {name: base / name for name in ("node-a", "node-b")}
    for cg in cgs.values():
        cg.mkdir(parents=True)
    yield cgs
    for cg in cgs.values():
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                move_to_cgroup(int(pid), cgroup2_root())
        cg.rmdir()
    base.rmdir()


def test_two_nodes_one_session(tmp_path: Path, nodes: dict[str, Path]) -> None:
    col = Collector(tmp_path / "q.duckdb")
    agents = [Agent(col.addr, name, scope) for name, scope in nodes.items()]
    try:
        with Cluster(tmp_path / "svc") as c:
            move_to_cgroup(c.pids["root"], nodes["node-a"])
            move_to_cgroup(c.pids["leaf0"], nodes["node-b"])
            move_to_cgroup(c.pids["leaf1"], nodes["node-b"])
            started = qtrace_json(
                "session", "start", "--comm", "qt-root", "--comm", "qt-leaf",
                "--duration", "5m", "--collector", col.addr,
            )  # fmt: skip
            sid = started["session_id"]
            wait_for(lambda: joined(col.addr, sid, 2), 30, "both agents to start tracing")
            queries = make_queries(300, seed=11)
            results = run_queries(c.root_url, queries, concurrency=4)
            assert all(r["status"] == 200 for r in results)
            journals = {role: c.journal(role) for role in c.pids}
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: complete(col.addr, sid, 2), 60, "agents' final batches")
            pids = dict(c.pids)

        preads = {
            role: {r["query_id"]: r["preads"] for r in j["records"]}
            for role, j in journals.items()
            if role.startswith("leaf")
        }
        for qid, _q in queries[::10]:  # every 10th query, through the CLI
            shown = qtrace_json("query", "show", qid, "--collector", col.addr)
            events = shown["events"]
            assert shown["query_id"] == qid and events
            assert all(e["query_id"] == qid for e in events)
            by_node = Counter(e["node"] for e in events)
            assert set(by_node) == {"node-a", "node-b"}
            assert {e["pid"] for e in events if e["node"] == "node-a"} == {pids["root"]}
            assert {e["pid"] for e in events if e["node"] == "node-b"} == {
                pids["leaf0"],
                pids["leaf1"],
            }
            ts = [e["ts_ns"] for e in events]
            assert ts == sorted(ts)
            for leaf in ("leaf0", "leaf1"):
                n = sum(e["kind"] == "pread64" and e["pid"] == pids[leaf] for e in events)
                assert n == preads[leaf][qid]
        status = qtrace_json("status", "--collector", col.addr)
        assert {a["node"] for a in status["agents"]} == {"node-a", "node-b"}
        rows = [s for s in status["sessions"] if s["session_id"] == sid]
        assert len(rows) == 2 and all(r["dropped"] == 0 for r in rows)
    finally:
        for a in agents:
            a.stop()
        col.stop()


def test_skewed_node_clocks_still_nest_hops(tmp_path: Path, nodes: dict[str, Path]) -> None:
    """node-a's clock runs 8 ms ahead, node-b's 8 ms behind: each agent's offset to the
    collector, measured on its stream, puts both on one clock again."""
    col = Collector(tmp_path / "q.duckdb")
    skews = {"node-a": 8_000_000, "node-b": -8_000_000}
    agents = [Agent(col.addr, n, scope, skew_ns=skews[n]) for n, scope in nodes.items()]
    try:
        with Cluster(tmp_path / "svc") as c:
            move_to_cgroup(c.pids["root"], nodes["node-a"])
            move_to_cgroup(c.pids["leaf0"], nodes["node-b"])
            move_to_cgroup(c.pids["leaf1"], nodes["node-b"])
            sid = qtrace_json(
                "session", "start", "--comm", "qt-root", "--comm", "qt-leaf",
                "--duration", "5m", "--collector", col.addr,
            )["session_id"]  # fmt: skip
            wait_for(lambda: joined(col.addr, sid, 2), 30, "both agents to start tracing")
            queries = make_queries(60, seed=2)
            assert all(r["status"] == 200 for r in run_queries(c.root_url, queries))
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: complete(col.addr, sid, 2), 60, "agents' final batches")
        status = qtrace_json("status", "--collector", col.addr)
        offsets = {a["node"]: a["clock_offset_ns"] for a in status["agents"]}
        for node, skew in skews.items():
            assert abs(offsets[node] + skew) < 2_000_000, offsets
        for qid, _q in queries[20:]:  # after the first acks have measured the offsets
            x = qtrace_json("explain", qid, "--collector", col.addr)
            root = next(h for h in x["hops"] if h["comm"] == "qt-root")
            leaves = [h for h in x["hops"] if h["comm"] == "qt-leaf"]
            assert len(leaves) == 2
            slack = x["completeness"]["clock_uncertainty_ns"]
            for leaf in leaves:
                assert root["start_ns"] - slack <= leaf["start_ns"], (qid, root, leaf)
                assert leaf["end_ns"] <= root["end_ns"] + slack, (qid, root, leaf)
    finally:
        for a in agents:
            a.stop()
        col.stop()


def test_explanations_say_when_events_were_lost(tmp_path: Path) -> None:
    col = Collector(tmp_path / "q.duckdb")
    agent = Agent(col.addr, "node-a", ring_pages=1)  # 4 KiB: about 40 events per drain
    try:
        with Cluster(tmp_path / "svc") as c:
            sid = qtrace_json(
                "session", "start", "--comm", "qt-root", "--comm", "qt-leaf",
                "--duration", "5m", "--collector", col.addr,
            )["session_id"]  # fmt: skip
            wait_for(lambda: joined(col.addr, sid, 1), 30, "the agent to start tracing")
            queries = make_queries(300, seed=9)
            assert all(r["status"] == 200 for r in run_queries(c.root_url, queries, 8))
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: complete(col.addr, sid, 1), 60, "the agent's final batch")
        st = session_status(col.addr, sid)
        lost = sum(a["dropped"] for a in st["agents"])
        assert lost > 0, "a one-page ring buffer should overflow under this load"
        known = next(
            q
            for q, _ in queries
            if qtrace_json("query", "show", q, "--collector", col.addr)["events"]
        )
        x = qtrace_json("explain", known, "--collector", col.addr)
        assert x["completeness"]["complete"] is False
        assert any(
            f"{lost} events of this session were lost" in r for r in x["completeness"]["reasons"]
        )
    finally:
        agent.stop()
        col.stop()


def test_a_session_an_agent_cannot_run_is_reported(tmp_path: Path) -> None:
    scope = cgroup2_root() / f"qtrace-gone-{os.getpid()}"
    scope.mkdir()
    col = Collector(tmp_path / "q.duckdb")
    agent = Agent(col.addr, "node-a", scope)
    try:
        scope.rmdir()  # the agent's own subtree disappears under it
        sid = qtrace_json("session", "start", "--pid", "1", "--collector", col.addr)["session_id"]
        wait_for(lambda: complete(col.addr, sid, 1), 30, "the agent's verdict")
        a = session_status(col.addr, sid)["agents"][0]
        assert a["node"] == "node-a" and "no cgroup v2 directory" in a["error"]
        text = qtrace("session", "status", sid, "--collector", col.addr).stdout
        assert "failed:" in text
    finally:
        agent.stop()
        col.stop()
        if scope.exists():
            scope.rmdir()


def test_collector_killed_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, nodes: dict[str, Path]
) -> None:
    db = tmp_path / "q.duckdb"
    col = Collector(db)
    port = col.port
    agents = [Agent(col.addr, name, scope) for name, scope in nodes.items()]
    try:
        with workload(tmp_path, "a") as wa, workload(tmp_path, "b") as wb:
            move_to_cgroup(wa.pid, nodes["node-a"])
            move_to_cgroup(wb.pid, nodes["node-b"])
            sid = qtrace_json(
                "session", "start", "--pid", str(wa.pid), "--pid", str(wb.pid),
                "--probes", "storage", "--duration", "5m", "--collector", col.addr,
            )["session_id"]  # fmt: skip
            wait_for(lambda: joined(col.addr, sid, 2), 30, "both agents to start tracing")
            wa.do("pwrite 2000")
            wb.do("pwrite 2000")
            col.kill()
            # Written while the collector is down: the agents must keep it.
            wa.do("pwrite 3000")
            wb.do("pwrite 3000")
            col = Collector(db, port)
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: complete(col.addr, sid, 2), 60, "agents' final batches")
        st = session_status(col.addr, sid)
        for a in st["agents"]:
            assert a["drops"]["pwrite64"]["received"] == 5000
            assert a["dropped"] == 0
    finally:
        for a in agents:
            a.stop()
        col.stop()
    con = duckdb.connect(str(db), read_only=True)
    try:
        per_node = dict(
            con.execute(
                "SELECT node, count(*) FROM events WHERE kind = 'pwrite64' GROUP BY node"
            ).fetchall()
        )
        distinct = con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT agent_id, tid, mono_ns, kind FROM events)"
        ).fetchone()
        total = con.execute("SELECT count(*) FROM events").fetchone()
    finally:
        con.close()
    assert per_node == {"node-a": 5000, "node-b": 5000}
    assert distinct == total, "some events were stored twice"


def test_sessions_expire_on_agents_even_without_the_collector(
    tmp_path: Path, nodes: dict[str, Path]
) -> None:
    col = Collector(tmp_path / "q.duckdb")
    agents = [Agent(col.addr, name, scope) for name, scope in nodes.items()]
    try:
        with workload(tmp_path, "a") as wa, workload(tmp_path, "b") as wb:
            move_to_cgroup(wa.pid, nodes["node-a"])
            move_to_cgroup(wb.pid, nodes["node-b"])
            sid = qtrace_json(
                "session", "start", "--pid", str(wa.pid), "--pid", str(wb.pid),
                "--duration", "4s", "--collector", col.addr,
            )["session_id"]  # fmt: skip
            wait_for(lambda: joined(col.addr, sid, 2), 30, "both agents to start tracing")
            assert qtrace_programs(), "agents should be tracing"
            col.kill()
            wait_for(lambda: not qtrace_programs(), 30, "agents to detach at expiry")
            assert all(a.proc.poll() is None for a in agents), "agents must keep running"
    finally:
        for a in agents:
            a.stop()
        col.stop()


def test_a_session_over_its_event_rate_is_shed_and_says_so(tmp_path: Path) -> None:
    col = Collector(tmp_path / "q.duckdb")
    agent = Agent(col.addr, "node-a")
    try:
        with workload(tmp_path, "a") as w:
            sid = qtrace_json(
                "session", "start", "--pid", str(w.pid), "--probes", "storage",
                "--max-event-rate", "500", "--duration", "5m", "--collector", col.addr,
            )["session_id"]  # fmt: skip
            wait_for(lambda: joined(col.addr, sid, 1), 30, "the agent to start tracing")
            w.do("pwrite 20000")
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: complete(col.addr, sid, 1), 60, "the agent's final batch")
        st = session_status(col.addr, sid)
        assert st["max_event_rate"] == 500
        (a,) = st["agents"]
        row = a["drops"]["pwrite64"]
        # Accounted for, every one: shipped and stored, or shed by the limit (not lost).
        assert row["produced"] + row["shed"] == 20000
        assert row["received"] == row["produced"] and a["dropped"] == 0
        assert a["shed"] == sum(d["shed"] for d in a["drops"].values()) > 10000
        assert "shed" in qtrace("session", "status", sid, "--collector", col.addr).stdout
    finally:
        agent.stop()
        col.stop()
