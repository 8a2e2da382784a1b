"""Explain: the injected cause ranks first, normal queries stay quiet, gaps are said."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from qtrace.timeline import perfetto, render_html
from searchsvc.client import make_queries
from searchsvc.cluster import Cluster
from tests.procs import (
    QTRACE,
    Agent,
    Collector,
    complete,
    qtrace,
    qtrace_json,
    replay,
    start_session,
    wait_for,
)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Old twice and new with rare faults, the new one traced, 1500 queries replayed."""
    tmp = tmp_path_factory.mktemp("explain")
    col = Collector(tmp / "q.duckdb")
    agent = Agent(col.addr, "node-a")
    try:
        with (
            Cluster(tmp / "old-a") as old_a,
            Cluster(tmp / "old-b") as old_b,
            Cluster(
                tmp / "new",
                fault_rate=1 / 250,
                faults=("stale-index", "deadline", "cpu-starved", "lock-held"),
                deadline_ms=400,
                fault_seed=7,
            ) as new,
        ):
            sid = start_session(col.addr, new.pids.values())
            urls = (old_a.root_url, old_b.root_url, new.root_url)
            queries = [q for _i, q in make_queries(1500, seed=3)]
            summary = replay(tmp / "q.txt", queries, urls, sid, col.addr)
            qtrace("session", "stop", sid, "--collector", col.addr)
            wait_for(lambda: complete(col.addr, sid), 60, "the agent's final batch")
            journals = {role: new.journal(role, settle_s=10) for role in new.pids}
            yield col, summary, journals, dict(new.pids)
    finally:
        agent.stop()
        col.stop()


def explain(addr: str, qid: str) -> dict[str, Any]:
    result: dict[str, Any] = qtrace_json("explain", qid, "--collector", addr)
    return result


def collateral(journals: dict[str, Any]) -> set[str]:
    """Queries served (by any process: the root is not pinned and may share the CPU) while
    a hog was spinning for another query's fault: their CPU wait is real, but nobody
    injected it for them."""
    records = [r for j in journals.values() for r in j["records"]]
    spins = [r for r in records if r.get("fault") in ("cpu-starved", "lock-held")]
    return {
        r["query_id"]
        for r in records
        if r.get("fault") is None
        and any(r["start_ns"] < s["end_ns"] and s["start_ns"] < r["end_ns"] for s in spins)
    }


def _right(fault: str, leaf_pid: int, neighbour: int, x: dict[str, Any]) -> bool:
    """Whether the top finding names the injected cause: hop, category and culprit."""
    if not x["findings"]:
        return False
    top = x["findings"][0]
    if top["hop"]["pid"] != leaf_pid:
        return False
    first = top["culprits"][0] if top["culprits"] else {}
    if fault == "lock-held":
        return bool(top["category"] == "lock" and first.get("pid") == neighbour
                    and first.get("comm") == "qt-locker")  # fmt: skip
    if fault == "cpu-starved":
        return bool(top["category"] == "cpu" and first.get("pid") == neighbour
                    and first.get("comm") == "qt-hog")  # fmt: skip
    if fault == "stale-index":
        reads = {e["tid"] for e in top["evidence"] if e["kind"] == "pread64"}
        return bool(
            top["category"] == "storage" and ".idx.next" in top["summary"]
            and first.get("pid") == leaf_pid and "pwrite64" in first.get("kinds", [])
            and first.get("tid") not in reads
        )  # fmt: skip
    return bool(top["category"] == "other" and not top["culprits"])


def test_injected_causes_rank_first(replayed: Any) -> None:
    col, summary, journals, pids = replayed
    causes: dict[str, tuple[str, int, int]] = {}
    for role, j in journals.items():
        for rec in j["records"]:
            if rec.get("fault") in ("stale-index", "slow", "cpu-starved", "lock-held"):
                neighbour = rec.get("hog_pid") or rec.get("locker_pid") or 0
                causes[rec["query_id"]] = (rec["fault"], pids[role], neighbour)
    anomalous = {m["query_id"] for m in summary["mismatches"]}
    assert anomalous, "the faults should have produced mismatches"
    right: Counter[str] = Counter()
    wrong: dict[str, list[str]] = {}
    latency_only = {q for q, c in causes.items() if c[0] in ("cpu-starved", "lock-held")}
    for qid in sorted(anomalous | latency_only):
        if qid not in causes:
            continue  # e.g. a leaf that was slow for another reason: not injected
        fault, leaf_pid, neighbour = causes[qid]
        x = explain(col.addr, qid)
        if fault not in ("cpu-starved", "lock-held"):  # results unchanged: latency, if at all
            assert "mismatch" in {a["type"] for a in x["anomalies"]}
        assert len(x["hops"]) == 3
        if _right(fault, leaf_pid, neighbour, x):
            right[fault] += 1
        else:
            summary_of_top = x["findings"][0]["summary"] if x["findings"] else "no finding"
            wrong.setdefault(fault, []).append(f"{qid}: {summary_of_top}")
    # Recall, as bench/explain_accuracy.py measures it over more queries (0.97-1.00 there
    # for these classes). This run injects about three of each, and a 2-CPU machine this
    # busy can blur one rare case: a class may miss once, never more, and 85% overall.
    total = 0
    for fault in ("stale-index", "slow", "cpu-starved", "lock-held"):
        n = right[fault] + len(wrong.get(fault, []))
        total += n
        assert n >= 2, f"too few {fault} faults injected: {n}"
        assert right[fault] >= n - 1, (fault, wrong.get(fault))
    assert sum(right.values()) / total >= 0.85, wrong


