"""The collector's gRPC API against bad input, in a real server on a real store."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from collector.server import MAX_BATCH_EVENTS, Collector, serve
from qtrace.api.v1 import anomalies_pb2, events_pb2, services_pb2, services_pb2_grpc, sessions_pb2
from tests.conftest import REPO
from tests.procs import QTRACE


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Collector, grpc.Channel]]:
    srv, collector, port = serve("127.0.0.1:0", tmp_path / "c.duckdb")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield collector, channel
    channel.close()
    collector.stop()
    srv.stop(grace=None).wait()
    collector.store.close()


def start_session(channel: grpc.Channel) -> str:
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    s = ctl.StartSession(
        services_pb2.StartSessionRequest(
            targets=sessions_pb2.Targets(pids=[1]), duration_ns=60 * 10**9
        )
    )
    return str(s.id)


def event(i: int) -> events_pb2.Event:
    return events_pb2.Event(ts_ns=10**18 + i, dur_ns=5, kind="pread64", pid=7, tid=7, mono_ns=i)


def batch(sid: str, seq: int, n: int = 3, agent: str = "a1") -> events_pb2.EventBatch:
    return events_pb2.EventBatch(
        agent_id=agent, node="n", session_id=sid, seq=seq, events=[event(i) for i in range(n)]
    )


def ship(channel: grpc.Channel, *batches: events_pb2.EventBatch) -> list[events_pb2.BatchAck]:
    stub = services_pb2_grpc.AgentServiceStub(channel)
    msgs = [events_pb2.AgentMessage(hello=events_pb2.Hello(agent_id="a1", node="n"))]
    msgs += [events_pb2.AgentMessage(batch=b) for b in batches]
    return [m.ack for m in stub.Ingest(iter(msgs), timeout=30)]


def test_resent_batch_is_stored_once(server: tuple[Collector, grpc.Channel]) -> None:
    collector, channel = server
    sid = start_session(channel)
    acks = ship(channel, batch(sid, 1), batch(sid, 2))
    assert [(a.seq, a.stored, a.duplicate) for a in acks] == [(1, 3, False), (2, 3, False)]
    again = ship(channel, batch(sid, 2), batch(sid, 3))
    assert [(a.seq, a.stored, a.duplicate) for a in again] == [(2, 0, True), (3, 3, False)]
    assert collector.store.events_stored() == 9


def test_an_agent_gone_before_its_final_batch_shows_disconnected(
    server: tuple[Collector, grpc.Channel],
) -> None:
    _collector, channel = server
    sid = start_session(channel)
    ctl = services_pb2_grpc.ControlServiceStub(channel)

    def row() -> services_pb2.SessionAgentStats:
        (a,) = ctl.GetSession(services_pb2.SessionRequest(session_id=sid), timeout=10).agents
        return a

    ship(channel, batch(sid, 1))  # and the stream ends, with no final batch
    assert row().disconnected and not row().complete
    final = batch(sid, 2)
    final.final = True
    ship(channel, final)
    assert row().complete and not row().disconnected


def test_agents_long_gone_are_forgotten(server: tuple[Collector, grpc.Channel]) -> None:
    collector, channel = server
    sid = start_session(channel)
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    ship(channel, batch(sid, 1))  # agent a1 comes and goes
    assert [a.agent_id for a in ctl.Status(services_pb2.StatusRequest()).agents] == ["a1"]
    collector.forget_agents_ns = 0  # "long" is an hour in production
    stub = services_pb2_grpc.AgentServiceStub(channel)
    hello = events_pb2.AgentMessage(hello=events_pb2.Hello(agent_id="a2", node="n"))
    list(stub.Ingest(iter([hello]), timeout=30))
    assert [a.agent_id for a in ctl.Status(services_pb2.StatusRequest()).agents] == ["a2"]
    (row,) = ctl.GetSession(services_pb2.SessionRequest(session_id=sid)).agents
    assert row.agent_id == "a1" and row.disconnected, "its session row stays, disconnected"


@pytest.mark.parametrize(
    ("bad", "code", "says"),
    [
        (lambda sid: batch(sid, 0), grpc.StatusCode.INVALID_ARGUMENT, "seq must start at 1"),
        (lambda sid: batch(sid, 1, agent=""), grpc.StatusCode.INVALID_ARGUMENT, "agent_id"),
        (
            lambda sid: events_pb2.EventBatch(
                agent_id="a1", session_id=sid, seq=1, events=[events_pb2.Event(kind="read")]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ts_ns",
        ),
        (
            lambda sid: events_pb2.EventBatch(
                agent_id="a1",
                session_id=sid,
                seq=1,
                events=[events_pb2.Event(kind="read", ts_ns=1, detail_json="[1")],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "detail_json",
        ),
        (
            lambda sid: batch(sid, 1, n=MAX_BATCH_EVENTS + 1),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "send smaller batches",
        ),
        (lambda sid: batch("nope", 1), grpc.StatusCode.NOT_FOUND, "no session 'nope'"),
    ],
    ids=["seq0", "no-agent", "no-ts", "bad-json", "too-many-events", "unknown-session"],
)
def test_bad_batches_are_refused_and_others_still_served(
    server: tuple[Collector, grpc.Channel],
    bad: object,
    code: grpc.StatusCode,
    says: str,
) -> None:
    collector, channel = server
    sid = start_session(channel)
    with pytest.raises(grpc.RpcError) as err:
        ship(channel, bad(sid))  # type: ignore[operator]
    assert err.value.code() == code
    assert says in (err.value.details() or "")
    assert collector.store.events_stored() == 0
    # Everyone else is still served.
    assert [a.stored for a in ship(channel, batch(sid, 1, agent="a2"))] == [3]


def test_oversized_message(server: tuple[Collector, grpc.Channel]) -> None:
    _collector, channel = server
    sid = start_session(channel)
    huge = batch(sid, 1, n=1)
    huge.events[0].target = "x" * (17 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as err:
        ship(channel, huge)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (err.value.details() or "")


def test_unknown_session_in_control_calls(server: tuple[Collector, grpc.Channel]) -> None:
    _collector, channel = server
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    for call in (ctl.GetSession, ctl.StopSession):
        with pytest.raises(grpc.RpcError) as err:
            call(services_pb2.SessionRequest(session_id="missing"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_invalid_session_requests(server: tuple[Collector, grpc.Channel]) -> None:
    _collector, channel = server
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    for req, says in [
        (services_pb2.StartSessionRequest(), "needs a target"),
        (
            services_pb2.StartSessionRequest(
                targets=sessions_pb2.Targets(pids=[1]), probes=["bogus"]
            ),
            "unknown probe group",
        ),
        (
            services_pb2.StartSessionRequest(
                targets=sessions_pb2.Targets(pids=[1]),
                extractor=sessions_pb2.Extractor(regex="no-group"),
            ),
            "has no group",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            ctl.StartSession(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in (err.value.details() or "")


def test_health_and_reflection(server: tuple[Collector, grpc.Channel]) -> None:
    _collector, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "qtrace.api.v1.AgentService", "qtrace.api.v1.ControlService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    names = {
        s.name
        for r in refl.ServerReflectionInfo(iter([req]))
        for s in r.list_services_response.service
    }
    assert {"qtrace.api.v1.AgentService", "qtrace.api.v1.ControlService"} <= names


def test_cli_errors_are_one_line(server: tuple[Collector, grpc.Channel]) -> None:
    _collector, channel = server
    target = channel._channel.target().decode()  # type: ignore[attr-defined]
    cases = [
        (["status", "--collector", "127.0.0.1:1"], "cannot reach the collector at 127.0.0.1:1"),
        (["session", "list", "--collector", "nonsense"], "invalid collector address"),
        (["session", "status", "missing", "--collector", target], "no session 'missing'"),
        (["session", "start", "--collector", target], "needs a target"),
        (
            ["session", "start", "--pid", "1", "--duration", "x", "--collector", target],
            "invalid duration",
        ),
    ]
    for args, says in cases:
        r = subprocess.run([QTRACE, *args], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and says in lines[0], (args, r.stderr)


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True,
                   capture_output=True)  # fmt: skip
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "the generator produced nothing"
    for rel in generated:
        committed = REPO / rel
        assert committed.exists(), f"{rel} is generated but not committed"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run scripts/gen_protos.sh"
        )


def test_anomalies_from_every_source(
    server: tuple[Collector, grpc.Channel], tmp_path: Path
) -> None:
    _collector, channel = server
    target = channel._channel.target().decode()  # type: ignore[attr-defined]
    sid = start_session(channel)
    log = tmp_path / "a.jsonl"
    log.write_text(
        "\n".join(
            [
                json.dumps({"query_id": "q1", "type": "mismatch", "detail": {"paths": ["$.a"]},
                            "ts_ns": 5, "session_id": sid}),
                "{oops",
                json.dumps({"query_id": "q2", "type": "slow"}),
                json.dumps({"query_id": "q3", "type": "latency"}),
                "",
                json.dumps({"type": "error"}),
            ]
        )
        + "\n"
    )  # fmt: skip
    r = subprocess.run(
        [QTRACE, "anomaly", "import", str(log), "--collector", target, "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result = json.loads(r.stdout)
    assert result["accepted"] == 2
    assert [s["line"] for s in result["skipped"]] == [2, 3, 6]
    assert "'type' must be" in result["skipped"][1]["error"]
    subprocess.run(
        [QTRACE, "anomaly", "report", "--query-id", "q4", "--type", "error",
         "--detail", '{"target": "candidate"}', "--collector", target],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    ctl.ReportAnomalies(
        anomalies_pb2.ReportAnomaliesRequest(
            anomalies=[
                anomalies_pb2.Anomaly(query_id="q5", type=anomalies_pb2.ANOMALY_TYPE_LATENCY)
            ]
        )
    )
    with pytest.raises(grpc.RpcError) as err:
        ctl.ReportAnomalies(
            anomalies_pb2.ReportAnomaliesRequest(anomalies=[anomalies_pb2.Anomaly(query_id="q6")])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = json.loads(
        subprocess.run(
            [QTRACE, "anomalies", "--collector", target, "--format", "json"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )["anomalies"]  # fmt: skip
    assert {(a["query_id"], a["type"], a["source"]) for a in listed} == {
        ("q1", "mismatch", "import"), ("q3", "latency", "import"),
        ("q4", "error", "cli"), ("q5", "latency", "grpc"),
    }  # fmt: skip
    only = json.loads(
        subprocess.run(
            [QTRACE, "anomalies", "--session", sid, "--collector", target, "--format", "json"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )["anomalies"]  # fmt: skip
    assert [(a["query_id"], a["detail"]) for a in only] == [("q1", {"paths": ["$.a"]})]
