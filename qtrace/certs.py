"""A small private CA and the certificates a qtrace install needs, plus bearer tokens.

Keys are ECDSA P-256 (fast to make, accepted by gRPC's TLS); private keys are written
0600 and never overwritten, so a CA cannot be lost by re-running a command."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector.auth import token_hash
from qtrace.errors import QtraceError

CA_DAYS = 3650
ROLES = ("admin", "user", "agent")
AGENT_NAME = "qtrace-agent"
# Certificates start a few minutes in the past: nodes' clocks are never exactly in step.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_new(path: Path, data: bytes, mode: int, replace: bool = False) -> None:
    """Created with its final mode (a key is never readable by others, not even briefly);
    ``replace`` swaps an existing file atomically (renewing a certificate)."""
    dest, path = path, path.with_name(path.name + ".new") if replace else path
    try:
        if replace:
            path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise QtraceError(
            f"{path} already exists", "pick another name or directory; nothing was overwritten"
        ) from None
    except OSError as e:
        raise QtraceError(f"cannot write {path} ({e.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if replace:
        os.replace(path, dest)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _writable_dir(d: Path) -> None:
    if d.exists() and not d.is_dir():
        raise QtraceError(f"{d} is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise QtraceError(f"cannot create {d} ({e.strerror})") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise QtraceError(f"cannot write into {d}", "pick a directory you can write to")


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


class CA:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, days: int = CA_DAYS) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"qtrace CA {secrets.token_hex(4)}"
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(name, issuer, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, d: Path) -> CA:
        cert_path, key_path = d / "ca.pem", d / "ca.key"
        if not cert_path.is_file() or not key_path.is_file():
            raise QtraceError(
                f"no CA in {d} (ca.pem and ca.key)", f"make one with `qtrace certs init {d}`"
            )
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise QtraceError(f"cannot read the CA in {d} ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise QtraceError(f"{key_path} is not a key made by `qtrace certs init`")
        return cls(cert, key)

    def save(self, d: Path) -> Issued:
        issued = Issued(d / "ca.pem", d / "ca.key")
        _write_new(issued.key, _key_pem(self.key), 0o600)
        _write_new(issued.cert, self.cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return issued

    def issue(
        self,
        d: Path,
        name: str,
        days: int,
        *,
        server_hosts: list[str] | None = None,
        file_stem: str | None = None,
        replace: bool = False,
    ) -> Issued:
        """A leaf certificate with CN ``name``: a server one if ``server_hosts`` is given
        (they become its subject alternative names), else a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (
            _builder(name, self.cert.subject, key, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if server_hosts:
            b = b.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in server_hosts]), critical=False
            )
        cert = b.sign(self.key, hashes.SHA256())
        stem = file_stem or name
        issued = Issued(d / f"{stem}.pem", d / f"{stem}.key")
        _write_new(issued.key, _key_pem(key), 0o600, replace)
        _write_new(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, replace)
        return issued


def check_name(name: str) -> str:
    """User names become file names and TOML keys: keep them plain."""
    ok = name and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)
    if not ok or name.startswith("."):
        raise QtraceError(
            f"invalid user name {name!r}", "use letters, digits, '-', '_' or '.' (at most 64)"
        )
    return name


def check_days(days: int) -> int:
    if not 1 <= days <= CA_DAYS:
        raise QtraceError(f"--days must be from 1 to {CA_DAYS}, not {days}")
    return days


def new_token() -> str:
    return "qt_" + secrets.token_urlsafe(32)


def user_entry(
    name: str,
    role: str,
    namespaces: list[str] | None = None,
    host: bool = False,
    tokens: list[str] | None = None,
) -> str:
    lines = [f"\n[users.{name}]", f'role = "{role}"']
    if namespaces:
        lines.append("namespaces = [" + ", ".join(f'"{n}"' for n in namespaces) + "]")
    if host:
        lines.append("host = true")
    if tokens:
        lines.append("tokens = [" + ", ".join(f'"{t}"' for t in tokens) + "]")
    return "\n".join(lines) + "\n"


AUTH_HEADER = """\
# Who may use this collector: `qtrace collector run --auth-config FILE`.
# A user is named by a client certificate's common name (cert_cn, default: the user's
# name) or by a bearer token (tokens: "sha256:..." hashes from `qtrace certs user --token`).
# role: admin (everything), user (sessions on `namespaces`; host-level targets such as
# --pid/--comm/--cgroup/--cmdline only with host = true; "*" is any namespace) or agent
# (node agents only).

# Plaintext connections from this machine without credentials act as a local admin,
# unless this is true.
require_auth_on_loopback = false
"""


def add_user_to_config(config: Path, name: str, entry: str) -> bool:
    """Appends ``entry`` unless the user is already there (returns False then: TOML has no
    safe way to edit a table in place without a writer, so that is left to the person)."""
    try:
        users = tomllib.loads(config.read_text()).get("users", {})
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise QtraceError(f"cannot read {config} ({e})") from None
    if name in users:
        return False
    with config.open("a", encoding="utf-8") as f:
        f.write(entry)
        f.flush()
        os.fsync(f.fileno())
    return True


def init(d: Path, hosts: list[str], days: int, admin: str) -> dict[str, Path]:
    """CA, collector server cert, agent and admin client certs, and an auth config."""
    check_days(days)
    check_name(admin)
    if admin == AGENT_NAME:
        raise QtraceError(f"the admin cannot be called {AGENT_NAME!r} (that is the agents')")
    _writable_dir(d)
    if (d / "ca.pem").exists() or (d / "ca.key").exists():
        raise QtraceError(
            f"{d} already holds a CA",
            f"add certificates with `qtrace certs user NAME --ca-dir {d}` or pick a new directory",
        )
    ca = CA.create()
    made = {"ca": ca.save(d).cert}
    server_hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost", "::1"]))
    server = ca.issue(d, "qtrace-collector", days, server_hosts=server_hosts, file_stem="collector")
    agent = ca.issue(d, AGENT_NAME, days, file_stem="agent")
    user = ca.issue(d, admin, days)
    made |= {
        "collector cert": server.cert,
        "collector key": server.key,
        "agent cert": agent.cert,
        "agent key": agent.key,
        f"{admin} cert": user.cert,
        f"{admin} key": user.key,
    }
    config = d / "auth.toml"
    body = AUTH_HEADER + user_entry(AGENT_NAME, "agent") + user_entry(admin, "admin")
    _write_new(config, body.encode(), 0o644)
    made["auth config"] = config
    return made


def add_user(
    d: Path,
    name: str,
    role: str,
    days: int,
    namespaces: list[str],
    host: bool,
    token: bool,
) -> tuple[Issued | None, str | None, bool]:
    """Issues a client certificate (or, with ``token``, a bearer token) for ``name`` and
    adds the user to DIR/auth.toml if it is there. Returns (cert, token, added)."""
    check_name(name)
    if role not in ROLES:
        raise QtraceError(f"unknown role {role!r}", f"use one of {', '.join(ROLES)}")
    check_days(days)
    ca = CA.load(d)
    _writable_dir(d)
    issued, secret = None, None
    if token:
        secret = new_token()
    else:
        if name in ("ca", "collector"):
            raise QtraceError(f"{name!r} names this directory's own files", "pick another name")
        issued = ca.issue(d, name, days, replace=True)
    config = d / "auth.toml"
    added = False
    if config.is_file():
        entry = user_entry(name, role, namespaces, host, [token_hash(secret)] if secret else None)
        added = add_user_to_config(config, name, entry)
    return issued, secret, added
