"""The local end-to-end demo: find a rare fault in a "new deployment" and explain it.

On this machine and the embedded store it starts a collector and a node agent, the test
search service three times (old twice as primary and secondary, new with rare faults as
candidate), a trace session on the new deployment, and a replay of 1500 queries. Then it
explains the first anomalies found and writes their HTML and Perfetto timelines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from rich.console import Console

from qtrace.api.v1 import anomalies_pb2, services_pb2, services_pb2_grpc, sessions_pb2
from qtrace.commands.explain import print_text, safe_name
from qtrace.timeline import perfetto, render_html
from qtrace.wire import node_event_to_json
from searchsvc.client import make_queries
from searchsvc.cluster import Cluster

N_QUERIES = 1500
EXPLAINED = 2
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


def wait_until(cond: object, timeout: float, what: str) -> None:
    # Another process's state: look again until it holds (bounded).
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


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
    spool = out / "demo-spool"  # batches of an earlier demo belong to its deleted store
    shutil.rmtree(spool, ignore_errors=True)
    agent, _ = start(
        ["agent", "run", "--collector", addr, "--node", "demo-node", "--spool-dir", str(spool)],
        "agent",
    )
    console.print(f"[bold]collector[/] {addr} (store {db}), [bold]agent[/] on demo-node")
    channel = grpc.insecure_channel(addr)
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="qtrace-demo-") as data,
            Cluster(Path(data) / "old-a") as old_a,
            Cluster(Path(data) / "old-b") as old_b,
            Cluster(Path(data) / "new", fault_rate=1 / 300, deadline_ms=500, fault_seed=1) as new,
        ):
            console.print(
                f"[bold]search service[/]: old {old_a.root_url} and {old_b.root_url}, "
                f"new {new.root_url} (rare faults)"
            )
            session = ctl.StartSession(
                services_pb2.StartSessionRequest(
                    targets=sessions_pb2.Targets(pids=list(new.pids.values())),
                    duration_ns=600 * 10**9,
                    started_by="demo",
                )
            )
            req = services_pb2.SessionRequest(session_id=session.id)
            wait_until(lambda: ctl.GetSession(req).agents, 30, "the agent to attach")
            console.print(f"[bold]session[/] {session.id} tracing the new deployment")
            log = Path(data) / "queries.txt"
            log.write_text("".join(f"{q}\n" for _qid, q in make_queries(N_QUERIES, seed=7)))
            subprocess.run(
                [QTRACE, "replay", "--queries", str(log), "--template", "GET /search?q={query}",
                 "--primary", old_a.root_url, "--secondary", old_b.root_url,
                 "--candidate", new.root_url, "--concurrency", "4", "--session", session.id,
                 "--collector", addr],
                check=True,
            )  # fmt: skip
            ctl.StopSession(req)
            wait_until(
                lambda: all(a.complete for a in ctl.GetSession(req).agents), 60, "final batches"
            )
        found = ctl.ListAnomalies(
            anomalies_pb2.ListAnomaliesRequest(session_id=session.id)
        ).anomalies
        console.rule(f"{len(found)} anomalies; explaining the first {min(EXPLAINED, len(found))}")
        for a in found[:EXPLAINED]:
            x = json.loads(ctl.Explain(services_pb2.ExplainRequest(query_id=a.query_id)).json)
            events = [
                node_event_to_json(e)
                for e in ctl.QueryEvents(
                    services_pb2.QueryEventsRequest(query_id=a.query_id)
                ).events
            ]
            print_text(x)
            name = safe_name(a.query_id)
            page, trace = out / f"{name}.html", out / f"{name}.perfetto.json"
            page.write_text(render_html(x, events), encoding="utf-8")
            trace.write_text(json.dumps(perfetto(x, events)))
            console.print(
                f"timelines: [bold]{page}[/] (browser), [bold]{trace}[/] (ui.perfetto.dev)"
            )
            console.rule()
    finally:
        channel.close()
        agent.terminate()
        agent.wait(60)
        collector.terminate()
        collector.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
