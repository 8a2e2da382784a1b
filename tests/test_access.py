"""Access control against real collectors and agents, with certificates made by
`qtrace certs`: mutual TLS, tokens, namespace authorisation, the audit log."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from collector.auth import AuthConfig, is_loopback_peer
from qtrace.api.v1 import (
    anomalies_pb2,
    events_pb2,
    services_pb2,
    services_pb2_grpc,
    sessions_pb2,
)
from qtrace.certs import CA
from qtrace.channel import Credentials, describe, open_channel
from qtrace.errors import QtraceError
from tests.procs import (
    QTRACE,
    Agent,
    Collector,
    complete,
    joined,
    qtrace,
    qtrace_json,
    session_status,
    wait_for,
)
from tests.test_targets import workload

TLS_ENV = ("QTRACE_TLS_CA", "QTRACE_TLS_CERT", "QTRACE_TLS_KEY", "QTRACE_TOKEN")


def creds_env(d: Path, name: str, ca: Path | None = None) -> dict[str, str]:
    return {
        "QTRACE_TLS_CA": str(ca or d / "ca.pem"),
        "QTRACE_TLS_CERT": str(d / f"{name}.pem"),
        "QTRACE_TLS_KEY": str(d / f"{name}.key"),
    }


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with exactly the credentials given (none from this test's environment)."""
    base = {k: v for k, v in os.environ.items() if k not in TLS_ENV}
    return subprocess.run(
        [QTRACE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **(env or {})},
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pki")
    d, other = base / "ours", base / "other"
    qtrace("certs", "init", str(d), "--hosts", "collector.example,10.1.2.3", "--days", "30")
    qtrace("certs", "user", "alice", "--ca-dir", str(d), "--namespace", "team-a")
    qtrace("certs", "init", str(other))
    return {"ours": d, "other": other}


class Served(NamedTuple):
    addr: str
    audit: Path


@pytest.fixture(scope="module")
def tls_collector(
    pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    d = pki["ours"]
    db = tmp_path_factory.mktemp("tls") / "q.duckdb"
    col = Collector(
        db,
        args=[
            "--tls-cert", str(d / "collector.pem"), "--tls-key", str(d / "collector.key"),
            "--tls-ca", str(d / "ca.pem"), "--auth-config", str(d / "auth.toml"),
        ],
    )  # fmt: skip
    assert "(TLS)" in col.first_line
    yield Served(col.addr, db.parent / "q.audit.jsonl")
    col.stop()


def control(addr: str, creds: Credentials) -> services_pb2_grpc.ControlServiceStub:
    return services_pb2_grpc.ControlServiceStub(open_channel(addr, creds))


def user_creds(d: Path, name: str) -> Credentials:
    return Credentials(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")


class LoggedAgent:
    """`qtrace agent run` with its log in a file, to read what it says while retrying."""

    def __init__(self, addr: str, log: Path, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if k not in TLS_ENV}
        self.log = log
        with log.open("w") as f:
            self.proc = subprocess.Popen(
                [
                    QTRACE,
                    "agent",
                    "run",
                    "--collector",
                    addr,
                    "--node",
                    "refused",
                    "--spool-dir",
                    str(log.with_suffix(".spool")),
                ],  # one spool per agent
                stdout=subprocess.DEVNULL,
                stderr=f,
                env={**base, **env},
            )

    def said(self, text: str) -> bool:
        return text in self.log.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def test_certs_init_makes_a_working_set(pki: dict[str, Path], tmp_path: Path) -> None:
    d = pki["ours"]
    for key in ("ca", "collector", "agent", "admin", "alice"):
        assert stat.S_IMODE((d / f"{key}.key").stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((d / "collector.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"collector.example", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {
        "10.1.2.3",
        "127.0.0.1",
    }
    admin = x509.load_pem_x509_certificate((d / "admin.pem").read_bytes())
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    assert admin.issuer == ca.subject
    assert "[users.alice]" in (d / "auth.toml").read_text()

    again = cli("certs", "init", str(d))
    assert again.returncode == 2
    assert "already holds a CA" in again.stderr and "Traceback" not in again.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = cli("certs", "init", str(blocker / "sub"))
    assert bad.returncode == 2 and "cannot create" in bad.stderr
    no_ca = cli("certs", "user", "bob", "--ca-dir", str(tmp_path))
    assert no_ca.returncode == 2 and "qtrace certs init" in no_ca.stderr


def test_cli_without_credentials_or_with_foreign_ones_is_refused(
    pki: dict[str, Path], tls_collector: Served
) -> None:
    addr, d, other = tls_collector.addr, pki["ours"], pki["other"]
    plain = cli("status", "--collector", addr)
    assert plain.returncode == 2
    assert "refused a plaintext connection (it uses TLS)" in plain.stderr
    assert "--tls-ca" in plain.stderr and len(plain.stderr.strip().splitlines()) == 1

    no_cert = cli("status", "--collector", addr, env={"QTRACE_TLS_CA": str(d / "ca.pem")})
    assert "requires a client certificate" in no_cert.stderr

    foreign = cli("status", "--collector", addr, env=creds_env(other, "admin", d / "ca.pem"))
    assert "refused the client certificate" in foreign.stderr

    wrong_ca = cli("status", "--collector", addr, env=creds_env(d, "admin", other / "ca.pem"))
    assert "is not signed by --tls-ca" in wrong_ca.stderr

    as_agent = cli("status", "--collector", addr, env=creds_env(d, "agent"))
    assert as_agent.returncode == 2 and "is an agent" in as_agent.stderr

    ok = cli("status", "--collector", addr, "--format", "json", env=creds_env(d, "admin"))
    assert ok.returncode == 0, ok.stderr
    # Global options do the same as the variables.
    flags = ["--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / "admin.pem")]
    flags += ["--tls-key", str(d / "admin.key")]
    assert cli(*flags, "status", "--collector", addr).returncode == 0


def test_expired_client_certificate_is_named(pki: dict[str, Path], tmp_path: Path) -> None:
    ca = CA.load(pki["ours"])
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    (tmp_path / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    r = cli("status", env=creds_env(tmp_path, "old", pki["ours"] / "ca.pem"))
    assert r.returncode == 2 and "expired on" in r.stderr and "qtrace certs user" in r.stderr


def test_plaintext_and_foreign_agents_are_refused(
    pki: dict[str, Path], tls_collector: Served, tmp_path: Path
) -> None:
    addr = tls_collector.addr
    plain = LoggedAgent(addr, tmp_path / "plain.log", {})
    foreign = LoggedAgent(
        addr, tmp_path / "foreign.log", creds_env(pki["other"], "agent", pki["ours"] / "ca.pem")
    )
    try:
        wait_for(
            lambda: plain.said("refused a plaintext connection"), 30, "the plaintext agent's error"
        )
        wait_for(
            lambda: foreign.said("refused the client certificate"), 30, "the foreign agent's error"
        )
        assert plain.proc.poll() is None and foreign.proc.poll() is None, "agents keep retrying"
        # A user's certificate does not make an agent either.
        stub = services_pb2_grpc.AgentServiceStub(
            open_channel(addr, user_creds(pki["ours"], "alice"))
        )
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.WatchSessions(sessions_pb2.WatchSessionsRequest(agent_id="x"))))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        status = cli(
            "status", "--collector", addr, "--format", "json", env=creds_env(pki["ours"], "admin")
        )
        assert json.loads(status.stdout)["agents"] == []
    finally:
        plain.stop()
        foreign.stop()


def test_namespaces_started_by_and_the_audit_log(
    pki: dict[str, Path], tls_collector: Served
) -> None:
    addr, d = tls_collector.addr, pki["ours"]
    alice = control(addr, user_creds(d, "alice"))
    admin = control(addr, user_creds(d, "admin"))

    def start(stub: Any, **targets: Any) -> sessions_pb2.Session:
        req = services_pb2.StartSessionRequest(
            targets=sessions_pb2.Targets(**targets), duration_ns=60 * 10**9, started_by="mallory"
        )
        s: sessions_pb2.Session = stub.StartSession(req, timeout=10)
        return s

    mine = start(alice, namespaces=["team-a"])
    assert mine.started_by == "alice", "the authenticated identity, not the claimed name"
    for targets, why in (
        ({"namespaces": ["team-b"]}, "may not trace namespace 'team-b' (allowed: team-a)"),
        ({"namespaces": ["team-a", "team-b"]}, "namespace 'team-b'"),
        ({"namespaces": ["team-a"], "comms": ["sshd"]}, "host-level targets"),
        ({"pids": [1]}, "host-level targets"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            start(alice, **targets)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert why in (e.value.details() or "")
    theirs = start(admin, pids=[1])
    assert theirs.started_by == "admin"
    with pytest.raises(grpc.RpcError) as e:
        alice.StopSession(services_pb2.SessionRequest(session_id=theirs.id), timeout=10)
    msg = str(describe(e.value, addr, user_creds(d, "alice")))
    assert msg.startswith("permission denied by the collector: ") and "only they or an admin" in msg
    alice.StopSession(services_pb2.SessionRequest(session_id=mine.id), timeout=10)
    admin.StopSession(services_pb2.SessionRequest(session_id=theirs.id), timeout=10)

    # The CLI says the same in one line.
    r = cli("session", "start", "--comm", "x", "--collector", addr, env=creds_env(d, "alice"))
    assert r.returncode == 2 and r.stderr.startswith("qtrace: permission denied by the collector")

    lines = [json.loads(x) for x in tls_collector.audit.read_text().splitlines()]
    by_outcome = {(x["event"], x["outcome"], x["who"], x.get("session_id")) for x in lines}
    assert ("session.start", "ok", "alice", mine.id) in by_outcome
    assert ("session.stop", "ok", "alice", mine.id) in by_outcome
    assert ("session.stop", "refused", "alice", theirs.id) in by_outcome
    assert ("session.stop", "ok", "admin", theirs.id) in by_outcome
    refused = [x for x in lines if x["event"] == "session.start" and x["outcome"] == "refused"]
    assert {"namespaces": ["team-b"]} in [x["targets"] for x in refused]
    mallory = [x for x in refused if x.get("claimed") == "mallory"]
    assert len(mallory) == 4 and all(x["who"] == "alice" and x["via"] == "cert" for x in mallory)
    assert all(x["peer"].startswith("ipv4:127.0.0.1:") for x in lines)


def test_users_read_only_what_they_may_trace(pki: dict[str, Path], tls_collector: Served) -> None:
    addr, d = tls_collector.addr, pki["ours"]
    alice = control(addr, user_creds(d, "alice"))
    admin = control(addr, user_creds(d, "admin"))

    def start(stub: Any, ns: str) -> str:
        req = services_pb2.StartSessionRequest(
            targets=sessions_pb2.Targets(namespaces=[ns]), duration_ns=60 * 10**9
        )
        return str(stub.StartSession(req, timeout=10).id)

    mine, theirs = start(alice, "team-a"), start(admin, "team-b")
    # One query seen by each session, shipped over mTLS with the agent's certificate.
    ingest = services_pb2_grpc.AgentServiceStub(open_channel(addr, user_creds(d, "agent")))
    msgs = [events_pb2.AgentMessage(hello=events_pb2.Hello(agent_id="reader", node="n"))]
    for seq, (sid, qid) in enumerate(((mine, "q-a"), (theirs, "q-b")), 1):
        ev = events_pb2.Event(
            ts_ns=10**18,
            dur_ns=5,
            kind="pread64",
            pid=7,
            tid=7,
            mono_ns=1,
            query_id=qid,
            has_query_id=True,
        )
        b = events_pb2.EventBatch(agent_id="reader", node="n", session_id=sid, seq=seq, events=[ev])
        msgs.append(events_pb2.AgentMessage(batch=b))
    acks = [m.ack for m in ingest.Ingest(iter(msgs), timeout=30)]
    assert [a.seq for a in acks] == [1, 2]
    admin.ReportAnomalies(
        anomalies_pb2.ReportAnomaliesRequest(
            anomalies=[
                anomalies_pb2.Anomaly(
                    query_id="q-a", type=anomalies_pb2.ANOMALY_TYPE_MISMATCH, session_id=mine
                ),
                anomalies_pb2.Anomaly(
                    query_id="q-b", type=anomalies_pb2.ANOMALY_TYPE_MISMATCH, session_id=theirs
                ),
                anomalies_pb2.Anomaly(
                    query_id="q-b", type=anomalies_pb2.ANOMALY_TYPE_LATENCY
                ),  # no session
            ]
        ),
        timeout=10,
    )

    def refused(call: Any, request: Any) -> str:
        with pytest.raises(grpc.RpcError) as e:
            result = call(request, timeout=30)
            if hasattr(result, "__next__"):  # a stream fails when read
                list(result)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
        return e.value.details() or ""

    why = refused(alice.GetSession, services_pb2.SessionRequest(session_id=theirs))
    assert f"alice may not read session {theirs}" in why and "team-b" in why
    refused(alice.QueryEvents, services_pb2.QueryEventsRequest(query_id="q-b"))
    refused(alice.Explain, services_pb2.ExplainRequest(query_id="q-b"))
    refused(alice.ListAnomalies, anomalies_pb2.ListAnomaliesRequest(session_id=theirs))
    refused(alice.ListRequests, services_pb2.ListRequestsRequest(session_id=theirs))
    refused(
        alice.ReportAnomalies,
        anomalies_pb2.ReportAnomaliesRequest(
            anomalies=[
                anomalies_pb2.Anomaly(
                    query_id="q-b", type=anomalies_pb2.ANOMALY_TYPE_ERROR, session_id=theirs
                )
            ]
        ),
    )
    # What alice lists holds her session only; the admin sees both.
    listed = alice.ListSessions(services_pb2.ListSessionsRequest(), timeout=10).sessions
    assert mine in {s.id for s in listed} and theirs not in {s.id for s in listed}
    status = alice.Status(services_pb2.StatusRequest(), timeout=10)
    assert theirs not in {r.session_id for r in status.sessions}
    assert mine in {r.session_id for r in status.sessions}
    seen = alice.ListAnomalies(anomalies_pb2.ListAnomaliesRequest(), timeout=10).anomalies
    assert {a.query_id for a in seen} == {"q-a"}, "q-b's session-less report is hidden too"
    got = alice.QueryEvents(services_pb2.QueryEventsRequest(query_id="q-a"), timeout=30)
    assert [e.event.query_id for e in got.events] == ["q-a"]
    every = admin.ListAnomalies(anomalies_pb2.ListAnomaliesRequest(), timeout=10).anomalies
    assert {"q-a", "q-b"} <= {a.query_id for a in every}
    assert admin.QueryEvents(services_pb2.QueryEventsRequest(query_id="q-b"), timeout=30).events
    # The CLI says it in one line.
    r = cli("explain", "q-b", "--collector", addr, env=creds_env(d, "alice"))
    assert r.returncode == 2 and r.stderr.startswith("qtrace: permission denied by the collector")
    assert "may not read session" in r.stderr
    for sid in (mine, theirs):
        admin.StopSession(services_pb2.SessionRequest(session_id=sid), timeout=10)


def test_tokens_and_auth_required_on_loopback(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    qtrace("certs", "init", str(d))
    token = qtrace("certs", "user", "carol", "--ca-dir", str(d), "--token", "--host").stdout.strip()
    assert token.startswith("qt_") and token not in (d / "auth.toml").read_text()
    config = (
        (d / "auth.toml")
        .read_text()
        .replace("require_auth_on_loopback = false", "require_auth_on_loopback = true")
    )
    (d / "auth.toml").write_text(config)
    col = Collector(tmp_path / "q.duckdb", args=["--auth-config", str(d / "auth.toml")])
    try:
        anon = cli("session", "list", "--collector", col.addr)
        assert anon.returncode == 2 and "requires credentials" in anon.stderr, anon.stderr
        wrong = cli("session", "list", "--collector", col.addr, env={"QTRACE_TOKEN": "qt_nope"})
        assert "does not know the token" in wrong.stderr
        ok = cli(
            "session", "start", "--comm", "x", "--duration", "1s", "--collector", col.addr,
            "--format", "json", env={"QTRACE_TOKEN": token},
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        started = json.loads(ok.stdout)
        assert started["started_by"] == "carol"
        audit = tmp_path / "q.audit.jsonl"

        def expired() -> bool:
            lines = [json.loads(x) for x in audit.read_text().splitlines()]
            return any(
                x["event"] == "session.expire" and x["session_id"] == started["session_id"]
                for x in lines
            )

        wait_for(expired, 30, "the audit log's line for the session's expiry")
        plain_agent = LoggedAgent(col.addr, tmp_path / "agent.log", {})
        try:
            wait_for(lambda: plain_agent.said("requires credentials"), 30, "the agent's error")
        finally:
            plain_agent.stop()
    finally:
        col.stop()


def test_non_loopback_listen_needs_tls_or_insecure(tmp_path: Path) -> None:
    r = cli("collector", "run", "--db", str(tmp_path / "q.duckdb"), "--listen", "0.0.0.0:0")
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0:0 without TLS" in r.stderr and "--insecure" in r.stderr
    col = Collector(tmp_path / "q.duckdb", host="0.0.0.0", args=["--insecure"])
    try:
        assert "(plaintext)" in col.first_line
        assert cli("status", "--collector", col.addr).returncode == 0
    finally:
        col.stop()


def test_a_tls_agent_ships_events(
    pki: dict[str, Path], tls_collector: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, addr = pki["ours"], tls_collector.addr
    for k, v in creds_env(d, "admin").items():
        monkeypatch.setenv(k, v)  # the procs helpers' CLI calls act as the admin
    agent = Agent(addr, "tls-node", env=creds_env(d, "agent"))
    try:
        with workload(tmp_path, "w") as w:
            sid = qtrace_json(
                "session", "start", "--pid", str(w.pid), "--probes", "storage",
                "--duration", "2m", "--collector", addr,
            )["session_id"]  # fmt: skip
            wait_for(lambda: joined(addr, sid), 30, "the TLS agent to start tracing")
            w.do("pwrite 300")
            qtrace("session", "stop", sid, "--collector", addr)
            wait_for(lambda: complete(addr, sid), 30, "the agent's final batch")
        (a,) = session_status(addr, sid)["agents"]
        assert a["node"] == "tls-node" and a["dropped"] == 0
        assert a["drops"]["pwrite64"]["received"] == 300
        assert a["events_stored"] >= 300
    finally:
        agent.stop()


def test_auth_config_mistakes_are_errors_not_grants(tmp_path: Path) -> None:
    cases = {
        'role = "admin"\n': "unknown setting(s) role",
        '[users.bob]\nrole = "root"\n': "users.bob.role must be one of admin, user, agent",
        '[users.bob]\ntokens = ["qt_plaintexttoken"]\n': "store hashes, never tokens",
        '[users.bob]\nnamespace = ["a"]\n': "unknown key(s) namespace",
        '[users.a]\ncert_cn = "x"\n[users.b]\ncert_cn = "x"\n': "share the certificate 'x'",
        "[users.bob\n": "is not valid TOML",
    }
    for i, (text, why) in enumerate(cases.items()):
        f = tmp_path / f"c{i}.toml"
        f.write_text(text)
        with pytest.raises(QtraceError) as e:
            AuthConfig.load(f)
        assert why in str(e.value), text
    assert is_loopback_peer("ipv4:127.0.0.1:5000") and is_loopback_peer("ipv6:[::1]:5000")
    assert is_loopback_peer("ipv6:[::ffff:127.0.0.1]:5000")
    assert not is_loopback_peer("ipv4:10.0.0.1:5000") and not is_loopback_peer("ipv6:[fe80::1]:1")
