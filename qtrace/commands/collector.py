"""`qtrace collector run`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

import typer

from qtrace.client import parse_addr
from qtrace.errors import QtraceError
from qtrace.output import err, fail, log_to_stderr, shown, stop_on_signals

app = typer.Typer(help="The collector: sessions, ingest, store, reads.", no_args_is_help=True)

ACCESS = "Access control"


@app.command("run")
def collector_run(
    listen: Annotated[str, typer.Option(help="Address to serve gRPC on.")] = "127.0.0.1:7070",
    db: Annotated[Path, typer.Option(help="DuckDB file (owned by this process).")] = Path(
        "qtrace.duckdb"
    ),
    tls_cert: Annotated[
        Path | None, typer.Option(help="Server certificate (PEM).", rich_help_panel=ACCESS)
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="Server private key.", rich_help_panel=ACCESS)
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(help="CA clients' certificates must be signed by.", rich_help_panel=ACCESS),
    ] = None,
    auth_config: Annotated[
        Path | None,
        typer.Option(help="Users, roles and namespaces (TOML).", rich_help_panel=ACCESS),
    ] = None,
    audit_log: Annotated[
        Path | None,
        typer.Option(help="JSON-lines audit log [DB.audit.jsonl].", rich_help_panel=ACCESS),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            help="Allow plaintext, unauthenticated clients on a non-loopback address.",
            rich_help_panel=ACCESS,
        ),
    ] = False,
    latency_factor: Annotated[
        float, typer.Option(help="A hop slower than this many times its kind's p75...")
    ] = 5.0,
    latency_min_ms: Annotated[
        float, typer.Option(help="...and this much slower than its median is a latency anomaly.")
    ] = 20.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve agents and engineers until SIGINT/SIGTERM."""
    import duckdb

    from collector.auth import AuthConfig, Security, ServerTLS
    from collector.server import serve

    log_to_stderr(verbose)
    try:
        parse_addr(listen, listening=True)
        if not db.parent.is_dir():
            raise QtraceError(f"cannot create {db}: {db.parent} is not a directory")
        if latency_factor < 1 or latency_min_ms < 0:
            raise QtraceError("--latency-factor must be >= 1 and --latency-min-ms >= 0")
        security = Security(
            tls=ServerTLS.load(tls_cert, tls_key, tls_ca),
            config=AuthConfig.load(auth_config) if auth_config else None,
            insecure=insecure,
            audit_log=audit_log,
        )
        try:
            server, collector, port = serve(listen, db, security)
        except duckdb.IOException as e:
            raise QtraceError(
                f"cannot open {db} ({e})".replace("\n", " "),
                "only one collector may own a database file: stop the other or use --db",
            ) from e
        except (OSError, RuntimeError) as e:
            raise QtraceError(f"cannot listen on {listen} ({e})", "pick another --listen") from e
    except QtraceError as e:
        fail(e)
    collector.latency_factor = latency_factor
    collector.latency_min_excess_ns = int(latency_min_ms * 1e6)
    stop = threading.Event()
    stop_on_signals(stop)
    host = listen.rpartition(":")[0]
    mode = "TLS" if security.tls else "plaintext"
    err.print(
        f"[green]collector[/] listening on {shown(host)}:{port}, store {shown(db)} ({mode})",
        highlight=False,
    )
    stop.wait()
    collector.stop()
    server.stop(grace=2.0).wait()
    collector.store.close()
