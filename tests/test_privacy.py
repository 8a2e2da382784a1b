"""Request bytes stay on the node unless a session captures them, and captured requests
are redacted on the node: checked on every byte the agent sent and in the whole store."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import duckdb
import grpc

from qtrace.api.v1 import services_pb2, services_pb2_grpc, sessions_pb2
from qtrace.redact import MARK
from searchsvc.cluster import Cluster
from tests.httpstub import http_stub, json_answer, send
from tests.procs import QTRACE, Agent, Collector, complete, joined, qtrace, qtrace_json, wait_for


class Relay:
    """A TCP relay between the agent and the collector that keeps a copy of every byte the
    agent sends: what left the node, whatever the agent's own accounting says."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                agent, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            # One thread per direction: neither waits on the other's peer.
            for src, dst, keep in ((agent, upstream, True), (upstream, agent, False)):
                threading.Thread(target=self._pipe, args=(src, dst, keep), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, keep: bool) -> None:
        try:
            while data := src.recv(65536):
                if keep:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # The other direction sees the close and ends too.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def shipped(self) -> bytes:
        with self._lock:
            return bytes(self.sent)

    def close(self) -> None:
        self._stop.set()
        self._server.close()


def secret(name: str) -> str:
    return f"SECRET{name}{uuid.uuid4().hex}"


