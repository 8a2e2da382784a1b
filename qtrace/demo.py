"""The local demo: the test search service traced end to end on this machine.

Starts a root and two leaves, traces them, sends queries with ids, and shows for each
query what the kernel saw on every process it touched."""

from __future__ import annotations

import sys
import tempfile
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from agent.model import Event
from agent.sink import JsonlSink
from agent.targets import TargetSpec
from agent.tracer import Tracer
from qtrace.errors import QtraceError
from searchsvc.client import make_queries, run_queries
from searchsvc.cluster import Cluster

N_QUERIES = 200
SHOWN = 8


class TeeSink(JsonlSink):
    """Writes the file and keeps the events for the summary."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.events: list[Event] = []

    def write(self, events: Sequence[Event]) -> None:
        super().write(events)
        self.events.extend(events)


def per_query_table(events: list[Event], roles: dict[int, str]) -> Table:
    table = Table(title=f"first {SHOWN} queries, as the kernel saw them", title_justify="left")
    for col in ("query id", "process", "events", "net ms", "storage ms", "preads", "index files"):
        table.add_column(col, justify="left" if col in ("query id", "process") else "right")
    grouped: dict[str, dict[int, list[Event]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        if e.query_id:
            grouped[e.query_id][e.pid].append(e)
    for qid in sorted(grouped)[:SHOWN]:
        for pid, evs in sorted(grouped[qid].items(), key=lambda kv: roles.get(kv[0], "")):
            net = sum(e.dur_ns for e in evs if e.group == "net") / 1e6
            sto = sum(e.dur_ns for e in evs if e.group == "storage") / 1e6
            preads = sum(e.kind == "pread64" for e in evs)
            files = {e.target for e in evs if e.kind == "pread64" and e.target}
            table.add_row(
                qid, f"{roles.get(pid, '?')} ({pid})", str(len(evs)), f"{net:.2f}",
                f"{sto:.2f}", str(preads), str(len(files)),
            )  # fmt: skip
        table.add_section()
    return table


def main() -> int:
    console = Console()
    out_dir = Path("out")
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "demo-events.jsonl"
    try:
        with tempfile.TemporaryDirectory(prefix="qtrace-demo-") as data, Cluster(Path(data)) as c:
            roles = {pid: role for role, pid in c.pids.items()}
            console.print(f"[bold]search service[/]: root {c.root_url}, leaves {c.leaf_urls}")
            sink = TeeSink(out)
            tracer = Tracer(TargetSpec(pids=list(c.pids.values())), sink).start()
            loop = threading.Thread(target=tracer.run, daemon=True)
            loop.start()
            queries = make_queries(N_QUERIES, seed=7)
            progress = Progress(
                TextColumn("queries"), BarColumn(), MofNCompleteColumn(), console=console
            )
            with progress:
                task = progress.add_task("q", total=len(queries))
                for i in range(0, len(queries), 20):
                    run_queries(c.root_url, queries[i : i + 20], concurrency=4)
                    progress.advance(task, 20)
            tracer.stop_event.set()
            loop.join()
            tracer.close()
            stats = tracer.stats()
    except QtraceError as e:
        Console(stderr=True).print(f"[bold red]qtrace:[/] {e}", highlight=False)
        return e.exit_code
    attributed = sum(1 for e in sink.events if e.query_id)
    console.print(per_query_table(sink.events, roles))
    console.print(
        f"{stats['written']} events ({attributed} attributed to {N_QUERIES} queries), "
        f"{stats['lost']} lost; all events in [bold]{out}[/] (JSON lines)",
        highlight=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
