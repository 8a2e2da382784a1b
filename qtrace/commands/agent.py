"""`qtrace agent ...`: trace locally, or run as a node agent for a collector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from agent.recorder import Detail
from qtrace.client import credentials, parse_addr
from qtrace.errors import QtraceError
from qtrace.output import (
    DEFAULT_ADDR,
    CollectorOpt,
    Format,
    emit_json,
    err,
    fail,
    log_to_stderr,
    shown,
    stop_on_signals,
)

app = typer.Typer(help="Node agent: trace processes on this machine.", no_args_is_help=True)


@app.command("trace")
def agent_trace(
    out: Annotated[Path, typer.Option("--out", help="JSON-lines file, one event per line.")],
    pid: Annotated[list[int] | None, typer.Option("--pid", help="Process id (repeatable).")] = None,
    comm: Annotated[
        list[str] | None, typer.Option("--comm", help="Process name, also future ones.")
    ] = None,
    cgroup: Annotated[
        list[str] | None, typer.Option("--cgroup", help="cgroup v2 path, with its children.")
    ] = None,
    query_id_header: Annotated[
        str | None, typer.Option(help="HTTP header holding the query id [X-Query-Id].")
    ] = None,
    query_id_regex: Annotated[
        str | None, typer.Option(help="Regex over a request's first bytes; group 1 is the id.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds to trace (default: until SIGINT/SIGTERM).")
    ] = None,
    capture_bytes: Annotated[
        int, typer.Option(help="Bytes of each request given to the extractor.")
    ] = 256,
    ring_pages: Annotated[int, typer.Option(help="Ring buffer size in 4 KiB pages.")] = 1024,
    probes: Annotated[
        str,
        typer.Option(help="Probe groups, of net,storage,sched,memory,node or all [all but node]."),
    ] = "",
    capture: Annotated[
        Detail,
        typer.Option(
            help="full: every event leaves the kernel; recorder: per-request summaries, "
            "with the detail kept in a recent history in the kernel."
        ),
    ] = Detail.full,
    history_size: Annotated[
        str, typer.Option(help="Recorder: the recent history's size, e.g. 64M.")
    ] = "64M",
    fmt: Annotated[Format, typer.Option("--format", help="Summary format.")] = Format.text,
) -> None:
    """Trace processes on this machine and write their attributed events as JSON lines."""
    try:
        history = parse_size(history_size, "--history-size")
        _agent_trace(
            out, pid or [], comm or [], cgroup or [], query_id_header, query_id_regex,
            duration, capture_bytes, ring_pages, probes, fmt,
            history if capture is Detail.recorder else 0,
        )  # fmt: skip
    except QtraceError as e:
        fail(e)


def _agent_trace(
    out: Path,
    pids: list[int],
    comms: list[str],
    cgroups: list[str],
    header: str | None,
    regex: str | None,
    duration: float | None,
    capture_bytes: int,
    ring_pages: int,
    probes: str,
    fmt: Format,
    history_bytes: int = 0,
) -> None:
    from agent import preflight
    from agent.extract import QueryIdExtractor
    from agent.groups import parse_groups
    from agent.probes import ProbeConfig, history_slots
    from agent.sink import JsonlSink
    from agent.targets import TargetSpec
    from agent.tracer import Tracer

    if header and regex:
        raise QtraceError("--query-id-header and --query-id-regex exclude each other", "pick one")
    if duration is not None and duration <= 0:
        raise QtraceError(f"--duration must be positive, not {duration}")
    if not 16 <= capture_bytes <= 4096 or capture_bytes & (capture_bytes - 1):
        raise QtraceError("--capture-bytes must be a power of two from 16 to 4096")
    if ring_pages < 1 or ring_pages & (ring_pages - 1):
        raise QtraceError("--ring-pages must be a power of two (1, 2, 4, ...)")
    extractor = (
        QueryIdExtractor.regex(regex) if regex else QueryIdExtractor.header(header or "X-Query-Id")
    )
    try:
        groups = parse_groups(probes.split(","))
    except ValueError as e:
        raise QtraceError(str(e)) from None
    spec = TargetSpec(pids=pids, comms=comms, cgroups=cgroups)
    preflight.check()
    spec.validate()
    if not out.parent.is_dir():
        raise QtraceError(f"cannot write {out}: {out.parent} is not a directory")
    sink = JsonlSink(out)
    tracer = Tracer(
        spec,
        sink,
        extractor,
        ProbeConfig(
            ring_pages=ring_pages,
            capture_bytes=capture_bytes,
            groups=groups,
            history_slots=history_slots(history_bytes) if history_bytes else 0,
        ),
    )

    stop_on_signals(tracer.stop_event)
    with tracer:
        err.print(
            f"[green]tracing[/] {len(tracer.stats()['targets'])} process(es) "
            f"-> {shown(out)} ({shown(extractor.description)}); Ctrl-C to stop",
            highlight=False,
        )
        tracer.run(duration)
    report(tracer.stats(), fmt)


def report(stats: dict[str, Any], fmt: Format) -> None:
    if fmt is Format.json:
        emit_json(stats)
        return
    table = Table(title="qtrace agent: events by kind", title_justify="left")
    for col in ("kind", "produced", "received", "lost ringbuf", "lost mapfull", "filtered"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind, row in stats["kinds"].items():
        lost = row["lost_ringbuf"] + row["lost_mapfull"]
        style = "red" if lost else None
        table.add_row(
            kind,
            str(row["produced"]),
            str(row["received"]),
            str(row["lost_ringbuf"]),
            str(row["lost_mapfull"]),
            str(row["filtered"]),
            style=style,
        )
    Console().print(table)
    colour = "red" if stats["lost"] else "green"
    recorded = (
        f", {stats['recorded']} kept in the recent history ({stats['summaries']} request summaries)"
        if stats.get("recorded")
        else ""
    )
    Console().print(
        f"[{colour}]{stats['written']} events written, {stats['lost']} lost[/]{recorded}",
        highlight=False,
    )


@app.command("run")
def agent_run(
    collector: CollectorOpt = DEFAULT_ADDR,
    node: Annotated[
        str | None, typer.Option(help="This node's name [NODE_NAME or the host name].")
    ] = None,
    scope_cgroup: Annotated[
        str | None,
        typer.Option(
            help="Only processes in this cgroup v2 subtree are this agent's "
            "(to run several agents on one machine as stand-ins for nodes)."
        ),
    ] = None,
    ring_pages: Annotated[
        int, typer.Option(help="Ring buffer per session, in 4 KiB pages (power of two).")
    ] = 1024,
    spool_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where batches wait on disk while the collector is away "
            "[/var/lib/qtrace/spool/NODE]; one agent per directory."
        ),
    ] = None,
    spool_max_bytes: Annotated[
        str, typer.Option(help="Bound of the spool (bytes, or with K, M, G).")
    ] = "1G",
    max_memory: Annotated[
        int, typer.Option(help="Memory cap in MiB: near it, queued batches go to the spool.")
    ] = 512,
    kubeconfig: Annotated[
        str | None,
        typer.Option(
            help="For sessions that target pods, outside a cluster "
            "[KUBECONFIG; in a pod: its service account]."
        ),
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(help="Serve /healthz and /readyz over HTTP on this port (0: any free one)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the node agent: apply the collector's sessions here and ship their events."""
    from agent import preflight
    from agent.runtime import AgentRuntime, default_node
    from agent.spool import MIN_BYTES
    from agent.targets import TargetSpec

    log_to_stderr(verbose)
    try:
        parse_addr(collector)
        preflight.check()
        if scope_cgroup:
            TargetSpec.cgroup_dir(scope_cgroup)
        if ring_pages < 1 or ring_pages & (ring_pages - 1):
            raise QtraceError("--ring-pages must be a power of two (1, 2, 4, ...)")
        spool_bytes = parse_size(spool_max_bytes, "--spool-max-bytes")
        if spool_bytes < MIN_BYTES:
            raise QtraceError(f"--spool-max-bytes must be at least {MIN_BYTES // 1024}K")
        if max_memory < 64:
            raise QtraceError(f"--max-memory is in MiB and must be at least 64, not {max_memory}")
        creds = credentials()
        creds.check()
        node = node or default_node()
        runtime = AgentRuntime(
            collector,
            node,
            scope=scope_cgroup,
            ring_pages=ring_pages,
            credentials=creds,
            spool_dir=spool_dir or Path("/var/lib/qtrace/spool") / node,
            spool_max_bytes=spool_bytes,
            max_memory=max_memory << 20,
            kubeconfig=kubeconfig,
        )
        health = None
        if health_port is not None:
            from agent.health import HealthServer

            try:
                health = HealthServer(
                    health_port, lambda: runtime.heartbeat, runtime.connected.is_set
                ).start()
            except OSError as e:
                raise QtraceError(f"cannot serve health on port {health_port} ({e})") from e
    except QtraceError as e:
        fail(e)
    stop_on_signals(runtime.stop_event)
    err.print(
        f"[green]agent[/] {shown(runtime.agent_id)} (node {shown(runtime.node)}) "
        f"-> collector {shown(collector)}",
        highlight=False,
    )
    if health is not None:
        err.print(f"health on http://0.0.0.0:{health.port}/healthz", highlight=False)
    try:
        runtime.run()
    finally:
        if health is not None:
            health.close()


def parse_size(text: str, option: str) -> int:
    """'1G', '512M', '64K' or plain bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in units else t
    if not digits.isdigit():
        raise QtraceError(f"{option} must be a size like 1G, 512M or 65536, not {text!r}")
    return int(digits) * scale
