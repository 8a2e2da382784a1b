"""`qtrace session start|list|status|stop`."""

from __future__ import annotations

import getpass
from typing import Annotated, Any

import typer
from rich.table import Table

from agent.recorder import Detail
from qtrace.api.v1 import services_pb2, sessions_pb2
from qtrace.client import control
from qtrace.commands.agent import parse_size
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
    shown,
)
from qtrace.redact import redaction_pb
from qtrace.wire import history_text, session_to_json, stats_to_json

app = typer.Typer(help="Trace sessions: what to trace, for how long.", no_args_is_help=True)

Ids = Annotated[str, typer.Argument(help="Session id.")]


def parse_duration(text: str) -> int:
    """'90', '90s', '10m', '2h' -> nanoseconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    num, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(num)
    except ValueError:
        raise QtraceError(f"invalid duration {text!r}", "use e.g. 90s, 10m or 2h") from None
    if value <= 0:
        raise QtraceError(f"duration must be positive, not {text!r}")
    return int(value * units[unit] * 1e9)


@app.command("start")
def start(
    pid: Annotated[list[int] | None, typer.Option("--pid", help="Process id (repeatable).")] = None,
    comm: Annotated[list[str] | None, typer.Option("--comm", help="Process name.")] = None,
    cmdline: Annotated[
        list[str] | None, typer.Option("--cmdline", help="Regex over the command line.")
    ] = None,
    cgroup: Annotated[list[str] | None, typer.Option("--cgroup", help="cgroup v2 path.")] = None,
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Kubernetes: pods in this namespace (repeatable)."),
    ] = None,
    selector: Annotated[
        str,
        typer.Option(
            "--selector", "-l", help="Kubernetes: only pods with these labels (app=leaf,tier!=x)."
        ),
    ] = "",
    pod: Annotated[
        list[str] | None,
        typer.Option("--pod", help="Kubernetes: this pod, NAME or NAMESPACE/NAME (repeatable)."),
    ] = None,
    duration: Annotated[str, typer.Option(help="How long: 90s, 10m, 2h.")] = "10m",
    probes: Annotated[
        str,
        typer.Option(
            help="Probe groups, of net,storage,sched,memory,node; `all` is every one. "
            "Default: all but node (node-wide context costs every process on the node)."
        ),
    ] = "",
    query_id_header: Annotated[str | None, typer.Option(help="[X-Query-Id]")] = None,
    query_id_regex: Annotated[str | None, typer.Option(help="Group 1 is the id.")] = None,
    capture_requests: Annotated[
        bool, typer.Option(help="Keep request headers (for `qtrace capture`).")
    ] = False,
    capture_bodies: Annotated[bool, typer.Option(help="Keep request bodies too.")] = False,
    capture_bytes: Annotated[int, typer.Option(help="Bytes kept per request.")] = 1024,
    redact_header: RedactHeaderOpt = None,
    redact: RedactOpt = None,
    max_event_rate: Annotated[
        int,
        typer.Option(
            help="Events/s per node leaving the kernel; over it they are counted and sampled "
            "(never slowing the traced service). 0: the collector's default, 200000.",
            min=0,
        ),
    ] = 0,
    capture: Annotated[
        Detail,
        typer.Option(
            help="full: every event leaves the kernel (short investigations); recorder: "
            "per-request summaries, the detail of a query fetched from a recent history "
            "in the kernel when it turns out to matter (long sessions, near-zero cost).",
        ),
    ] = Detail.full,
    history_size: Annotated[
        str,
        typer.Option(
            help="Recorder: the recent history per node, 1M to 4G; `status` shows "
            "how far back it reaches."
        ),
    ] = "64M",
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Start tracing targets on every node; prints the session id."""
    try:
        if query_id_header and query_id_regex:
            raise QtraceError("--query-id-header and --query-id-regex exclude each other")
        redaction = redaction_pb(redact_header or [], redact or [])
        if (redact_header or redact) and not (capture_requests or capture_bodies):
            raise QtraceError(
                "--redact and --redact-header apply to captured requests",
                "add --capture-requests or --capture-bodies",
            )
        extractor = (
            sessions_pb2.Extractor(regex=query_id_regex)
            if query_id_regex
            else sessions_pb2.Extractor(header=query_id_header or "X-Query-Id")
        )
        req = services_pb2.StartSessionRequest(
            targets=sessions_pb2.Targets(
                pids=pid or [],
                comms=comm or [],
                cmdline_regexes=cmdline or [],
                cgroups=cgroup or [],
                namespaces=namespace or [],
                label_selector=selector,
                pods=pod or [],
            ),
            probes=[p.strip() for p in probes.split(",") if p.strip()],
            extractor=extractor,
            duration_ns=parse_duration(duration),
            started_by=getpass.getuser(),
            capture=sessions_pb2.Capture(
                requests=capture_requests or capture_bodies,
                bodies=capture_bodies,
                max_bytes=capture_bytes,
                redact=redaction,
            ),
            max_event_rate=max_event_rate,
            detail=sessions_pb2.DETAIL_MODE_RECORDER
            if capture is Detail.recorder
            else sessions_pb2.DETAIL_MODE_FULL,
            history_bytes=parse_size(history_size, "--history-size")
            if capture is Detail.recorder
            else 0,
        )
        with control(collector) as call:
            s = call("StartSession", req)
    except QtraceError as e:
        fail(e)
    if fmt is Format.json:
        emit_json(session_to_json(s))
    else:
        out.print(printable(s.id), markup=False)


