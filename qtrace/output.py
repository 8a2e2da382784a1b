"""How every command reports: rich text for people, one JSON object for programs."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console

from qtrace.client import DEFAULT_COLLECTOR
from qtrace.errors import QtraceError

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class Format(StrEnum):
    text = "text"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--format", help="Output format.")]
CollectorOpt = Annotated[
    str, typer.Option("--collector", help="Collector address HOST:PORT.", envvar="QTRACE_COLLECTOR")
]
DEFAULT_FORMAT = Format.text
DEFAULT_ADDR = DEFAULT_COLLECTOR


def fail(e: QtraceError) -> None:
    err.print(f"[bold red]qtrace:[/] {e}", markup=True, highlight=False)
    raise typer.Exit(e.exit_code)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


def ns_ago(ns: int, now_ns: int) -> str:
    if not ns:
        return "-"
    s = (now_ns - ns) / 1e9
    return f"{s:.1f}s ago" if s < 120 else f"{s / 60:.0f}m ago"
