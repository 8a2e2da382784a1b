"""`qtrace capture`: a replayable query log from a session's live traffic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from qtrace.api.v1 import services_pb2, services_pb2_grpc
from qtrace.client import channel as open_channel
from qtrace.client import parse_addr, rpc_error
from qtrace.errors import QtraceError
from qtrace.output import (
    DEFAULT_ADDR,
    DEFAULT_FORMAT,
    CollectorOpt,
    Format,
    FormatOpt,
    RedactHeaderOpt,
    RedactOpt,
    emit_json,
    fail,
    out,
    printable,
)
from qtrace.redact import Redactor

# Set by the client on every request, or carried as the line's `id`.
_DROPPED = {"host", "content-length", "connection", "transfer-encoding"}


def parse_http(raw: bytes, id_header: str) -> dict[str, Any] | None:
    """A captured HTTP/1.x request as a query-log line; None if it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/") or not parts[1].startswith("/"):
        return None
    headers: dict[str, str] = {}
    qid = None
    length = 0
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name, value = name.strip(), value.strip()
        low = name.lower()
        # ASCII digits only ('²' is a digit to str.isdigit), and no more than fit a length.
        if low == "content-length" and value.isascii() and value.isdigit() and len(value) < 19:
            length = int(value)
        if low == id_header.lower():
            qid = value
        elif low not in _DROPPED:
            headers[name] = value
    entry: dict[str, Any] = {"method": parts[0], "path": parts[1], "headers": headers}
    if qid is not None:
        entry["id"] = qid
    if sep and length:
        if len(body) >= length:
            entry["body"] = body[:length].decode("utf-8", "replace")
        elif body:
            entry["body"] = body.decode("utf-8", "replace")
            entry["truncated"] = True  # the capture limit cut it: raise --capture-bytes
    return entry


def capture(
    session: Annotated[str, typer.Option("--session", help="A session started with capture.")],
    out_file: Annotated[Path, typer.Option("--out", help="Query log to write (JSON lines).")],
    query_id_header: Annotated[str, typer.Option(help="Header carrying the id.")] = "X-Query-Id",
    redact_header: RedactHeaderOpt = None,
    redact: RedactOpt = None,
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Write the requests a capture session saw as a log `qtrace replay` can read.

    --redact and --redact-header mask more in the log, on top of what the session's own
    rules masked on the node before the requests left it."""
    written = skipped = 0
    try:
        redactor = Redactor(redact_header or [], redact or [])
        target = parse_addr(collector)
        if not out_file.parent.is_dir():
            raise QtraceError(f"cannot write {out_file}: {out_file.parent} is not a directory")
        channel = open_channel(target)
        stub = services_pb2_grpc.ControlServiceStub(channel)
        try:
            with out_file.open("w", encoding="utf-8") as f:
                req = services_pb2.ListRequestsRequest(session_id=session)
                for r in stub.ListRequests(req, timeout=300):
                    entry = parse_http(redactor.request(r.request), query_id_header)
                    if entry is None:
                        skipped += 1
                        continue
                    f.write(json.dumps(entry) + "\n")
                    written += 1
        except grpc.RpcError as e:
            raise rpc_error(e, target) from None
        finally:
            channel.close()
    except QtraceError as e:
        fail(e)
    if fmt is Format.json:
        emit_json({"written": written, "skipped": skipped, "out": str(out_file)})
    else:
        out.print(
            printable(f"{written} requests written to {out_file} ({skipped} not HTTP)"),
            markup=False,
        )
