"""`qtrace anomaly report|import` and `qtrace anomalies`: results from any comparator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qtrace.api.v1 import anomalies_pb2
from qtrace.client import control
from qtrace.errors import QtraceError
from qtrace.output import (
    DEFAULT_ADDR,
    DEFAULT_FORMAT,
    CollectorOpt,
    Format,
    FormatOpt,
    emit_json,
    err,
    fail,
    out,
    printable,
    shown,
)
from qtrace.wire import anomaly_from_json, anomaly_to_json

app = typer.Typer(help="Anomalies reported by comparators.", no_args_is_help=True)
CHUNK = 1000


@app.command("report")
def report(
    query_id: Annotated[str, typer.Option("--query-id", help="The query.")],
    type_: Annotated[str, typer.Option("--type", help="mismatch, latency or error.")],
    detail: Annotated[str | None, typer.Option(help="Free JSON.")] = None,
    session: Annotated[str | None, typer.Option("--session")] = None,
    ts_ns: Annotated[int, typer.Option(help="When it happened (ns since the epoch).")] = 0,
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Report one anomaly."""
    try:
        try:
            parsed = json.loads(detail) if detail is not None else None
        except json.JSONDecodeError as e:
            raise QtraceError(f"--detail is not JSON ({e.msg})") from None
        obj = {"query_id": query_id, "type": type_, "detail": parsed, "ts_ns": ts_ns}
        obj |= {"session_id": session or "", "source": "cli"}
        try:
            a = anomaly_from_json(obj)
        except ValueError as e:
            raise QtraceError(str(e)) from None
        with control(collector) as call:
            call("ReportAnomalies", anomalies_pb2.ReportAnomaliesRequest(anomalies=[a]))
    except QtraceError as e:
        fail(e)
    if fmt is Format.json:
        emit_json({"accepted": 1})
    else:
        out.print(printable(f"reported {type_} for {query_id}"), markup=False)


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSON lines, one anomaly a line.")],
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Import anomalies; a bad line is reported with its number and skipped."""
    bad: list[dict[str, object]] = []
    good: list[anomalies_pb2.Anomaly] = []
    try:
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise QtraceError(f"cannot read {file}: {e.strerror}") from e
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                good.append(anomaly_from_json(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as e:
                reason = f"not JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                bad.append({"line": n, "error": reason})
        accepted = 0
        with control(collector) as call:
            for i in range(0, len(good), CHUNK):
                req = anomalies_pb2.ReportAnomaliesRequest(anomalies=good[i : i + CHUNK])
                accepted += call("ReportAnomalies", req).accepted
    except QtraceError as e:
        fail(e)
    if fmt is Format.json:
        emit_json({"accepted": accepted, "skipped": bad})
        return
    for b in bad:
        err.print(
            f"[yellow]{shown(file)}:{b['line']}:[/] skipped: {shown(b['error'])}", highlight=False
        )
    out.print(f"imported {accepted} anomalies, skipped {len(bad)} lines", highlight=False)


def anomalies(
    session: Annotated[str | None, typer.Option("--session")] = None,
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Anomalies known to the collector, from any source."""
    try:
        with control(collector) as call:
            resp = call(
                "ListAnomalies", anomalies_pb2.ListAnomaliesRequest(session_id=session or "")
            )
    except QtraceError as e:
        fail(e)
    found = [anomaly_to_json(a) for a in resp.anomalies]
    if fmt is Format.json:
        emit_json({"anomalies": found})
        return
    t = Table(title=f"{len(found)} anomalies", title_justify="left")
    for col in ("query", "type", "source", "session", "detail"):
        t.add_column(col)
    for a in found:
        d = json.dumps(a["detail"]) if a["detail"] is not None else ""
        t.add_row(
            printable(a["query_id"]), a["type"], printable(a["source"]),
            printable(a["session_id"] or ""), printable(d if len(d) < 80 else d[:77] + "..."),
        )  # fmt: skip
    out.print(t, markup=False)
