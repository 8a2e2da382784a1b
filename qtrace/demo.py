"""The local end-to-end demo: collector, node agent and the test search service.

Starts a collector (embedded DuckDB store under ./out), a node agent and the search
service (a root and two leaves), starts a trace session from the control API like
`qtrace session start` does, sends queries with ids, and shows what the kernel saw of
each query on every process it touched, read back from the collector."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from qtrace.api.v1 import services_pb2, services_pb2_grpc, sessions_pb2
from qtrace.wire import node_event_to_json
from searchsvc.client import make_queries, run_queries
from searchsvc.cluster import Cluster

N_QUERIES = 200
SHOWN = 6
QTRACE = str(Path(sys.executable).parent / "qtrace")
console = Console()


def start(args: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([QTRACE, *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if ready not in line:
        proc.kill()
        raise SystemExit(f"qtrace {args[0]} failed to start: {line}{proc.stderr.read()}")
    return proc, line


def wait_complete(ctl: services_pb2_grpc.ControlServiceStub, sid: str, timeout: float) -> None:
    # The agent sends a final batch when its session ends; until then, look again.
    deadline = time.monotonic() + timeout
    req = services_pb2.SessionRequest(session_id=sid)
    while time.monotonic() < deadline:
        agents = ctl.GetSession(req).agents
        if agents and all(a.complete for a in agents):
            return
        time.sleep(0.1)
    raise SystemExit("the agent did not deliver its final batch in time")


def per_query_table(
    events_by_query: dict[str, list[dict[str, Any]]], roles: dict[int, str]
) -> Table:
    table = Table(title=f"first {SHOWN} queries, as the kernel saw them", title_justify="left")
    for col in ("query", "process", "events", "net ms", "storage ms", "preads", "files"):
        table.add_column(col, justify="left" if col in ("query", "process") else "right")
    for qid, events in list(events_by_query.items())[:SHOWN]:
        by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            by_pid[e["pid"]].append(e)
        for pid, evs in sorted(by_pid.items(), key=lambda kv: roles.get(kv[0], "")):
            net = sum(e["dur_ns"] for e in evs if e["group"] == "net") / 1e6
            sto = sum(e["dur_ns"] for e in evs if e["group"] == "storage") / 1e6
            preads = [e for e in evs if e["kind"] == "pread64"]
            table.add_row(
                qid, f"{roles.get(pid, '?')} {pid}", str(len(evs)), f"{net:.2f}", f"{sto:.2f}",
                str(len(preads)), str(len({e["target"] for e in preads})),
            )  # fmt: skip
        table.add_section()
    return table


def main() -> int:
    out = Path("out")
    out.mkdir(exist_ok=True)
    db = out / "demo.duckdb"
    for stale in out.glob("demo.duckdb*"):
        stale.unlink()
    collector, line = start(
        ["collector", "run", "--db", str(db), "--listen", "127.0.0.1:0"], "listening"
    )
    m = re.search(r":(\d+),", line)
    assert m
    addr = f"127.0.0.1:{m.group(1)}"
    agent, _ = start(["agent", "run", "--collector", addr, "--node", "demo-node"], "agent")
    console.print(f"[bold]collector[/] {addr} (store {db}), [bold]agent[/] demo-node")
    channel = grpc.insecure_channel(addr)
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    try:
        with tempfile.TemporaryDirectory(prefix="qtrace-demo-") as data, Cluster(Path(data)) as c:
            roles = {pid: role for role, pid in c.pids.items()}
            console.print(f"[bold]search service[/] root {c.root_url}, leaves {c.leaf_urls}")
            session = ctl.StartSession(
                services_pb2.StartSessionRequest(
                    targets=sessions_pb2.Targets(comms=["qt-root", "qt-leaf"]),
                    duration_ns=600 * 10**9,
                    started_by="demo",
                )
            )
            console.print(f"[bold]session[/] {session.id}: comm qt-root, qt-leaf")
            req = services_pb2.SessionRequest(session_id=session.id)
            deadline = time.monotonic() + 30
            while not ctl.GetSession(req).agents and time.monotonic() < deadline:
                time.sleep(0.05)  # the agent announces itself once its probes are attached
            queries = make_queries(N_QUERIES, seed=7)
            with Progress(
                TextColumn("queries"), BarColumn(), MofNCompleteColumn(), console=console
            ) as progress:
                task = progress.add_task("q", total=len(queries))
                for i in range(0, len(queries), 20):
                    run_queries(c.root_url, queries[i : i + 20], concurrency=4)
                    progress.advance(task, 20)
            ctl.StopSession(req)
            wait_complete(ctl, session.id, 60)
        events_by_query = {
            qid: [
                node_event_to_json(ne)
                for ne in ctl.QueryEvents(services_pb2.QueryEventsRequest(query_id=qid)).events
            ]
            for qid, _ in queries[:SHOWN]
        }
        st = ctl.GetSession(req)
        stored = sum(a.events_stored for a in st.agents)
        dropped = sum(a.dropped for a in st.agents)
        console.print(per_query_table(events_by_query, roles))
        console.print(f"{stored} events stored, {dropped} dropped.", highlight=False)
        console.print(
            f"Explore: [bold].venv/bin/qtrace collector run --db {db} &[/] then "
            f"[bold].venv/bin/qtrace query show {queries[0][0]}[/]",
            highlight=False,
        )
    finally:
        channel.close()
        agent.terminate()
        agent.wait(60)
        collector.terminate()
        collector.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