def _sessions_table(sessions: list[dict[str, Any]]) -> Table:
    t = Table(title="sessions", title_justify="left")
    for col in ("id", "state", "targets", "probes", "left", "by"):
        t.add_column(col)
    for s in sessions:
        tg = s["targets"]
        targets = ", ".join(
            [f"pid {p}" for p in tg["pids"]]
            + [f"comm {c}" for c in tg["comms"]]
            + [f"cmdline /{c}/" for c in tg["cmdline_regexes"]]
            + [f"cgroup {c}" for c in tg["cgroups"]]
            + [f"namespace {n}" for n in tg["namespaces"]]
            + ([f"selector {tg['label_selector']}"] if tg["label_selector"] else [])
            + [f"pod {p}" for p in tg["pods"]]
        )
        colour = {"active": "green", "stopped": "yellow", "expired": "dim"}[s["state"]]
        t.add_row(
            shown(s["session_id"]),
            f"[{colour}]{s['state']}[/]",
            shown(targets),
            shown(",".join(s["probes"])),
            f"{s['remaining_s']:.0f}s" if s["state"] == "active" else "-",
            shown(s["started_by"]),
        )
    return t


@app.command("list")
def list_(
    all_: Annotated[bool, typer.Option("--all", help="Include ended sessions.")] = False,
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Sessions known to the collector (active ones unless --all)."""
    try:
        with control(collector) as call:
            resp = call("ListSessions", services_pb2.ListSessionsRequest(include_ended=all_))
    except QtraceError as e:
        fail(e)
    sessions = [session_to_json(s) for s in resp.sessions]
    if fmt is Format.json:
        emit_json({"sessions": sessions})
    else:
        out.print(_sessions_table(sessions))


@app.command("status")
def status(
    session_id: Ids, collector: CollectorOpt = DEFAULT_ADDR, fmt: FormatOpt = DEFAULT_FORMAT
) -> None:
    """One session: its definition and, per agent, events stored and dropped."""
    try:
        with control(collector) as call:
            st = call("GetSession", services_pb2.SessionRequest(session_id=session_id))
    except QtraceError as e:
        fail(e)
    obj = session_to_json(st.session) | {"agents": [stats_to_json(a) for a in st.agents]}
    if fmt is Format.json:
        emit_json(obj)
        return
    out.print(_sessions_table([obj]))
    t = Table(title="per agent", title_justify="left")
    for col in ("node", "agent", "events stored", "batches", "dropped", "shed", "history covers",
                "state"):  # fmt: skip
        t.add_column(col, justify="right" if col not in ("node", "agent", "state") else "left")
    for a in obj["agents"]:
        style = (
            "red" if a["dropped"] or a["error"] else "yellow" if a["shed"] or a["disconnected"]
            else None
        )  # fmt: skip
        state = _agent_state(a)
        t.add_row(
            shown(a["node"]), shown(a["agent_id"]), str(a["events_stored"]), str(a["batches"]),
            str(a["dropped"]), str(a["shed"]), history_text(a["history"]), shown(state),
            style=style,
        )  # fmt: skip
    out.print(t)
    # Why a node traces nothing is worth reading whole: the table cuts long cells.
    for a in obj["agents"]:
        if a["error"]:
            said = f"{a['node']}: {_agent_state(a)}"
            out.print(printable(said), markup=False, soft_wrap=True)


def _agent_state(a: dict[str, Any]) -> str:
    """One node's part in a session, as `session status` shows it."""
    if a["error"]:
        # An error on an agent still tracing is a condition that may pass (no pod matches
        # yet, RBAC being fixed); on a finished one it is why it could not trace.
        return f"{'failed' if a['complete'] else 'waiting'}: {a['error']}"
    if a["complete"]:
        return "complete"
    return "disconnected" if a["disconnected"] else "tracing"


@app.command("stop")
def stop(
    session_id: Ids, collector: CollectorOpt = DEFAULT_ADDR, fmt: FormatOpt = DEFAULT_FORMAT
) -> None:
    """Stop a session on every node now."""
    try:
        with control(collector) as call:
            s = call("StopSession", services_pb2.SessionRequest(session_id=session_id))
    except QtraceError as e:
        fail(e)
    if fmt is Format.json:
        emit_json(session_to_json(s))
    else:
        out.print(printable(f"session {s.id} {session_to_json(s)['state']}"), markup=False)
