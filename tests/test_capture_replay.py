"""Capture live traffic through the agent and replay it; old vs new with rare faults."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from searchsvc.client import make_queries
from searchsvc.cluster import Cluster
from tests.httpstub import http_stub, json_answer, send
from tests.procs import QTRACE, Agent, Collector, complete, joined, qtrace, qtrace_json, wait_for


@dataclass
class Sent:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


def test_capture_reproduces_requests(tmp_path: Path) -> None:
    col = Collector(tmp_path / "q.duckdb")
    agent = Agent(col.addr, "node-a")
    sent: list[Sent] = []
    try:
        with Cluster(tmp_path / "svc") as c:
            # By pid: another qt-root on the machine (a test cluster) is not ours.
            root = str(c.pids["root"])
            start = ["session", "start", "--pid", root, "--collector", col.addr]
            heads = qtrace_json(*start, "--capture-requests")["session_id"]
            bodies = qtrace_json(*start, "--capture-bodies")["session_id"]
            for sid in (heads, bodies):
                wait_for(partial(joined, col.addr, sid), 30, "the agent to start tracing")
            for i in range(10):
                headers = {"X-Query-Id": f"cap-{i}", "X-Tenant": f"t{i % 3}"}
                if i % 2:
                    body: bytes | None = json.dumps({"q": f"red shoes {i}"}).encode()
                    headers["Content-Type"] = "application/json"
                    method, path = "POST", "/search"
                else:
                    body, method, path = None, "GET", f"/search?q=blue+{i}"
                assert send(c.root_url, method, path, headers, body) == 200
                sent.append(Sent(method, path, headers, body))
            for sid in (heads, bodies):
                qtrace("session", "stop", sid, "--collector", col.addr)
                wait_for(partial(complete, col.addr, sid), 60, "the agent's final batch")
        logs = {}
        for sid in (heads, bodies):
            out = tmp_path / f"{sid}.jsonl"
            qtrace("capture", "--session", sid, "--out", str(out), "--collector", col.addr)
            logs[sid] = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        agent.stop()
        col.stop()

    for sid, want_body in ((heads, False), (bodies, True)):
        got = {e["id"]: e for e in logs[sid]}
        assert set(got) == {r.headers["X-Query-Id"] for r in sent}
        for r in sent:
            g = got[r.headers["X-Query-Id"]]
            assert (g["method"], g["path"]) == (r.method, r.path)
            for k, v in r.headers.items():
                if k != "X-Query-Id":
                    assert g["headers"][k] == v
            if r.body is not None and want_body:
                assert g["body"].encode() == r.body
            else:
                assert "body" not in g

    # The captured log replays to the same requests.
    log = tmp_path / "replay.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in logs[bodies]))
    with http_stub(json_answer({"ok": True})) as (url, stub):
        done = subprocess.run(
            [QTRACE, "replay", "--no-report", "--format", "json", "--queries", str(log),
             "--primary", url, "--candidate", url, "--concurrency", "1"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    assert json.loads(done.stdout)["queries"] == 10
    replayed = {h["X-Query-Id"]: (m, p, h, b) for m, p, h, b in stub.requests}
    for r in sent:
        m, p, h, b = replayed[r.headers["X-Query-Id"]]
        assert (m, p) == (r.method, r.path)
        assert h["X-Tenant"] == r.headers["X-Tenant"]
        assert b == (r.body or b"")


def test_replay_finds_exactly_the_faulty_queries(tmp_path: Path) -> None:
    col = Collector(tmp_path / "q.duckdb")
    queries = make_queries(2000, seed=5)
    log = tmp_path / "queries.txt"
    log.write_text("".join(f"{q}\n" for _qid, q in queries))
    try:
        with (
            Cluster(tmp_path / "old1") as primary,
            Cluster(tmp_path / "old2") as secondary,
            Cluster(tmp_path / "new", fault_rate=1 / 800, deadline_ms=1000, fault_seed=3) as new,
        ):
            r = subprocess.run(
                [QTRACE, "replay", "--format", "json", "--queries", str(log),
                 "--template", "GET /search?q={query}", "--primary", primary.root_url,
                 "--secondary", secondary.root_url, "--candidate", new.root_url,
                 "--concurrency", "8", "--collector", col.addr],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            # Slow leaves record their answer after the root gave up on them.
            journals = {role: new.journal(role, settle_s=10) for role in new.pids}
        summary = json.loads(r.stdout)
        anomalies = qtrace_json("anomalies", "--collector", col.addr)["anomalies"]
    finally:
        col.stop()

    faulty = set()
    for j in journals.values():
        for rec in j["records"]:
            if rec.get("fault") in ("stale-index", "dropped-leaf"):
                faulty.add(rec["query_id"])
    assert summary["queries"] == 2000 and not summary["errors"]
    assert 2 <= len(faulty) <= 40, "the fault rate should give about 10 faulty queries"
    reported = {m["query_id"] for m in summary["mismatches"]}
    assert reported == faulty
    assert all("server_time_ns" not in p for m in summary["mismatches"] for p in m["paths"])
    assert "$.server_time_ns" in summary["noise_paths"]
    assert {(a["query_id"], a["type"]) for a in anomalies} == {(q, "mismatch") for q in faulty}
