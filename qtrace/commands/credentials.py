"""The credentials every command that talks to the collector presents, given once before
the command: `qtrace --tls-ca ca.pem --tls-cert me.pem --tls-key me.key session list`, or
through the QTRACE_TLS_CA, QTRACE_TLS_CERT, QTRACE_TLS_KEY and QTRACE_TOKEN variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtrace.channel import ENV, Credentials
from qtrace.client import use_credentials

PEM = {"dir_okay": False, "rich_help_panel": "Collector credentials"}


def options(
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca", envvar=ENV["ca"], help="CA that signed the collector's certificate.", **PEM
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert", envvar=ENV["cert"], help="This client's certificate (PEM).", **PEM
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", envvar=ENV["key"], help="This client's private key.", **PEM),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=ENV["token"],
            help="Bearer token (prefer the variable: arguments are visible to other users).",
            rich_help_panel="Collector credentials",
        ),
    ] = None,
) -> None:
    """Explain the one bad search query with kernel evidence."""
    use_credentials(Credentials(tls_ca, tls_cert, tls_key, token))