def test_normal_queries_get_no_findings(replayed: Any) -> None:
    col, summary, journals, _pids = replayed
    anomalous = {m["query_id"] for m in summary["mismatches"]}
    faulty = {r["query_id"] for j in journals.values() for r in j["records"] if r.get("fault")}
    faulty |= collateral(journals)
    normal = sorted({r["query_id"] for r in journals["root"]["records"]} - anomalous - faulty)
    sample = normal[:: max(1, len(normal) // 40)][:40]
    noisy = [q for q in sample if explain(col.addr, q)["findings"]]
    # A 2-CPU machine running nine service processes does stall now and then; a stall that
    # big is worth reporting, but it must stay rare among normal queries.
    assert len(noisy) <= len(sample) // 10, f"false positives: {noisy}"


def test_unknown_and_eventless_queries_are_answered_clearly(replayed: Any) -> None:
    col = replayed[0]
    r = subprocess.run(
        [QTRACE, "explain", "no-such-query", "--collector", col.addr],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "is unknown" in r.stderr
    qtrace("anomaly", "report", "--query-id", "ghost", "--type", "error", "--collector", col.addr)
    x = explain(col.addr, "ghost")
    assert x["hops"] == [] and x["findings"] == []
    assert not x["completeness"]["complete"]
    assert "no kernel events" in x["completeness"]["reasons"][0]


def test_timelines(replayed: Any, tmp_path: Path) -> None:
    col, summary, _journals, _pids = replayed
    qid = summary["mismatches"][0]["query_id"]
    trace = tmp_path / "t.json"
    qtrace("timeline", qid, "--format", "perfetto", "-o", str(trace), "--collector", col.addr)
    events = json.loads(trace.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert slices and all(e["dur"] > 0 and e["ts"] >= 0 for e in slices)
    names = [e["args"]["name"] for e in events if e.get("name") == "process_name"]
    assert sum("qt-root" in n for n in names) == 1 and sum("qt-leaf" in n for n in names) >= 1
    starts = {e["id"] for e in events if e["ph"] == "s"}
    ends = {e["id"] for e in events if e["ph"] == "f"}
    assert len(starts) >= 1 and starts == ends, "sub-request flows from root to leaves"
    page = tmp_path / "t.html"
    qtrace("timeline", qid, "--format", "html", "-o", str(page), "--collector", col.addr)
    text = page.read_text()
    assert "<svg" in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_markup_in_traced_data_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    x = {
        "query_id": evil,
        "anomalies": [{"type": "mismatch"}],
        "hops": [{"node": evil, "pid": 1, "comm": evil, "start_ns": 0, "end_ns": 10,
                  "breakdown_ns": {"network": 1, "other": 9}}],
        "findings": [{"category": "storage", "score": 1.0, "summary": evil, "evidence": [],
                      "culprits": [{"comm": evil, "pid": 2, "node": evil, "tid": 3}]}],
        "completeness": {"complete": False, "reasons": [evil], "clock_uncertainty_ns": 0,
                         "events": 1},
    }  # fmt: skip
    ev = [{"node": evil, "pid": 1, "tid": 1, "comm": evil, "ts_ns": 1, "dur_ns": 2,
           "kind": "read", "group": "net", "target": evil, "ret": 0, "fd": 3}]  # fmt: skip
    page = render_html(x, ev)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert perfetto(x, ev)["metadata"]["query_id"] == evil  # JSON: data, not markup


def test_latency_outliers_become_anomalies(replayed: Any) -> None:
    col, _summary, journals, _pids = replayed
    slow = {
        r["query_id"]
        for j in journals.values()
        for r in j["records"]
        if r.get("fault") in ("slow", "cpu-starved", "lock-held")
    }
    assert slow, "the deadline fault should have produced slow leaves"

    def flagged() -> set[str]:
        found = qtrace_json("anomalies", "--collector", col.addr)["anomalies"]
        return {a["query_id"] for a in found if a["type"] == "latency"}

    # The collector looks for outliers every few seconds once events arrive.
    latency = wait_for(lambda: flagged() >= slow and flagged(), 30, "latency anomalies")
    faulty = {r["query_id"] for j in journals.values() for r in j["records"] if r.get("fault")}
    false_positives = latency - faulty - collateral(journals)
    details = {
        a["query_id"]: a["detail"]
        for a in qtrace_json("anomalies", "--collector", col.addr)["anomalies"]
        if a["query_id"] in false_positives
    }
    assert len(false_positives) <= max(3, len(latency) // 10), details
    detail = next(
        a["detail"]
        for a in qtrace_json("anomalies", "--collector", col.addr)["anomalies"]
        if a["type"] == "latency" and a["query_id"] in slow
    )
    assert detail["latency_ns"] > 5 * detail["median_ns"]


def test_html_timeline_renders_in_chromium(replayed: Any, tmp_path: Path) -> None:
    """Debian's headless Chromium opens the page offline and lays out the timeline."""
    col, summary, _journals, _pids = replayed
    qid = summary["mismatches"][0]["query_id"]
    page = tmp_path / "t.html"
    qtrace("timeline", qid, "--format", "html", "-o", str(page), "--collector", col.addr)
    profile = tmp_path / "profile"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=2000",
    ]  # fmt: skip
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert 'id="timeline"' in dom.stdout and 'id="findings"' in dom.stdout
    assert dom.stdout.count("<rect") >= 3
    shot = tmp_path / "t.png"
    subprocess.run(
        ["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
