"""`qtrace certs init|user`: certificates and tokens for a small install."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtrace.errors import QtraceError
from qtrace.output import DEFAULT_FORMAT, Format, FormatOpt, emit_json, err, fail, out

app = typer.Typer(
    help="Certificates and tokens: a private CA, the collector's, agents' and users'.",
    no_args_is_help=True,
)

Days = Annotated[int, typer.Option(help="Days the certificates stay valid.")]


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write them (created if needed).")],
    hosts: Annotated[
        str,
        typer.Option(
            help="Comma-separated names/addresses agents and users reach the collector by "
            "(127.0.0.1 and localhost are always included)."
        ),
    ] = "",
    days: Days = 365,
    user: Annotated[str, typer.Option(help="Name of the admin user to make a certificate for.")] = (
        "admin"
    ),
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Make a CA, a collector certificate, an agent and an admin certificate, and auth.toml."""
    from qtrace import certs

    try:
        names = [h.strip() for h in hosts.split(",") if h.strip()]
        made = certs.init(directory, names, days, user)
    except QtraceError as e:
        fail(e)
    if fmt is Format.json:
        emit_json({k: str(v) for k, v in made.items()})
        return
    for what, path in made.items():
        out.print(f"{what:>16}  {path}", markup=False, highlight=False)
    d = directory
    err.print(
        "\nrun the collector with\n"
        f"  qtrace collector run --listen 0.0.0.0:7070 --tls-cert {d}/collector.pem "
        f"--tls-key {d}/collector.key --tls-ca {d}/ca.pem --auth-config {d}/auth.toml\n"
        "agents with\n"
        f"  qtrace --tls-ca {d}/ca.pem --tls-cert {d}/agent.pem --tls-key {d}/agent.key "
        "agent run --collector HOST:7070\n"
        f"{d}/ca.key signs new certificates: keep it away from the collector's machine.",
        markup=False,
        highlight=False,
    )


@app.command("user")
def user(
    name: Annotated[str, typer.Argument(help="User name: the certificate's common name.")],
    ca_dir: Annotated[Path, typer.Option(help="Directory made by `qtrace certs init`.")],
    role: Annotated[str, typer.Option(help="admin, user or agent.")] = "user",
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", help="Namespace the user may trace (repeatable; * = any)."),
    ] = None,
    host: Annotated[
        bool, typer.Option(help="May trace host-level targets (--pid, --comm, --cgroup).")
    ] = False,
    token: Annotated[
        bool, typer.Option(help="Make a bearer token instead of a certificate.")
    ] = False,
    days: Days = 365,
    fmt: FormatOpt = DEFAULT_FORMAT,
) -> None:
    """Issue a client certificate (or a token) for a user and add them to auth.toml."""
    from qtrace import certs

    try:
        issued, secret, added = certs.add_user(
            ca_dir, name, role, days, namespace or [], host, token
        )
    except QtraceError as e:
        fail(e)
    config = ca_dir / "auth.toml"
    if fmt is Format.json:
        emit_json(
            {
                "cert": str(issued.cert) if issued else None,
                "key": str(issued.key) if issued else None,
                "token": secret,
                "auth_config": str(config) if added else None,
            }
        )
        return
    if secret is not None:
        out.print(secret, markup=False, highlight=False)
        err.print(
            "the token above is shown once; only its hash is kept. Use it with "
            "QTRACE_TOKEN=... qtrace ...",
            markup=False,
            highlight=False,
        )
    if issued is not None:
        out.print(f"{issued.cert}\n{issued.key}", markup=False, highlight=False)
    if added:
        err.print(f"added [users.{name}] to {config}", markup=False, highlight=False)
    elif config.is_file():
        from collector.auth import token_hash

        what = f'tokens = ["{token_hash(secret)}"]' if secret else f"role = {role!r}"
        err.print(
            f"{name} is already in {config}: edit [users.{name}] there ({what})",
            markup=False,
            highlight=False,
        )
    else:
        err.print(
            f"no {config}: add [users.{name}] to the collector's --auth-config",
            markup=False,
            highlight=False,
        )
