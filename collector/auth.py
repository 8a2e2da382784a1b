"""Who is calling the collector, and what they may do.

A caller is identified by a bearer token (``authorization: Bearer ...``) or, over mutual
TLS, by its client certificate's common name; both name a user of the auth config. A
plaintext caller without credentials is the local administrator when it connects over
loopback (unless the config says otherwise) or when the collector runs with --insecure.

Agents (role agent) may only use AgentService; people (admin, user) only ControlService.
Users start sessions on the namespaces they are given; host-level targets need ``host``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from collector.audit import AuditLog
from qtrace.api.v1 import services_pb2, sessions_pb2
from qtrace.errors import QtraceError

log = logging.getLogger("qtrace.collector")

ROLES = ("admin", "user", "agent")
AGENT_SERVICE = "/qtrace.api.v1.AgentService/"
CONTROL_SERVICE = "/qtrace.api.v1.ControlService/"
REFLECTION = "/grpc.reflection."
HEALTH = "/grpc.health.v1.Health/"
START = CONTROL_SERVICE + "StartSession"
STOP = CONTROL_SERVICE + "StopSession"
ANY_NAMESPACE = "*"
HOST_TARGETS = "host-level targets (--pid, --comm, --cgroup, --cmdline)"
NO_CREDENTIALS = (
    "this collector requires credentials: a client certificate "
    "(--tls-ca/--tls-cert/--tls-key) or a token (--token or QTRACE_TOKEN)"
)


def token_hash(token: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough, there is nothing to brute-force.
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    role: str
    cert_cn: str = ""
    tokens: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    host: bool = False


@dataclass(frozen=True)
class AuthConfig:
    users: tuple[User, ...] = ()
    require_auth_on_loopback: bool = False
    source: str = "(no --auth-config)"

    def by_cn(self, cn: str) -> User | None:
        return next((u for u in self.users if u.cert_cn and u.cert_cn == cn), None)

    def by_token(self, token: str) -> User | None:
        h = token_hash(token)
        for u in self.users:
            if any(hmac.compare_digest(h, t) for t in u.tokens):
                return u
        return None

    @classmethod
    def load(cls, path: Path) -> AuthConfig:
        if path.suffix in (".yaml", ".yml"):
            raise QtraceError(f"{path}: the auth config is TOML", "see `qtrace certs init`")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise QtraceError(f"cannot read the auth config {path} ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise QtraceError(f"{path} is not valid TOML ({e})") from None
        try:
            return cls._parse(raw, str(path))
        except ValueError as e:
            raise QtraceError(f"{path}: {e}") from None

    @classmethod
    def _parse(cls, raw: dict[str, Any], source: str) -> AuthConfig:
        # A typo in an access policy must not silently grant or deny: unknown keys fail.
        extra = set(raw) - {"users", "require_auth_on_loopback"}
        if extra:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(extra))}")
        loopback = raw.get("require_auth_on_loopback", False)
        if not isinstance(loopback, bool):
            raise ValueError("require_auth_on_loopback must be true or false")
        table = raw.get("users", {})
        if not isinstance(table, dict):
            raise ValueError("users must be a table: [users.NAME]")
        users = [_parse_user(name, u) for name, u in table.items()]
        seen: dict[str, str] = {}
        for u in users:
            for key in ([f"certificate {u.cert_cn!r}"] if u.cert_cn else []) + [
                f"token {t[:15]}..." for t in u.tokens
            ]:
                if key in seen:
                    raise ValueError(f"users {seen[key]} and {u.name} share the {key}")
                seen[key] = u.name
        return cls(tuple(users), loopback, source)


def _strings(name: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"users.{name}.{key} must be a list of strings")
    return tuple(value)


def _parse_user(name: str, u: Any) -> User:
    if not isinstance(u, dict):
        raise ValueError(f"users.{name} must be a table")
    extra = set(u) - {"role", "cert_cn", "tokens", "namespaces", "host"}
    if extra:
        raise ValueError(f"users.{name}: unknown key(s) {', '.join(sorted(extra))}")
    role = u.get("role", "user")
    if role not in ROLES:
        raise ValueError(f"users.{name}.role must be one of {', '.join(ROLES)}, not {role!r}")
    cn = u.get("cert_cn", name)
    if not isinstance(cn, str):
        raise ValueError(f"users.{name}.cert_cn must be a string")
    tokens = _strings(name, "tokens", u.get("tokens", []))
    for t in tokens:
        hexpart = t.removeprefix("sha256:")
        if not t.startswith("sha256:") or len(hexpart) != 64 or not _is_hex(hexpart):
            raise ValueError(
                f"users.{name}.tokens holds something that is not a token hash "
                '("sha256:<64 hex digits>"): store hashes, never tokens'
            )
    host = u.get("host", False)
    if not isinstance(host, bool):
        raise ValueError(f"users.{name}.host must be true or false")
    namespaces = _strings(name, "namespaces", u.get("namespaces", []))
    return User(name, role, cn, tokens, namespaces, host)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    via: str  # "cert", "token", "loopback" (no credentials) or "insecure" (no credentials)
    peer: str
    user: User | None = None

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    @property
    def unrestricted(self) -> bool:
        """An admin, or the unauthenticated local administrator: every namespace, every
        session, to start, stop and read."""
        return self.user is None or self.role == "admin"

    def audit(self) -> dict[str, Any]:
        return {"who": self.name, "role": self.role, "via": self.via, "peer": self.peer}


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def is_loopback_peer(peer: str) -> bool:
    """``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:/path`` (local by nature)."""
    kind, _, rest = peer.partition(":")
    if kind.startswith("unix"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback_listen(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


@dataclass(frozen=True)
class ServerTLS:
    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: Path | None, key: Path | None, ca: Path | None) -> ServerTLS | None:
        given = [p for p in (cert, key, ca) if p is not None]
        if not given:
            return None
        if len(given) != 3 or cert is None or key is None or ca is None:
            raise QtraceError(
                "--tls-cert, --tls-key and --tls-ca go together",
                "pass all three (`qtrace certs init DIR` makes them)",
            )
        data = []
        for p, what in ((cert, "--tls-cert"), (key, "--tls-key"), (ca, "--tls-ca")):
            try:
                data.append(p.read_bytes())
            except OSError as e:
                raise QtraceError(f"cannot read {what} {p} ({e.strerror})") from None
            if b"-----BEGIN" not in data[-1]:
                raise QtraceError(f"{what} {p} is not a PEM file")
        tls = cls(*data)
        tls.check(cert, key)
        return tls

    def check(self, cert_path: Path, key_path: Path) -> None:
        """gRPC reports a key that does not match, or a bad file, as failing to bind."""
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            cert = x509.load_pem_x509_certificate(self.cert)
        except ValueError:
            raise QtraceError(f"--tls-cert {cert_path} is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(self.key, password=None)
        except (ValueError, TypeError):
            raise QtraceError(
                f"--tls-key {key_path} is not an unencrypted PEM private key"
            ) from None
        der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*der) != key.public_key().public_bytes(*der):
            raise QtraceError(f"--tls-key {key_path} is not the key of --tls-cert {cert_path}")
        if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
            raise QtraceError(
                f"--tls-cert {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                "issue a new one from the same CA",
            )

    def credentials(self) -> grpc.ServerCredentials:
        # Mutual TLS: the handshake itself refuses clients without a certificate from the CA.
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )


@dataclass(frozen=True)
class Security:
    """How a collector is reached: TLS, who may do what, the audit log."""

    tls: ServerTLS | None = None
    config: AuthConfig | None = None
    insecure: bool = False
    audit_log: Path | None = None  # default: next to the database

    def check(self, listen: str) -> None:
        if self.tls is not None and self.insecure:
            raise QtraceError("--insecure and --tls-* exclude each other")
        if self.tls is not None and self.config is None:
            raise QtraceError(
                "a TLS collector needs --auth-config to know who its certificates name",
                "`qtrace certs init DIR` writes DIR/auth.toml",
            )
        if self.tls is None and not self.insecure and not is_loopback_listen(listen):
            raise QtraceError(
                f"refusing to listen on {listen} without TLS: anyone who can reach it could "
                "trace this machine's processes",
                "pass --tls-cert, --tls-key and --tls-ca (`qtrace certs init DIR` makes them) "
                "or, on a trusted network only, --insecure",
            )


def _targets_json(t: sessions_pb2.Targets) -> dict[str, Any]:
    return MessageToDict(t, preserving_proto_field_name=True)


class Access:
    """The policy, applied to calls; every session decision goes to the audit log."""

    def __init__(
        self,
        config: AuthConfig | None = None,
        audit: AuditLog | None = None,
        insecure: bool = False,
    ) -> None:
        self.config = config or AuthConfig()
        self.audit = audit
        self.insecure = insecure

    # -- who ------------------------------------------------------------------------------

    def identify(self, context: grpc.ServicerContext) -> Identity:
        peer = context.peer()
        token = _bearer(context.invocation_metadata() or ())
        if token is not None:
            user = self.config.by_token(token)
            if user is None:
                raise Denied(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this collector does not know the token: check --token/QTRACE_TOKEN, or "
                    "ask its admin for one (`qtrace certs user NAME --token`)",
                )
            return Identity(user.name, user.role, "token", peer, user)
        # The stubs say bytes; gRPC gives a list of values per property.
        cns: Any = context.auth_context().get("x509_common_name")
        if cns:
            cn = cns[0].decode(errors="replace")
            user = self.config.by_cn(cn)
            if user is None:
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate {cn!r} is not a user of this collector: add [users.{cn}] "
                    f"to {self.config.source}",
                )
            return Identity(user.name, user.role, "cert", peer, user)
        if self.insecure:
            return Identity("anonymous", "admin", "insecure", peer)
        if is_loopback_peer(peer) and not self.config.require_auth_on_loopback:
            return Identity("anonymous", "admin", "loopback", peer)
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, NO_CREDENTIALS)

    def check_method(self, who: Identity, method: str) -> None:
        if who.user is None:  # the local administrator runs agents and the CLI alike
            return
        if method.startswith(AGENT_SERVICE):
            if who.role != "agent":
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{who.name} (role {who.role}) may not act as an agent: agents need a "
                    "certificate or token whose user has role agent",
                )
        elif method.startswith((CONTROL_SERVICE, REFLECTION)):
            if who.role == "agent":
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{who.name} is an agent: agents may only ship events and watch sessions; "
                    "use a user's certificate or token",
                )
        else:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not served")

    # -- sessions -------------------------------------------------------------------------

    def start_refusal(self, who: Identity, t: sessions_pb2.Targets) -> str | None:
        user = who.user
        if user is None or who.unrestricted:
            return None
        allowed = user.namespaces
        host_level = bool(t.pids or t.comms or t.cgroups or t.cmdline_regexes)
        if (host_level or not t.namespaces) and not (user.host or ANY_NAMESPACE in allowed):
            what = HOST_TARGETS if host_level else "targets without a namespace"
            return f"{who.name} may not trace {what}: that needs host = true in the auth config"
        if ANY_NAMESPACE in allowed:
            return None
        for ns in t.namespaces:
            if ns not in allowed:
                mine = ", ".join(allowed) or "none"
                return f"{who.name} may not trace namespace {ns!r} (allowed: {mine})"
        return None

    def stop_refusal(self, who: Identity, s: sessions_pb2.Session) -> str | None:
        if who.unrestricted or s.started_by == who.name:
            return None
        return f"session {s.id} was started by {s.started_by}: only they or an admin may stop it"

    def read_refusal(self, who: Identity, s: sessions_pb2.Session) -> str | None:
        """What a session saw (events, explanations, captured requests, anomalies) is for
        whoever started it and whoever could have: a user given namespace A does not read
        what a session on namespace B recorded."""
        user = who.user
        if user is None or who.unrestricted or s.started_by == who.name:
            return None
        if self.start_refusal(who, s.targets) is None:
            return None
        mine = ", ".join(user.namespaces) or "none"
        return (
            f"{who.name} may not read session {s.id}: it traced "
            f"{json.dumps(_targets_json(s.targets), sort_keys=True)}, outside what "
            f"{who.name} may trace (namespaces: {mine})"
        )

    def authorize_start(
        self, request: services_pb2.StartSessionRequest, context: grpc.ServicerContext
    ) -> services_pb2.StartSessionRequest:
        """The request as it will be run: ``started_by`` is the authenticated identity."""
        who = self.identify(context)
        refusal = self.start_refusal(who, request.targets)
        if refusal is not None:
            self.record_refusal(START, request, who.audit(), refusal)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        req = services_pb2.StartSessionRequest()
        req.CopyFrom(request)
        if who.user is not None:
            req.started_by = who.name
        return req

    def authorize_stop(self, s: sessions_pb2.Session, context: grpc.ServicerContext) -> None:
        who = self.identify(context)
        refusal = self.stop_refusal(who, s)
        if refusal is not None:
            req = services_pb2.SessionRequest(session_id=s.id)
            self.record_refusal(STOP, req, who.audit(), refusal)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)

    # -- audit ----------------------------------------------------------------------------

    def record(
        self,
        event: str,
        outcome: str,
        s: sessions_pb2.Session | None,
        context: grpc.ServicerContext | None,
        **more: Any,
    ) -> None:
        if self.audit is None:
            return
        who: dict[str, Any] = {}
        if context is not None:
            try:
                who = self.identify(context).audit()
            except Denied:
                who = {"peer": context.peer()}
        fields: dict[str, Any] = {**who, **more}
        if s is not None:
            fields |= {
                "session_id": s.id,
                "started_by": s.started_by,
                "targets": _targets_json(s.targets),
            }
        self.audit.record(event, outcome, **fields)

    def record_refusal(self, method: str, request: Any, who: dict[str, Any], reason: str) -> None:
        if self.audit is None:
            return
        fields: dict[str, Any] = {**who, "reason": reason}
        if isinstance(request, services_pb2.StartSessionRequest):
            fields |= {"targets": _targets_json(request.targets)}
            if request.started_by:
                fields["claimed"] = request.started_by
        elif isinstance(request, services_pb2.SessionRequest):
            fields["session_id"] = request.session_id
        event = "session.start" if method == START else "session.stop"
        try:
            self.audit.record(event, "refused", **fields)
        except OSError as e:
            log.error("audit log: %s", e)  # the call is refused anyway


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            v = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = v.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else v
    return None


Behaviour = Callable[[Any, grpc.ServicerContext], Any]


class AuthInterceptor(grpc.ServerInterceptor):
    """Identifies the caller of every RPC and refuses what its role may not call. The
    handler is wrapped because only the call's context knows the peer and its certificate."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(HEALTH):
            return handler
        return _wrap(handler, lambda request, context: self._check(method, request, context))

    def _check(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        who: dict[str, Any] = {"peer": context.peer()}
        try:
            identity = self.access.identify(context)
            who = identity.audit()
            self.access.check_method(identity, method)
        except Denied as d:
            if method in (START, STOP):
                self.access.record_refusal(method, request, who, d.details)
            context.abort(d.code, d.details)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], check: Callable[[Any, grpc.ServicerContext], None]
) -> grpc.RpcMethodHandler[Any, Any]:
    kinds: list[tuple[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]]] = [
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ]
    for attr, make in kinds:
        behaviour: Behaviour | None = getattr(handler, attr)
        if behaviour is None:
            continue
        unary_request = not handler.request_streaming

        def guarded(
            request: Any,
            context: grpc.ServicerContext,
            behaviour: Behaviour = behaviour,
            unary_request: bool = unary_request,
        ) -> Any:
            # A request stream is not read here: the check needs only the caller.
            check(request if unary_request else None, context)
            return behaviour(request, context)

        return make(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler
