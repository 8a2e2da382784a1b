"""`qtrace query show` and `qtrace status`."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from qtrace.api.v1 import services_pb2
from qtrace.client import control
from qtrace.errors import QtraceError
from qtrace.output import (
    DEFAULT_ADDR,
    DEFAULT_FORMAT,
    CollectorOpt,
    Format,
    FormatOpt,
    emit_json,
    fail,
    ns_ago,
    out,
    printable,
    shown,
)
from qtrace.wire import history_text, node_event_to_json, stats_to_json

app = typer.Typer(help="Read what the collector knows about queries.", no_args_is_help=True)


@app.command("show")
def show(
    query_id: Annotated[str, typer.Argument(help="The query id.")],
    limit: Annotated[int, typer.Option(help="At most this many events.")] = 100_000,
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """A query's events on every node, in time order."""
    try:
        with control(collector, timeout=60) as call:
            resp = call(
                "QueryEvents", services_pb2.QueryEventsRequest(query_id=query_id, limit=limit)
            )
    except QtraceError as e:
        fail(e)
    events = [node_event_to_json(ne) for ne in resp.events]
    if fmt is Format.json:
        emit_json({"query_id": query_id, "events": events, "truncated": resp.truncated})
        return
    if not events:
        out.print(printable(f"no events for query {query_id!r}"), markup=False)
        raise typer.Exit(1)
    t0 = events[0]["ts_ns"]
    t = Table(title=f"query {shown(query_id)}: {len(events)} events", title_justify="left")
    for col in ("+ms", "node", "process", "kind", "dur µs", "target", "ret"):
        t.add_column(col, justify="right" if col in ("+ms", "dur µs", "ret") else "left")
    for ev in events:
        t.add_row(
            f"{(ev['ts_ns'] - t0) / 1e6:.3f}",
            printable(ev["node"]),
            printable(
                (f"{ev['namespace']}/{ev['pod']} " if ev.get("pod") else "")
                + f"{ev['comm']} {ev['pid']}/{ev['tid']}"
            ),
            printable(ev["kind"]),
            f"{ev['dur_ns'] / 1e3:.1f}",
            printable(ev["target"] or ""),
            str(ev["ret"]),
        )
    out.print(t, markup=False)


def status(collector: CollectorOpt = DEFAULT_ADDR, fmt: FormatOpt = DEFAULT_FORMAT) -> None:
    """Connected agents and, per session and agent, events received and dropped."""
    try:
        with control(collector) as call:
            resp = call("Status", services_pb2.StatusRequest())
    except QtraceError as e:
        fail(e)
    agents = [
        {
            "agent_id": a.agent_id,
            "node": a.node,
            "connected": a.connected,
            "connected_ns": a.connected_ns,
            "last_batch_ns": a.last_batch_ns,
            "clock_offset_ns": a.clock_offset_ns,
            "clock_uncertainty_ns": a.clock_uncertainty_ns,
        }
        for a in resp.agents
    ]
    sessions = [stats_to_json(s) for s in resp.sessions]
    if fmt is Format.json:
        emit_json({"agents": agents, "sessions": sessions, "events_stored": resp.events_stored})
        return
    now = time.time_ns()
    t = Table(title="agents", title_justify="left")
    for col in ("node", "agent", "connected", "last batch", "clock offset"):
        t.add_column(col)
    for a in agents:
        t.add_row(
            shown(a["node"]),
            shown(a["agent_id"]),
            "[green]yes[/]" if a["connected"] else "[red]no[/]",
            ns_ago(a["last_batch_ns"], now),
            f"{a['clock_offset_ns'] / 1e3:+.0f} ± {a['clock_uncertainty_ns'] / 1e3:.0f} µs",
        )
    out.print(t)
    s = Table(title="sessions", title_justify="left")
    for col in ("session", "node", "events stored", "dropped", "shed", "history covers"):
        s.add_column(col, justify="left" if col in ("session", "node") else "right")
    for r in sessions:
        style = "red" if r["dropped"] else "yellow" if r["shed"] else None
        s.add_row(
            shown(r["session_id"]), shown(r["node"]), str(r["events_stored"]), str(r["dropped"]),
            str(r["shed"]), history_text(r["history"]), style=style,
        )  # fmt: skip
    out.print(s)
    out.print(f"{resp.events_stored} events stored")


__all__ = ["QtraceError", "app", "status"]
