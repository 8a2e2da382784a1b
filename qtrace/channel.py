"""One way to open a channel to the collector, for the CLI and the agent alike: plaintext
or mutual TLS, with an optional bearer token; and what a failed connection means."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from qtrace.errors import QtraceError

ENV = {
    "ca": "QTRACE_TLS_CA",
    "cert": "QTRACE_TLS_CERT",
    "key": "QTRACE_TLS_KEY",
    "token": "QTRACE_TOKEN",
}
TLS_HINT = (
    "pass --tls-ca, --tls-cert and --tls-key (or QTRACE_TLS_CA, QTRACE_TLS_CERT, QTRACE_TLS_KEY)"
)


@dataclass(frozen=True)
class Credentials:
    """What this process shows the collector. Empty: plaintext, no token."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return any(p is not None for p in (self.ca, self.cert, self.key))

    @classmethod
    def from_env(cls) -> Credentials:
        def path(name: str) -> Path | None:
            v = os.environ.get(ENV[name])
            return Path(v) if v else None

        return cls(path("ca"), path("cert"), path("key"), os.environ.get(ENV["token"]) or None)

    def check(self) -> None:
        """Fails early, with the remedy, on what would otherwise be an obscure handshake
        error later."""
        if (self.cert is None) != (self.key is None):
            raise QtraceError("--tls-cert and --tls-key go together", "pass both or neither")
        if self.cert is not None and self.ca is None:
            raise QtraceError(
                "--tls-cert needs --tls-ca", "pass the CA that signed the collector's certificate"
            )
        if self.token is not None and not self.token.strip():
            raise QtraceError("the token is empty", "check --token or QTRACE_TOKEN")
        for p, what in ((self.ca, "--tls-ca"), (self.cert, "--tls-cert"), (self.key, "--tls-key")):
            if p is not None and not p.is_file():
                raise QtraceError(f"{what} {p} does not exist (or is not a file)")
        if self.cert is not None:
            check_certificate(self.cert)


def _read(p: Path | None, what: str) -> bytes | None:
    if p is None:
        return None
    try:
        data = p.read_bytes()
    except OSError as e:
        raise QtraceError(f"cannot read {what} {p} ({e.strerror})") from None
    if b"-----BEGIN" not in data:
        raise QtraceError(f"{what} {p} is not a PEM file")
    return data


def check_certificate(path: Path) -> None:
    """An expired or not-yet-valid certificate is refused by the collector in a way the
    client cannot tell from other refusals; say it here instead."""
    from cryptography import x509

    data = _read(path, "--tls-cert")
    assert data is not None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise QtraceError(f"--tls-cert {path} is not a PEM certificate") from None
    now = dt.datetime.now(dt.UTC)
    cn = ", ".join(str(a.value) for a in cert.subject) or "?"
    if cert.not_valid_after_utc < now:
        raise QtraceError(
            f"the certificate {path} ({cn}) expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            "issue a new one: `qtrace certs user NAME --ca-dir DIR`",
        )
    if cert.not_valid_before_utc > now:
        raise QtraceError(
            f"the certificate {path} ({cn}) is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            "check this machine's clock",
        )


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _CallDetails(_Details, grpc.ClientCallDetails):
    pass


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call. (gRPC's own call credentials refuse plaintext
    channels, and a token over loopback plaintext is a supported way in.)"""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _with_token(self, d: Any) -> Any:
        return _CallDetails(
            d.method,
            d.timeout,
            [*(d.metadata or ()), self._md],
            d.credentials,
            d.wait_for_ready,
            d.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def open_channel(
    target: str, creds: Credentials, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    creds.check()
    if creds.tls:
        ssl = grpc.ssl_channel_credentials(
            _read(creds.ca, "--tls-ca"),
            _read(creds.key, "--tls-key"),
            _read(creds.cert, "--tls-cert"),
        )
        channel = grpc.secure_channel(target, ssl, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if creds.token is not None:
        channel = grpc.intercept_channel(channel, _Bearer(creds.token.strip()))
    return channel


def describe(e: grpc.RpcError, target: str, creds: Credentials) -> QtraceError:
    """One line that says what went wrong reaching the collector and what to do."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return QtraceError(f"the collector at {target} refused the call: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return QtraceError(f"permission denied by the collector: {details}")
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return QtraceError(f"collector: {details}")
    if "WRONG_VERSION_NUMBER" in details:
        return QtraceError(
            f"the collector at {target} does not use TLS",
            "leave out --tls-ca/--tls-cert/--tls-key (and QTRACE_TLS_*)",
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return QtraceError(
            f"the collector's certificate at {target} is not signed by --tls-ca {creds.ca}",
            "use the CA that signed the collector's certificate",
        )
    if "Hostname Verification" in details:
        return QtraceError(
            f"the collector's certificate does not name {target.rpartition(':')[0]}",
            "connect by a name it was made for (`qtrace certs init DIR --hosts ...`)",
        )
    # The server closing the connection during the handshake is how a mutual-TLS
    # collector refuses a client; only what this client offered tells the reasons apart.
    if "Socket closed" in details or "Connection reset" in details:
        if not creds.tls:
            return QtraceError(
                f"the collector at {target} refused a plaintext connection (it uses TLS)", TLS_HINT
            )
        if creds.cert is None:
            return QtraceError(
                f"the collector at {target} requires a client certificate",
                "pass --tls-cert and --tls-key (or QTRACE_TLS_CERT, QTRACE_TLS_KEY)",
            )
        return QtraceError(
            f"the collector at {target} refused the client certificate {creds.cert}",
            "it must be signed by the collector's CA: `qtrace certs user NAME --ca-dir DIR` "
            "issues one",
        )
    return QtraceError(
        f"cannot reach the collector at {target}",
        "start it with `qtrace collector run` or point --collector at it",
    )
