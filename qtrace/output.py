"""How every command reports: rich text for people, one JSON object for programs."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from enum import StrEnum
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from qtrace.client import DEFAULT_COLLECTOR
from qtrace.errors import QtraceError

# No emoji codes: ":smile:" in a query id or a path is text, not a picture.
err = Console(stderr=True, soft_wrap=True, emoji=False)
out = Console(soft_wrap=True, emoji=False)


class Format(StrEnum):
    text = "text"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--format", help="Output format.")]
CollectorOpt = Annotated[
    str, typer.Option("--collector", help="Collector address HOST:PORT.", envvar="QTRACE_COLLECTOR")
]
RedactHeaderOpt = Annotated[
    list[str] | None,
    typer.Option("--redact-header", help="Mask this header's value in captured requests."),
]
RedactOpt = Annotated[
    list[str] | None,
    typer.Option("--redact", help="Mask every match of this regex in captured requests."),
]
DEFAULT_FORMAT = Format.text
DEFAULT_ADDR = DEFAULT_COLLECTOR


def log_to_stderr(verbose: bool) -> None:
    """Long-running commands (collector, agent) log here; -v shows what they do."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM ask for a clean stop (Python as PID 1 ignores SIGTERM)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def printable(value: object) -> str:
    """Text from outside (traced processes, agents, query logs, users) as a terminal should
    show it: control and format characters become visible escapes, so none can move the
    cursor, recolour the screen or reorder what follows. Print it with markup=False."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def shown(value: object) -> str:
    """``printable`` for text printed with markup on (or in a table title): rich markup in
    it shows literally instead of styling the output."""
    return escape(printable(value))


def fail(e: QtraceError) -> None:
    err.print(f"[bold red]qtrace:[/] {shown(e)}", markup=True, highlight=False)
    raise typer.Exit(e.exit_code)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


def ns_ago(ns: int, now_ns: int) -> str:
    if not ns:
        return "-"
    s = (now_ns - ns) / 1e9
    return f"{s:.1f}s ago" if s < 120 else f"{s / 60:.0f}m ago"
