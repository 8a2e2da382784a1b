"""`qtrace explain` and `qtrace timeline`: why one query went wrong, and its timeline."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qtrace.api.v1 import services_pb2
from qtrace.client import control
from qtrace.errors import QtraceError
from qtrace.output import DEFAULT_ADDR, CollectorOpt, emit_json, fail, out, printable, shown
from qtrace.timeline import perfetto, render_html
from qtrace.wire import node_event_to_json


class ExplainFormat(StrEnum):
    text = "text"
    json = "json"
    html = "html"


class TimelineFormat(StrEnum):
    perfetto = "perfetto"
    html = "html"
    json = "json"


QueryArg = Annotated[str, typer.Argument(help="The query id.")]


def fetch(collector: str, query_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with control(collector, timeout=120) as call:
        resp = call("Explain", services_pb2.ExplainRequest(query_id=query_id))
        events = call("QueryEvents", services_pb2.QueryEventsRequest(query_id=query_id)).events
    return json.loads(resp.json), [node_event_to_json(e) for e in events]


def explain(
    query_id: QueryArg,
    fmt: Annotated[ExplainFormat, typer.Option("--format")] = ExplainFormat.text,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write to a file.")] = None,
    collector: CollectorOpt = DEFAULT_ADDR,
) -> None:
    """Why one query went wrong: hops, where time went, findings with evidence."""
    try:
        explanation, events = fetch(collector, query_id)
    except QtraceError as e:
        fail(e)
    if fmt is ExplainFormat.json:
        if output:
            output.write_text(json.dumps(explanation, indent=1))
        else:
            emit_json(explanation)
        return
    if fmt is ExplainFormat.html:
        page = render_html(explanation, events)
        target = output or Path(f"qtrace-{safe_name(query_id)}.html")
        target.write_text(page, encoding="utf-8")
        out.print(f"wrote {printable(target)}", markup=False)
        return
    print_text(explanation)


def safe_name(query_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in query_id)[:80]


def print_text(x: dict[str, Any]) -> None:
    anomalies = ", ".join(a["type"] for a in x["anomalies"]) or "none reported"
    out.print(
        printable(f"query {x['query_id']}  (anomalies: {anomalies})"), markup=False, highlight=False
    )
    t = Table(title="hops", title_justify="left")
    cols = ["node", "process", "total ms", "network", "storage", "block io", "other"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("node", "process") else "right")
    for h in x["hops"]:
        b = h["breakdown_ns"]
        t.add_row(
            printable(h["node"]), printable(f"{h['comm']} {h['pid']}"),
            f"{(h['end_ns'] - h['start_ns']) / 1e6:.2f}",
            *(f"{(b[k] or 0) / 1e6:.2f}" for k in ("network", "storage", "block_io", "other")),
        )  # fmt: skip
    out.print(t, markup=False)
    if not x["findings"]:
        out.print("no finding above the threshold: this query looks like its peers")
    for i, f in enumerate(x["findings"], 1):
        out.print(f"[bold]{i}. {shown(f['category'])}[/] (score {f['score']})", highlight=False)
        out.print(f"   {printable(f['summary'])}", markup=False, highlight=False)
        for c in f["culprits"][:3]:
            out.print(
                printable(
                    f"   culprit: {c['comm']} pid {c['pid']} tid {c['tid']} on {c['node']} "
                    f"({c['events']} events: {', '.join(c['kinds'])})"
                ),
                markup=False,
                highlight=False,
            )
    comp = x["completeness"]
    if not comp["complete"] or comp["reasons"]:
        for r in comp["reasons"]:
            out.print(f"[yellow]note:[/] {shown(r)}", highlight=False)


def timeline(
    query_id: QueryArg,
    fmt: Annotated[TimelineFormat, typer.Option("--format")] = TimelineFormat.perfetto,
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")] = Path(
        "timeline.json"
    ),
    collector: CollectorOpt = DEFAULT_ADDR,
) -> None:
    """Write the query's post-mortem timeline (Perfetto trace, HTML page or JSON)."""
    try:
        explanation, events = fetch(collector, query_id)
        if not output.parent.is_dir():
            raise QtraceError(f"cannot write {output}: {output.parent} is not a directory")
    except QtraceError as e:
        fail(e)
    if fmt is TimelineFormat.perfetto:
        output.write_text(json.dumps(perfetto(explanation, events)))
    elif fmt is TimelineFormat.html:
        output.write_text(render_html(explanation, events), encoding="utf-8")
    else:
        output.write_text(json.dumps({"explanation": explanation, "events": events}))
    out.print(f"wrote {printable(output)}", markup=False)
