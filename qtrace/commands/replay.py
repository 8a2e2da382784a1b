"""`qtrace replay`: the same queries to old and new, compared, mismatches reported."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
from qtrace.replay.compare import CompareOptions
from qtrace.replay.querylog import Template, read
from qtrace.replay.report import Reporter
from qtrace.replay.runner import Outcome, Replayer, Summary, Target


def replay(
    queries: Annotated[Path, typer.Option("--queries", help="Query log (JSON lines or plain).")],
    primary: Annotated[str, typer.Option(help="Old deployment, http://HOST:PORT.")],
    candidate: Annotated[str, typer.Option(help="New deployment.")],
    secondary: Annotated[
        str | None, typer.Option(help="Old deployment again: its differences are noise.")
    ] = None,
    template: Annotated[
        str | None, typer.Option(help="For plain lines: 'METHOD /path?q={query} [BODY]'.")
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Queries per second (default: max).")] = None,
    concurrency: Annotated[int, typer.Option(help="Queries in flight.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 10.0,
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Path to ignore, e.g. $.took_ms.")
    ] = None,
    as_set: Annotated[
        list[str] | None, typer.Option("--set", help="Compare the list at this path as a set.")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Numeric tolerance (relative).")] = 0.0,
    query_id_header: Annotated[str, typer.Option(help="Header carrying the id.")] = "X-Query-Id",
    session: Annotated[
        str | None, typer.Option("--session", help="Attach anomalies to this session.")
    ] = None,
    report: Annotated[bool, typer.Option(help="Report anomalies to the collector.")] = True,
    collector: CollectorOpt = DEFAULT_ADDR,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Replay a query log against primary, candidate (and secondary); report mismatches."""
    try:
        targets = [Target.parse("primary", primary), Target.parse("candidate", candidate)]
        if secondary:
            targets.insert(1, Target.parse("secondary", secondary))
        tpl = Template.parse(template) if template else None
        if concurrency < 1 or concurrency > 1024:
            raise QtraceError("--concurrency must be between 1 and 1024")
        if rate is not None and rate <= 0:
            raise QtraceError("--rate must be positive")
        try:
            lines = queries.open(encoding="utf-8", errors="replace")
        except OSError as e:
            raise QtraceError(f"cannot read {queries}: {e.strerror}") from e
        reporter = Reporter(collector, session or "") if report else None
        replayer = Replayer(
            targets,
            CompareOptions(tuple(ignore or ()), tuple(as_set or ()), tolerance),
            header=query_id_header,
            concurrency=concurrency,
            rate=rate,
            timeout=timeout,
            on_outcome=reporter.add if reporter else None,
        )
    except QtraceError as e:
        fail(e)

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        replayer.stop.set()
        replayer.summary.interrupted = True

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    progress = Progress(
        TextColumn("[bold]replay[/]"),
        BarColumn(bar_width=None),
        TextColumn("{task.completed} queries"),
        TextColumn("{task.fields[rate]:.0f} q/s"),
        TextColumn("[red]{task.fields[mismatches]} mismatches[/]"),
        TextColumn("[yellow]{task.fields[errors]} errors[/]"),
        TimeElapsedColumn(),
        console=err,
        disable=fmt is Format.json or not err.is_terminal,
    )
    with lines, progress:
        task = progress.add_task("replay", total=None, rate=0.0, mismatches=0, errors=0)

        def tick(_o: Outcome) -> None:
            s = replayer.summary
            progress.update(
                task,
                completed=s.queries,
                rate=s.queries / max(progress.tasks[0].elapsed or 1e-9, 1e-9),
                mismatches=len(s.mismatches),
                errors=len(s.errors),
            )

        if reporter is None:
            replayer.on_outcome = tick
        else:
            rep = reporter

            def both(o: Outcome) -> None:
                rep.add(o)
                tick(o)

            replayer.on_outcome = both
        summary = replayer.run(read(iter(lines), tpl))
    if reporter is not None:
        reporter.close()
        summary.reported = reporter.sent
        summary.report_failures = reporter.failed
        if reporter.failed:
            err.print(
                f"[yellow]qtrace:[/] {reporter.failed} anomalies not reported to the collector "
                f"at {shown(collector)} ({shown(reporter.last_error)})",
                highlight=False,
            )
    if fmt is Format.json:
        emit_json(summary.to_json())
    else:
        print_summary(summary)
    if summary.interrupted:
        raise typer.Exit(130)


def print_summary(s: Summary) -> None:
    t = Table(title="replay summary", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("n", justify="right")
    t.add_row("queries sent", str(s.queries))
    t.add_row("compared", str(s.compared))
    t.add_row("[red]mismatches[/]", str(len(s.mismatches)))
    t.add_row("[yellow]target errors[/]", str(len(s.errors)))
    t.add_row("malformed lines", str(len(s.malformed)))
    t.add_row("reported to collector", f"{s.reported} ({s.report_failures} failed)")
    t.add_row("elapsed", f"{s.elapsed_s:.1f}s ({s.queries / max(s.elapsed_s, 1e-9):.0f} q/s)")
    out.print(t)
    if s.noise.paths:
        out.print(
            printable(
                "noise (differs between primary and secondary, ignored): "
                + ", ".join(f"{p} x{n}" for p, n in s.noise.paths.most_common(10))
            ),
            markup=False,
        )
    for m in s.mismatches[:20]:
        paths = ", ".join(m["paths"][:5])
        out.print(f"[red]mismatch[/] {shown(m['query_id'])}: {shown(paths)}", highlight=False)
    for e in s.errors[:10]:
        what = f"{e['query_id']} {e['target']}: {e['error']}"
        out.print(f"[yellow]error[/] {shown(what)}", highlight=False)
    for b in s.malformed[:10]:
        out.print(printable(f"line {b['line']}: {b['error']}"), markup=False, highlight=False)
    if s.interrupted:
        out.print("[yellow]interrupted: the summary covers what ran[/]")