def stored_text(db: Path) -> bytes:
    """Every value of every column of every table in the store, as bytes."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = bytearray()
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        assert {"events", "batches", "sessions", "anomalies", "drops"} <= set(tables)
        for t in tables:
            for row in con.execute(f'SELECT * FROM "{t}"').fetchall():
                for v in row:
                    out += v if isinstance(v, bytes) else str(v).encode()
                    out += b"\0"
        return bytes(out)
    finally:
        con.close()


@contextmanager
def traced_service(tmp: Path) -> Iterator[tuple[Collector, Relay, Cluster]]:
    """Collector, an agent that reaches it only through the relay, the search service."""
    col = Collector(tmp / "q.duckdb")
    relay = Relay(col.addr)
    agent = Agent(relay.addr, "node-p")
    try:
        with Cluster(tmp / "svc") as c:
            yield col, relay, c
    finally:
        agent.stop()
        relay.close()
        col.stop()


def run_session(
    col: Collector, c: Cluster, flags: list[str], requests: int, secrets: dict[str, str]
) -> str:
    # By pid: other search services on the machine are not this test's traffic.
    root = str(c.pids["root"])
    sid: str = qtrace_json(
        "session", "start", "--pid", root, "--collector", col.addr, *flags
    )["session_id"]  # fmt: skip
    wait_for(partial(joined, col.addr, sid), 30, "the agent to start tracing")
    for i in range(requests):
        headers = {
            "X-Query-Id": f"priv-{i}",
            "Authorization": f"Bearer {secrets['auth']}",
            "X-Api-Key": secrets["key"],
            "X-Visible": f"visible-{i}",
            "Content-Type": "application/json",
        }
        body = json.dumps({"q": f"red shoes {i}", "card": secrets["card"]}).encode()
        assert send(c.root_url, "POST", "/search", headers, body) == 200
    qtrace("session", "stop", sid, "--collector", col.addr)
    wait_for(partial(complete, col.addr, sid), 60, "the agent's final batch")
    return sid


def test_request_bytes_never_leave_the_node_without_capture(tmp_path: Path) -> None:
    secrets = {k: secret(k) for k in ("auth", "key", "card")}
    with traced_service(tmp_path) as (col, relay, c):
        sid = run_session(col, c, [], 20, secrets)
        shown = qtrace_json("query", "show", "priv-7", "--collector", col.addr)
        shipped = relay.shipped()
    # The relay saw the agent's batches (query ids are what a session ships) ...
    assert shown["events"] and all(e["session_id"] == sid for e in shown["events"])
    assert b"priv-7" in shipped
    # ... and no byte of any request beyond them: no header, no body.
    stored = stored_text(tmp_path / "q.duckdb")
    assert b"priv-7" in stored
    raw_file = (tmp_path / "q.duckdb").read_bytes()
    for name, value in secrets.items():
        for where, data in (("shipped", shipped), ("stored", stored), ("db file", raw_file)):
            assert value.encode() not in data, f"the {name} secret is in what was {where}"
    for data in (shipped, stored):
        assert b"visible-" not in data and b"red shoes" not in data


def test_capture_redacts_on_the_node_and_still_replays(tmp_path: Path) -> None:
    secrets = {k: secret(k) for k in ("auth", "key", "card")}
    log = tmp_path / "captured.jsonl"
    flags = ["--capture-bodies", "--redact-header", "authorization", "--redact-header",
             "X-Api-Key", "--redact", r"SECRETcard[0-9a-f]{32}"]  # fmt: skip
    with traced_service(tmp_path) as (col, relay, c):
        sid = run_session(col, c, flags, 10, secrets)
        status = qtrace_json("session", "status", sid, "--collector", col.addr)
        qtrace("capture", "--session", sid, "--out", str(log), "--collector", col.addr)
        shipped = relay.shipped()
    assert status["capture"]["redact"] == {
        "headers": ["authorization", "X-Api-Key"],
        "regexes": [r"SECRETcard[0-9a-f]{32}"],
    }
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(e["id"] for e in entries) == sorted(f"priv-{i}" for i in range(10))
    for e in entries:
        i = e["id"].removeprefix("priv-")
        assert e["headers"]["Authorization"] == MARK.decode()
        assert e["headers"]["X-Api-Key"] == MARK.decode()
        assert e["headers"]["X-Visible"] == f"visible-{i}"  # what no rule named is kept
        assert json.loads(e["body"]) == {"q": f"red shoes {i}", "card": MARK.decode()}
        assert "truncated" not in e  # Content-Length follows the redacted body
    # Captured requests did leave the node (the relay saw them), redacted already.
    assert b"visible-3" in shipped and MARK in shipped
    stored = stored_text(tmp_path / "q.duckdb")
    raw_file = (tmp_path / "q.duckdb").read_bytes()
    for name, value in secrets.items():
        for where, data in (("shipped", shipped), ("stored", stored), ("db file", raw_file),
                            ("captured log", log.read_bytes())):  # fmt: skip
            assert value.encode() not in data, f"the {name} secret is in what was {where}"

    # The redacted log replays: the same requests, with the markers in place of secrets.
    with http_stub(json_answer({"ok": True})) as (url, stub):
        done = subprocess.run(
            [QTRACE, "replay", "--no-report", "--format", "json", "--queries", str(log),
             "--primary", url, "--candidate", url, "--concurrency", "1"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["queries"] == 10 and not summary["errors"] and not summary["malformed_lines"]
    for method, path, headers, body in stub.requests:
        assert (method, path) == ("POST", "/search")
        assert headers["Authorization"] == MARK.decode()
        assert json.loads(body)["card"] == MARK.decode()


def test_bad_redaction_rules_are_clear_errors(tmp_path: Path) -> None:
    col = Collector(tmp_path / "q.duckdb")
    try:
        start = ["session", "start", "--comm", "x", "--collector", col.addr]
        for flags, message in [
            (["--capture-requests", "--redact", "("], "invalid --redact regex '('"),
            (["--capture-requests", "--redact", "a*"], "matches the empty string"),
            (["--capture-requests", "--redact-header", "Bad Header"], "invalid --redact-header"),
            (["--redact-header", "Authorization"], "add --capture-requests"),
        ]:
            r = qtrace(*start, *flags, check=False)
            assert r.returncode == 2, r.stderr
            assert message in r.stderr and "Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        r = qtrace("capture", "--session", "x", "--out", str(tmp_path / "o"), "--redact", "[",
                   "--collector", col.addr, check=False)  # fmt: skip
        assert r.returncode == 2 and "invalid --redact regex" in r.stderr
        # The collector checks the rules itself, whoever calls it.
        with grpc.insecure_channel(col.addr) as channel:
            ctl = services_pb2_grpc.ControlServiceStub(channel)
            for redact in (
                sessions_pb2.Redaction(regexes=["(unclosed"]),
                sessions_pb2.Redaction(headers=["a:b"]),
                sessions_pb2.Redaction(regexes=["x"] * 100),
            ):
                capture = sessions_pb2.Capture(requests=True, redact=redact)
                req = services_pb2.StartSessionRequest(
                    targets=sessions_pb2.Targets(comms=["x"]), capture=capture
                )
                try:
                    ctl.StartSession(req, timeout=10)
                    raise AssertionError(f"accepted {redact}")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    finally:
        col.stop()
