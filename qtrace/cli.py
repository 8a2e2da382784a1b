"""The `qtrace` command."""

from __future__ import annotations

import typer

from qtrace.commands import (
    agent,
    anomaly,
    capture,
    certs,
    collector,
    credentials,
    explain,
    query,
    replay,
    session,
)

app = typer.Typer(
    name="qtrace",
    help="Explain the one bad search query with kernel evidence.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(credentials.options)
app.add_typer(agent.app, name="agent")
app.add_typer(collector.app, name="collector")
app.add_typer(session.app, name="session")
app.add_typer(query.app, name="query")
app.add_typer(anomaly.app, name="anomaly")
app.add_typer(certs.app, name="certs")
app.command("status")(query.status)
app.command("anomalies")(anomaly.anomalies)
app.command("replay")(replay.replay)
app.command("capture")(capture.capture)
app.command("explain")(explain.explain)
app.command("timeline")(explain.timeline)


@app.command("demo")
def demo() -> None:
    """Local end to end: old vs new with a rare fault, replayed, traced and explained."""
    from qtrace import demo as demo_module

    raise typer.Exit(demo_module.main())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
