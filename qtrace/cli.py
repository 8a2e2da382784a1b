"""The `qtrace` command."""

from __future__ import annotations

import typer

from qtrace.commands import agent, collector, query, session

app = typer.Typer(
    name="qtrace",
    help="Explain the one bad search query with kernel evidence.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(agent.app, name="agent")
app.add_typer(collector.app, name="collector")
app.add_typer(session.app, name="session")
app.add_typer(query.app, name="query")
app.command("status")(query.status)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
