"""End-to-end tests of the search service and its ground-truth journals."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from searchsvc.client import make_queries, run_queries
from searchsvc.cluster import Cluster, get_json
from searchsvc.diskio import MAX_STORM_MS as DISK_MAX_STORM_MS
from searchsvc.diskio import parse_storm, resident_pages
from searchsvc.faults import DEFAULT_FAULTS, FAULTS, FaultConfig, FaultDice
from searchsvc.hog import MAX_SPIN_MS, parse_spin
from searchsvc.index import (
    BLOCK_SIZE,
    Index,
    build_index,
    build_twins,
    doc_leaf,
    shard_path,
    twin_path,
)
from searchsvc.leaf import (
    LOCK_FILE,
    LOCK_HOLD_MS,
    SCRATCH_FILE,
    SCRATCH_MB,
    SLOW_FACTOR,
    STARVE_MS,
    default_cpu,
    shared_lock,
)
from searchsvc.locker import MAX_HOLD_MS, parse_hold
from searchsvc.netdelay import MAX_HOLD_MS as NET_MAX_HOLD_MS
from searchsvc.netdelay import parse_hold as parse_net_hold
from tests.procs import wait_for

SHARDS = 4


def _records_by_qid(journal: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_qid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in journal["records"]:
        by_qid[rec["query_id"]].append(rec)
    return by_qid


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _without_time(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "server_time_ns"}


def test_index_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    build_index(tmp_path / "a", leaf_id=3, n_buckets=64, shards=SHARDS)
    build_index(tmp_path / "b", leaf_id=3, n_buckets=64, shards=SHARDS)
    first = shard_path(tmp_path / "a", 0)
    mtime = first.stat().st_mtime_ns
    build_index(tmp_path / "a", leaf_id=3, n_buckets=64, shards=SHARDS)
    assert first.stat().st_mtime_ns == mtime, "rebuild rewrote an identical index"
    for shard in range(SHARDS):
        a = shard_path(tmp_path / "a", shard).read_bytes()
        assert a == shard_path(tmp_path / "b", shard).read_bytes()
        assert len(a) == BLOCK_SIZE * 65

    with Index.open(tmp_path / "a") as index:
        assert (index.leaf_id, index.shards, index.n_buckets) == (3, SHARDS, 64)
        postings, preads = index.lookup("kernel")
        assert preads == SHARDS
        assert postings and all(doc_leaf(doc) == 3 for doc, _ in postings)
        assert all(0.0 <= score < 1.0 for _, score in postings)
        assert index.lookup("kernel") == (postings, preads)


@pytest.mark.parametrize("keepalive", [True, False])
def test_cluster_journals_match_queries(tmp_path: Path, keepalive: bool) -> None:
    queries = make_queries(50, seed=7)
    terms = {qid: len(q.split()) for qid, q in queries}
    assert len(terms) == len(queries)

    with Cluster(tmp_path, shards=SHARDS) as cluster:
        pids = cluster.pids
        assert set(pids) == {"root", "leaf0", "leaf1"}
        results = run_queries(cluster.root_url, queries, concurrency=4, keepalive=keepalive)
        # A span ends just after its reply is sent: settle before reading.
        journals = {role: cluster.journal(role, settle_s=10) for role in pids}
    codes = cluster.returncodes

    assert [r["query_id"] for r in results] == [qid for qid, _ in queries]
    for r in results:
        assert r["status"] == 200, r
        assert r["leaves"] == 2 and all(n > 0 for n in r["leaf_hits"]), r
        # Every hit of both leaves, best first.
        assert len(r["hits"]) == sum(r["leaf_hits"]) <= 20
        assert r["hits"] == sorted(r["hits"], key=lambda h: (-h[1], h[0]))
        assert {doc_leaf(doc) for doc, _ in r["hits"]} == {0, 1}
        assert isinstance(r["body"]["server_time_ns"], int)
        assert r["latency_ns"] > 0

    root = journals["root"]
    assert root["pid"] == pids["root"] and root["total_preads"] == 0
    by_qid = _records_by_qid(root)
    assert set(by_qid) == set(terms)
    for qid, recs in by_qid.items():
        roles = Counter(rec["role"] for rec in recs)
        assert roles == {"root": 1, "fanout": 2}, (qid, recs)
        assert len({rec["tid"] for rec in recs}) == 3, "fan-out must use new threads"
        (top,) = [rec for rec in recs if rec["role"] == "root"]
        assert top["dropped_leaves"] == []
        for rec in recs:
            assert rec["fault"] is None
            assert rec["pid"] == pids["root"]
            assert top["start_ns"] <= rec["start_ns"] <= rec["end_ns"] <= top["end_ns"]

    fanouts = {
        qid: [rec for rec in recs if rec["role"] == "fanout"] for qid, recs in by_qid.items()
    }
    for leaf in ("leaf0", "leaf1"):
        journal = journals[leaf]
        assert journal["pid"] == pids[leaf]
        leaf_by_qid = _records_by_qid(journal)
        assert set(leaf_by_qid) == set(terms)
        for qid, recs in leaf_by_qid.items():
            (rec,) = recs
            assert rec["role"] == "leaf" and rec["pid"] == pids[leaf]
            assert rec["fault"] is None and "dropped_leaves" not in rec
            assert rec["preads"] == terms[qid] * SHARDS
            # Causality across processes on the shared monotonic clock: the
            # leaf started after some fan-out began and before it finished.
            assert any(f["start_ns"] <= rec["start_ns"] <= f["end_ns"] for f in fanouts[qid])
        assert journal["total_preads"] == sum(rec["preads"] for rec in journal["records"])
        assert journal["total_preads"] == SHARDS * sum(terms.values())

    assert codes == {"root": 0, "leaf0": 0, "leaf1": 0}
    assert all(_pid_gone(pid) for pid in pids.values())


def test_missing_query_id_passes_through(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        body = get_json(cluster.root_url, "/search?q=alpha")
        assert body["query_id"] is None and body["leaves"] == 2
        assert get_json(cluster.root_url, "/_health") == {"ok": True}
        root = cluster.journal("root", settle_s=10)
        leaf = cluster.journal("leaf0", settle_s=10)
    assert [r["query_id"] for r in root["records"]] == [None] * 3
    assert [(r["query_id"], r["preads"]) for r in leaf["records"]] == [(None, 4)]
    assert cluster.returncodes == {"root": 0, "leaf0": 0, "leaf1": 0}


def test_twins_shift_every_doc_id(tmp_path: Path) -> None:
    build_index(tmp_path, leaf_id=1, n_buckets=32, shards=SHARDS)
    contents = build_twins(tmp_path)
    assert len(contents) == SHARDS
    for shard in range(SHARDS):
        twin = twin_path(tmp_path, shard).read_bytes()
        assert twin == contents[shard]
        live = shard_path(tmp_path, shard).read_bytes()
        assert len(twin) == len(live) and twin[:BLOCK_SIZE] == live[:BLOCK_SIZE]
    with Index.open(tmp_path) as live_index, Index.open(tmp_path, twin=True) as twin_index:
        assert (twin_index.leaf_id, twin_index.shards) == (1, SHARDS)
        for term in ("kernel", "alpha", "zulu"):
            postings, preads = live_index.lookup(term)
            assert twin_index.lookup(term) == ([(d + 1, sc) for d, sc in postings], preads)


def test_fault_dice_is_reproducible_and_exclusive() -> None:
    config = FaultConfig(rate=0.05, seed=9)
    dice, again = FaultDice(config, 1), FaultDice(config, 1)
    a = [dice.draw() for _ in range(2000)]
    assert a == [again.draw() for _ in range(2000)]
    counts = Counter(a)
    assert set(counts) == {None, "stale-index", "deadline"}
    assert 50 <= counts["stale-index"] <= 150 and 50 <= counts["deadline"] <= 150
    assert [FaultDice(config, 2).draw() for _ in range(2000)] != a  # seeded per leaf
    old = FaultDice(FaultConfig(), 0)
    assert {old.draw() for _ in range(1000)} == {None}


def test_post_search_answers_like_get(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        url = cluster.root_url
        get_status, got = _request(
            url, "GET", "/search?q=kernel+probe", headers={"X-Query-Id": "g"}
        )
        body = json.dumps({"q": "kernel probe"}).encode()
        post_status, posted = _request(url, "POST", "/search", body, {"X-Query-Id": "g"})
        bad_status, bad = _request(url, "POST", "/search", b"[1]")
        missing_status, _ = _request(url, "POST", "/nowhere", b"{}")
        # Keep-alive: two POSTs and a GET on one connection.
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        try:
            answers = []
            for method, path, payload in [
                ("POST", "/search", body),
                ("POST", "/search", b'{"q": "alpha"}'),
                ("GET", "/search?q=alpha", None),
            ]:
                conn.request(method, path, body=payload)
                resp = conn.getresponse()
                answers.append((resp.status, json.loads(resp.read())))
        finally:
            conn.close()
        post_results = run_queries(url, [("p1", "kernel probe")], method="POST")
        root = cluster.journal("root", settle_s=10)

    assert get_status == post_status == 200
    assert _without_time(got) == _without_time(posted)
    assert got["query_id"] == "g" and got["leaves"] == 2 and got["hits"]
    assert got["server_time_ns"] != posted["server_time_ns"]
    assert abs(got["server_time_ns"] - time.time_ns()) < 60 * 10**9
    assert bad_status == 400 and "error" in bad
    assert missing_status == 404
    assert [a[0] for a in answers] == [200, 200, 200]
    assert _without_time(answers[0][1]) == {**_without_time(got), "query_id": None}
    assert _without_time(answers[1][1]) == _without_time(answers[2][1])
    assert post_results[0]["status"] == 200
    assert _without_time(post_results[0]["body"]) == {**_without_time(got), "query_id": "p1"}
    tops = [r for r in root["records"] if r["role"] == "root"]
    assert [r["query_id"] for r in tops] == ["g", "g", None, None, None, "p1"]
    assert root["in_flight"] == 0


def _expected_new_body(
    old: dict[str, Any], stale: set[int], dropped: list[int], n_leaves: int
) -> dict[str, Any]:
    """What the new root must answer, from the old answer and the journaled faults."""
    per_leaf: dict[int, list[list[float]]] = defaultdict(list)
    for doc, score in old["hits"]:
        per_leaf[doc_leaf(int(doc))].append(
            [doc + 1 if doc_leaf(int(doc)) in stale else doc, score]
        )
    kept = [leaf for leaf in range(n_leaves) if leaf not in dropped]
    hits = [hit for leaf in kept for hit in per_leaf[leaf]]
    return {
        "query_id": old["query_id"],
        "hits": sorted(hits, key=lambda h: (-h[1], h[0])),
        "leaves": len(kept),
        "leaf_hits": [n if leaf in kept else None for leaf, n in enumerate(old["leaf_hits"])],
    }


def test_new_mode_differs_exactly_on_journaled_faults(tmp_path: Path) -> None:
    n, rate, deadline_ms, seed = 300, 0.05, 300, 11
    queries = make_queries(n, seed=23)
    started = time.monotonic()
    with (
        Cluster(tmp_path / "old", shards=SHARDS) as old,
        Cluster(
            tmp_path / "new",
            shards=SHARDS,
            fault_rate=rate,
            deadline_ms=deadline_ms,
            fault_seed=seed,
        ) as new,
    ):
        old_results = run_queries(old.root_url, queries, concurrency=4)
        new_results = run_queries(new.root_url, queries, concurrency=4)
        elapsed = time.monotonic() - started
        # Settle: slow leaves and the root's late fan-outs finish after the answers.
        journals = {role: new.journal(role, settle_s=10) for role in new.pids}
        old_journals = {role: old.journal(role, settle_s=10) for role in old.pids}
        twins = sorted(p.name for p in (tmp_path / "new" / "leaf0").glob("*.next"))
        old_twins = list((tmp_path / "old" / "leaf0").glob("*.next"))
    assert new.returncodes == old.returncodes == {"root": 0, "leaf0": 0, "leaf1": 0}
    assert twins == [f"shard-{i}.idx.next" for i in range(SHARDS)] and not old_twins
    assert elapsed < 60, f"{n} queries took {elapsed:.1f}s"

    assert all(j["in_flight"] == 0 for j in [*journals.values(), *old_journals.values()])
    for j in old_journals.values():
        assert {r["fault"] for r in j["records"]} == {None}

    # Ground truth from the new deployment's journals.
    stale: dict[str, set[int]] = defaultdict(set)
    slow: dict[str, set[int]] = defaultdict(set)
    for leaf in range(2):
        recs = journals[f"leaf{leaf}"]["records"]
        assert sorted(r["query_id"] for r in recs) == sorted(q for q, _ in queries)
        # One draw per query: the leaf's fault counts depend on the seed only.
        dice = FaultDice(FaultConfig(rate=rate, deadline_ms=deadline_ms, seed=seed), leaf)
        expected = Counter(dice.draw() for _ in range(n))
        faults = Counter(r["fault"] for r in recs)
        assert faults == {
            None: expected[None],
            "stale-index": expected["stale-index"],
            "slow": expected["deadline"],
        }
        # Roughly 5% each (n * rate = 15).
        assert 5 <= faults["stale-index"] <= 30 and 5 <= faults["slow"] <= 30, faults
        for r in recs:
            if r["fault"] == "stale-index":
                stale[r["query_id"]].add(leaf)
            elif r["fault"] == "slow":
                slow[r["query_id"]].add(leaf)
                assert r["end_ns"] - r["start_ns"] >= deadline_ms * 1.5 * 1e6

    root_by_qid = _records_by_qid(journals["root"])
    dropped: dict[str, list[int]] = {}
    for qid, recs in root_by_qid.items():
        (top,) = [r for r in recs if r["role"] == "root"]
        dropped[qid] = top["dropped_leaves"]
        assert top["fault"] == ("dropped-leaf" if top["dropped_leaves"] else None)
        fanouts = [r for r in recs if r["role"] == "fanout"]
        assert len(fanouts) == 2
        # Each dropped leaf's fan-out ends after the root gave up on it, and says so.
        late = [r for r in fanouts if r["fault"] == "late"]
        assert len(late) == len(top["dropped_leaves"])
        assert all(r["end_ns"] > top["start_ns"] + deadline_ms * 10**6 for r in late)
        assert all(
            r["fault"] is None and r["end_ns"] <= top["end_ns"] for r in fanouts if r not in late
        )
    assert set(root_by_qid) == {q for q, _ in queries}
    faulty = set(stale) | {qid for qid, leaves in dropped.items() if leaves}

    # Compare the two deployments' answers, server_time_ns aside.
    differ = set()
    for o, nw in zip(old_results, new_results, strict=True):
        assert o["status"] == nw["status"] == 200, (o, nw)
        assert o["body"]["server_time_ns"] != nw["body"]["server_time_ns"]
        if _without_time(o["body"]) != _without_time(nw["body"]):
            differ.add(nw["query_id"])
        # And every difference is exactly the journaled fault's effect.
        qid = nw["query_id"]
        assert _without_time(nw["body"]) == _expected_new_body(
            o["body"], stale.get(qid, set()), dropped[qid], 2
        ), qid
    assert differ == faulty
    assert {qid for qid, leaves in dropped.items() if leaves}, "no leaf was ever dropped"
    assert stale, "no query was answered from a stale index"
    assert 0.05 * n <= len(faulty) <= 0.4 * n, len(faulty)
    # A slow leaf is normally dropped (it answers 1.5 deadlines late); only a root
    # stalled for half a deadline could still take its answer.
    slow_pairs = {(q, leaf) for q, leaves in slow.items() for leaf in leaves}
    dropped_pairs = {(q, leaf) for q, leaves in dropped.items() for leaf in leaves}
    assert len(slow_pairs & dropped_pairs) >= 0.8 * len(slow_pairs)


def test_cpu_starved_is_opt_in_and_keeps_the_other_draws() -> None:
    assert "cpu-starved" in FAULTS and "cpu-starved" not in DEFAULT_FAULTS
    assert FaultConfig().faults == DEFAULT_FAULTS
    assert not FaultConfig(rate=0.5).enabled("cpu-starved")
    both = FaultConfig(rate=0.05, seed=9)
    three = FaultConfig(rate=0.05, faults=(*DEFAULT_FAULTS, "cpu-starved"), seed=9)
    dice_a, dice_b = FaultDice(both, 1), FaultDice(three, 1)
    a = [dice_a.draw() for _ in range(2000)]
    b = [dice_b.draw() for _ in range(2000)]
    # Adding cpu-starved only turns some of the no-fault draws into it.
    assert all(y == x or (x is None and y == "cpu-starved") for x, y in zip(a, b, strict=True))
    assert 50 <= Counter(b)["cpu-starved"] <= 150
    alone = FaultConfig(rate=0.05, faults=("cpu-starved",), seed=9)
    dice = FaultDice(alone, 1)
    assert {dice.draw() for _ in range(2000)} == {None, "cpu-starved"}


def test_hog_protocol() -> None:
    assert parse_spin("spin 80\n") == 80
    assert parse_spin(f"spin {MAX_SPIN_MS * 10}") == MAX_SPIN_MS
    assert [parse_spin(t) for t in ("spin", "spin -1", "spin 1.5", "halt 3", "")] == [None] * 5
    cpu = max(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [sys.executable, "-m", "searchsvc.hog", "--cpu", str(cpu)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert hog.stdin is not None and hog.stdout is not None
    try:
        assert hog.stdout.readline() == "ready\n"
        assert Path(f"/proc/{hog.pid}/comm").read_text() == "qt-hog\n"
        assert os.sched_getaffinity(hog.pid) == {cpu}
        hog.stdin.write("spin 2\nbogus\nspin 1\n")
        hog.stdin.flush()
        lines = [hog.stdout.readline() for _ in range(5)]
        assert lines[:2] == lines[3:] == ["spinning\n", "done\n"]
        assert lines[2].startswith("error")
        hog.stdin.close()
        assert hog.wait(10) == 0
    finally:
        if hog.poll() is None:
            hog.kill()
        hog.wait()
        hog.stdout.close()


def _thread_affinities(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_cpu_starved_only_delays_the_journaled_queries(tmp_path: Path) -> None:
    n, rate, seed = 200, 0.05, 5
    faults = ("cpu-starved",)
    queries = make_queries(n, seed=31)
    started = time.monotonic()
    with (
        Cluster(tmp_path / "old", shards=SHARDS) as old,
        Cluster(
            tmp_path / "new", shards=SHARDS, fault_rate=rate, faults=faults, fault_seed=seed
        ) as new,
    ):
        assert old.hog_pids == {}
        hogs = new.hog_pids
        assert set(hogs) == {"leaf0", "leaf1"}
        cpus = {f"leaf{i}": default_cpu(i) for i in range(2)}
        for role, hog in hogs.items():
            # The hog is its own process, named qt-hog, on its leaf's one CPU.
            assert hog not in new.pids.values()
            assert Path(f"/proc/{hog}/comm").read_text() == "qt-hog\n"
            assert os.sched_getaffinity(hog) == {cpus[role]}
            assert _thread_affinities(new.pids[role]) == {frozenset({cpus[role]})}
        if len(os.sched_getaffinity(0)) == 2:
            assert cpus == {"leaf0": 1, "leaf1": 0}
        assert _thread_affinities(new.pids["root"]) == {frozenset(os.sched_getaffinity(0))}

        old_results = run_queries(old.root_url, queries, concurrency=2)
        new_results = run_queries(new.root_url, queries, concurrency=2)
        journals = {role: new.journal(role, settle_s=10) for role in ("leaf0", "leaf1")}
    elapsed = time.monotonic() - started
    assert new.returncodes == old.returncodes == {"root": 0, "leaf0": 0, "leaf1": 0}
    assert all(_pid_gone(pid) for pid in [*hogs.values(), *new.pids.values()])
    assert elapsed < 60, f"{n} queries took {elapsed:.1f}s"

    # Only the latency changes: every answer is the old one.
    for o, nw in zip(old_results, new_results, strict=True):
        assert o["status"] == nw["status"] == 200, (o, nw)
        assert _without_time(o["body"]) == _without_time(nw["body"]), nw["query_id"]

    starved: set[str] = set()
    terms = {qid: len(q.split()) for qid, q in queries}
    for leaf in range(2):
        journal = journals[f"leaf{leaf}"]
        assert journal["in_flight"] == 0
        recs = journal["records"]
        assert sorted(r["query_id"] for r in recs) == sorted(terms)
        dice = FaultDice(FaultConfig(rate=rate, faults=faults, seed=seed), leaf)
        expected = Counter(dice.draw() for _ in range(n))
        assert Counter(r["fault"] for r in recs) == {
            None: expected[None],
            "cpu-starved": expected["cpu-starved"],
        }
        assert 2 <= expected["cpu-starved"] <= 25, expected
        for r in recs:
            assert r["preads"] == terms[r["query_id"]] * SHARDS
            if r["fault"] == "cpu-starved":
                assert r["hog_pid"] == hogs[f"leaf{leaf}"]
                # The handler could not run while the hog spun on its CPU.
                assert r["end_ns"] - r["start_ns"] >= STARVE_MS * 10**6
                starved.add(r["query_id"])
            else:
                assert "hog_pid" not in r

    latency_ms = {r["query_id"]: r["latency_ns"] / 1e6 for r in new_results}
    slow = {qid: latency_ms[qid] for qid in starved}
    others = [ms for qid, ms in latency_ms.items() if qid not in starved]
    assert min(slow.values()) >= 60, slow
    # Clearly above the rest: a concurrent query on the same leaf may share the
    # wait, but most queries never meet a spinning hog.
    assert statistics.median(others) <= 30, sorted(others)


def test_lock_held_is_opt_in_and_keeps_the_other_draws() -> None:
    assert "lock-held" in FAULTS and "lock-held" not in DEFAULT_FAULTS
    assert FAULTS.index("lock-held") == FAULTS.index("cpu-starved") + 1
    assert not FaultConfig(rate=0.5).enabled("lock-held")
    three = FaultConfig(rate=0.05, faults=(*DEFAULT_FAULTS, "cpu-starved"), seed=9)
    four = FaultConfig(rate=0.05, faults=(*DEFAULT_FAULTS, "cpu-starved", "lock-held"), seed=9)
    dice3, dice4 = FaultDice(three, 1), FaultDice(four, 1)
    a = [dice3.draw() for _ in range(2000)]
    b = [dice4.draw() for _ in range(2000)]
    assert all(y == x or (x is None and y == "lock-held") for x, y in zip(a, b, strict=True))
    assert 50 <= Counter(b)["lock-held"] <= 150
    dice = FaultDice(FaultConfig(rate=0.05, faults=("lock-held",), seed=9), 1)
    assert {dice.draw() for _ in range(2000)} == {None, "lock-held"}


def test_locker_protocol(tmp_path: Path) -> None:
    assert parse_hold("hold 80\n") == 80
    assert parse_hold("hold 99999") == MAX_HOLD_MS
    assert parse_hold("hold -1") is None and parse_hold("spin 5") is None
    path = tmp_path / "sub.lock"
    locker = subprocess.Popen(
        [sys.executable, "-m", "searchsvc.locker", "--path", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdin is not None and locker.stdout is not None
    try:
        assert locker.stdout.readline() == "ready\n"
        assert path.exists()
        assert Path(f"/proc/{locker.pid}/comm").read_text() == "qt-locker\n"
        hold_ms = 60
        before = time.monotonic()
        locker.stdin.write(f"bogus\nhold {hold_ms}\n")
        locker.stdin.flush()
        assert locker.stdout.readline().startswith("error")
        assert locker.stdout.readline() == "locked\n"
        # The locker took LOCK_EX before saying so and keeps it hold_ms from then.
        with shared_lock(path):
            waited = time.monotonic() - before
        assert waited >= hold_ms / 1000, waited
        assert locker.stdout.readline() == "done\n"
        # Released: a non-blocking exclusive lock succeeds now.
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        locker.stdin.close()
        assert locker.wait(10) == 0
    finally:
        if locker.poll() is None:
            locker.kill()
        locker.wait()
        locker.stdout.close()


def test_locker_exits_0_on_sigterm(tmp_path: Path) -> None:
    locker = subprocess.Popen(
        [sys.executable, "-m", "searchsvc.locker", "--path", str(tmp_path / "l")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdin is not None and locker.stdout is not None
    try:
        assert locker.stdout.readline() == "ready\n"
        locker.terminate()
        assert locker.wait(10) == 0
    finally:
        if locker.poll() is None:
            locker.kill()
        locker.wait()
        locker.stdin.close()
        locker.stdout.close()


def test_lock_held_only_delays_the_journaled_queries(tmp_path: Path) -> None:
    n, rate, seed = 150, 0.05, 5
    faults = ("lock-held",)
    queries = make_queries(n, seed=31)
    started = time.monotonic()
    with (
        Cluster(tmp_path / "old", shards=SHARDS) as old,
        Cluster(
            tmp_path / "new", shards=SHARDS, fault_rate=rate, faults=faults, fault_seed=seed
        ) as new,
    ):
        assert old.locker_pids == {} and new.hog_pids == {}
        lockers = new.locker_pids
        assert set(lockers) == {"leaf0", "leaf1"}
        for role, locker in lockers.items():
            # The locker is its own process, named qt-locker, on the leaf's lock file.
            assert locker not in new.pids.values()
            assert Path(f"/proc/{locker}/comm").read_text() == "qt-locker\n"
            lock_file = tmp_path / "new" / role / LOCK_FILE
            assert lock_file.exists()
            assert str(lock_file) in Path(f"/proc/{locker}/cmdline").read_text().split("\0")
        assert not (tmp_path / "old" / "leaf0" / LOCK_FILE).exists()

        old_results = run_queries(old.root_url, queries, concurrency=2)
        new_results = run_queries(new.root_url, queries, concurrency=2)
        journals = {role: new.journal(role, settle_s=10) for role in ("leaf0", "leaf1")}
    elapsed = time.monotonic() - started
    assert new.returncodes == old.returncodes == {"root": 0, "leaf0": 0, "leaf1": 0}
    assert all(_pid_gone(pid) for pid in [*lockers.values(), *new.pids.values()])
    assert elapsed < 60, f"{n} queries took {elapsed:.1f}s"

    # Only the latency changes: every answer is the old one.
    for o, nw in zip(old_results, new_results, strict=True):
        assert o["status"] == nw["status"] == 200, (o, nw)
        assert _without_time(o["body"]) == _without_time(nw["body"]), nw["query_id"]

    held: set[str] = set()
    terms = {qid: len(q.split()) for qid, q in queries}
    for leaf in range(2):
        journal = journals[f"leaf{leaf}"]
        assert journal["in_flight"] == 0
        recs = journal["records"]
        assert sorted(r["query_id"] for r in recs) == sorted(terms)
        dice = FaultDice(FaultConfig(rate=rate, faults=faults, seed=seed), leaf)
        expected = Counter(dice.draw() for _ in range(n))
        assert Counter(r["fault"] for r in recs) == {
            None: expected[None],
            "lock-held": expected["lock-held"],
        }
        assert 2 <= expected["lock-held"] <= 20, expected
        for r in recs:
            assert r["preads"] == terms[r["query_id"]] * SHARDS
            assert "hog_pid" not in r
            if r["fault"] == "lock-held":
                assert r["locker_pid"] == lockers[f"leaf{leaf}"]
                # The handler's LOCK_SH waited for the locker's whole hold.
                assert r["end_ns"] - r["start_ns"] >= LOCK_HOLD_MS * 10**6
                held.add(r["query_id"])
            else:
                assert "locker_pid" not in r

    latency_ms = {r["query_id"]: r["latency_ns"] / 1e6 for r in new_results}
    slow = {qid: latency_ms[qid] for qid in held}
    others = [ms for qid, ms in latency_ms.items() if qid not in held]
    assert min(slow.values()) >= 60, slow
    # A concurrent query on the same leaf may share the wait, but most never do.
    assert statistics.median(others) <= 30, sorted(others)


def test_net_delay_and_disk_io_are_opt_in_and_keep_the_other_draws() -> None:
    assert FAULTS[-2:] == ("net-delay", "disk-io")
    assert not {"net-delay", "disk-io"} & set(DEFAULT_FAULTS)
    assert not FaultConfig(rate=0.5).enabled("net-delay")
    assert not FaultConfig(rate=0.5).enabled("disk-io")
    four = FaultConfig(rate=0.05, faults=FAULTS[:4], seed=9)
    six = FaultConfig(rate=0.05, faults=FAULTS, seed=9)
    dice4, dice6 = FaultDice(four, 1), FaultDice(six, 1)
    a = [dice4.draw() for _ in range(4000)]
    b = [dice6.draw() for _ in range(4000)]
    # The new faults only take some of the no-fault draws, one fault per draw.
    assert all(
        y == x or (x is None and y in ("net-delay", "disk-io")) for x, y in zip(a, b, strict=True)
    )
    counts = Counter(b)
    assert 100 <= counts["net-delay"] <= 300 and 100 <= counts["disk-io"] <= 300, counts
    dice = FaultDice(FaultConfig(rate=0.05, faults=("disk-io",), seed=9), 1)
    assert {dice.draw() for _ in range(2000)} == {None, "disk-io"}


def _echo_server() -> tuple[socket.socket, list[int], threading.Thread]:
    """A TCP server that echoes the one connection it accepts until EOF; it
    records the peer's port (the proxy's upstream port) before echoing."""
    listener = socket.create_server(("127.0.0.1", 0))
    peers: list[int] = []

    def run() -> None:
        conn, addr = listener.accept()
        peers.append(addr[1])
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, peers, thread


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = sock.recv(min(n, 1 << 16))
        assert chunk, "connection closed early"
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def test_netdelay_proxy_is_byte_exact_and_holds_on_command() -> None:
    assert parse_net_hold("hold 4242 80\n") == (4242, 80)
    assert parse_net_hold(f"hold 1 {NET_MAX_HOLD_MS * 2}") == (1, NET_MAX_HOLD_MS)
    assert [parse_net_hold(t) for t in ("hold 1", "hold x 5", "hold 1 -5", "spin 5", "")] == [
        None
    ] * 5
    listener, peers, echo = _echo_server()
    upstream = f"127.0.0.1:{listener.getsockname()[1]}"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "searchsvc.netdelay", "--upstream", upstream],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proxy.stdin is not None and proxy.stdout is not None
    try:
        word, port = proxy.stdout.readline().split()
        assert word == "ready"
        assert Path(f"/proc/{proxy.pid}/comm").read_text() == "qt-netdelay\n"
        payload = random.Random(3).randbytes(3 << 20)
        with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as client:
            # Byte-exact both ways, several exchanges on one connection.
            for size in (1, 1000, len(payload)):
                sender = threading.Thread(target=client.sendall, args=(payload[:size],))
                sender.start()
                assert _recv_exactly(client, size) == payload[:size]
                sender.join()
            (upstream_port,) = peers
            hold_ms = 150
            proxy.stdin.write(
                f"bogus\nhold {upstream_port + 1} 5\nhold {upstream_port} {hold_ms}\n"
            )
            proxy.stdin.flush()
            assert proxy.stdout.readline().startswith("error")
            assert proxy.stdout.readline().startswith("error: no upstream connection")
            assert proxy.stdout.readline() == "holding\n"
            # The echo's bytes reach the proxy at once and are held there.
            before = time.monotonic()
            client.sendall(b"held")
            assert _recv_exactly(client, 4) == b"held"
            assert time.monotonic() - before >= hold_ms / 1000
            # A hold is used up by the bytes it held.
            client.sendall(b"next")
            assert _recv_exactly(client, 4) == b"next"
            # Half-close goes through: the echo server sees EOF and closes.
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        # The proxy closed its upstream end too: the echo server saw EOF.
        echo.join(10)
        assert not echo.is_alive()
        proxy.stdin.close()
        assert proxy.wait(10) == 0
    finally:
        if proxy.poll() is None:
            proxy.kill()
        proxy.wait()
        proxy.stdout.close()
        listener.close()


def test_net_delay_holds_only_the_journaled_answers(tmp_path: Path) -> None:
    n, rate, deadline_ms, seed = 120, 0.05, 300, 7
    hold_ns = deadline_ms * SLOW_FACTOR * 10**6
    faults = ("net-delay",)
    queries = make_queries(n, seed=41)
    started = time.monotonic()
    with (
        Cluster(tmp_path / "old", shards=SHARDS) as old,
        Cluster(
            tmp_path / "new",
            shards=SHARDS,
            fault_rate=rate,
            faults=faults,
            deadline_ms=deadline_ms,
            fault_seed=seed,
        ) as new,
    ):
        assert old.proxy_pids == {} and old.proxy_urls == {}
        proxies = new.proxy_pids
        assert set(proxies) == set(new.proxy_urls) == {"leaf0", "leaf1"}
        root_argv = Path(f"/proc/{new.pids['root']}/cmdline").read_text().split("\0")
        for role, proxy in proxies.items():
            # Its own process, named qt-netdelay, and the root's only way to the leaf.
            assert proxy not in new.pids.values()
            assert Path(f"/proc/{proxy}/comm").read_text() == "qt-netdelay\n"
            proxy_addr = urlsplit(new.proxy_urls[role]).netloc
            leaf_addr = urlsplit(new.urls[role]).netloc
            assert proxy_addr in root_argv and leaf_addr not in root_argv
        idle_fds = {pid: _fd_count(pid) for pid in proxies.values()}

        old_results = run_queries(old.root_url, queries, concurrency=2)
        new_results = run_queries(new.root_url, queries, concurrency=2)
        journals = {role: new.journal(role, settle_s=10) for role in new.pids}
        # Keep-alive through a proxy: the same answers as from the leaf itself.
        direct, proxied = [
            _keepalive_answers(url, ["alpha", "kernel probe", "zulu"])
            for url in (new.urls["leaf0"], new.proxy_urls["leaf0"])
        ]
        # Every connection the proxies bridged is closed again, both ends.
        wait_for(
            lambda: all(_fd_count(pid) <= n for pid, n in idle_fds.items()),
            10,
            "the proxies to close their connections",
        )
    elapsed = time.monotonic() - started
    assert new.returncodes == old.returncodes == {"root": 0, "leaf0": 0, "leaf1": 0}
    assert all(_pid_gone(pid) for pid in [*proxies.values(), *new.pids.values()])
    assert elapsed < 60, f"{n} queries took {elapsed:.1f}s"
    assert proxied == direct and all(status == 200 for status, _ in direct)

    assert all(j["in_flight"] == 0 for j in journals.values())
    held: dict[str, set[int]] = defaultdict(set)
    leaf_recs: dict[tuple[str, int], dict[str, Any]] = {}
    for leaf in range(2):
        recs = journals[f"leaf{leaf}"]["records"]
        assert sorted(r["query_id"] for r in recs) == sorted(q for q, _ in queries)
        dice = FaultDice(FaultConfig(rate=rate, faults=faults, seed=seed), leaf)
        expected = Counter(dice.draw() for _ in range(n))
        assert Counter(r["fault"] for r in recs) == {
            None: expected[None],
            "net-delay": expected["net-delay"],
        }
        assert 1 <= expected["net-delay"] <= 15, expected
        for r in recs:
            leaf_recs[(r["query_id"], leaf)] = r
            if r["fault"] == "net-delay":
                assert r["proxy_pid"] == proxies[f"leaf{leaf}"]
                # The leaf itself answered well within the root's deadline.
                assert r["end_ns"] - r["start_ns"] < deadline_ms * 10**6
                held[r["query_id"]].add(leaf)
            else:
                assert "proxy_pid" not in r

    root_by_qid = _records_by_qid(journals["root"])
    dropped: dict[str, list[int]] = {}
    for qid, recs in root_by_qid.items():
        (top,) = [r for r in recs if r["role"] == "root"]
        dropped[qid] = top["dropped_leaves"]
        late = [r for r in recs if r["role"] == "fanout" and r["fault"] == "late"]
        assert len(late) == len(top["dropped_leaves"])
    # Every held answer reached the root only after the hold, past its deadline.
    for qid, leaves in held.items():
        fanout_ends = [r["end_ns"] for r in root_by_qid[qid] if r["role"] == "fanout"]
        for leaf in leaves:
            leaf_start = leaf_recs[(qid, leaf)]["start_ns"]
            assert sum(end - leaf_start >= hold_ns for end in fanout_ends) >= 1, qid
    # Only held leaves are dropped; a held one is kept only if the root stalled.
    held_pairs = {(q, leaf) for q, leaves in held.items() for leaf in leaves}
    dropped_pairs = {(q, leaf) for q, leaves in dropped.items() for leaf in leaves}
    assert dropped_pairs <= held_pairs
    assert len(dropped_pairs) >= 0.8 * len(held_pairs)
    # Answers: the old ones, without the dropped leaves; byte-exact otherwise.
    for o, nw in zip(old_results, new_results, strict=True):
        assert o["status"] == nw["status"] == 200, (o, nw)
        qid = nw["query_id"]
        assert _without_time(nw["body"]) == _expected_new_body(o["body"], set(), dropped[qid], 2)
    latency_ms = {r["query_id"]: r["latency_ns"] / 1e6 for r in new_results}
    print(
        f"\nnet-delay: {len(held_pairs)} held answers; root latency of dropping queries "
        f"median {statistics.median(latency_ms[q] for q, _ in dropped_pairs):.0f} ms; "
        f"others median {statistics.median(v for q, v in latency_ms.items() if q not in held):.2f}"
        f" ms (old deployment, no proxy: "
        f"{statistics.median(r['latency_ns'] / 1e6 for r in old_results):.2f} ms)"
    )


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _keepalive_answers(url: str, texts: list[str]) -> list[tuple[int, bytes]]:
    """Status and raw body of GET, POST, GET ... /search on one connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    answers = []
    try:
        for i, q in enumerate(texts):
            if i % 2:
                conn.request("POST", "/search", body=json.dumps({"q": q}).encode())
            else:
                conn.request("GET", "/search?" + urlencode({"q": q}))
            resp = conn.getresponse()
            answers.append((resp.status, resp.read()))
    finally:
        conn.close()
    return answers


def _read_bytes(pid: int) -> int:
    """Bytes ``pid`` has had read from storage for it (not from the page cache)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "read_bytes":
            return int(value)
    raise AssertionError(f"no read_bytes in /proc/{pid}/io")


def test_diskio_protocol(tmp_path: Path) -> None:
    assert parse_storm("storm 80\n") == 80
    assert parse_storm(f"storm {DISK_MAX_STORM_MS + 1}") == DISK_MAX_STORM_MS
    assert [parse_storm(t) for t in ("storm", "storm -1", "hold 3", "")] == [None] * 4
    victim = tmp_path / "victim"
    victim.write_bytes(os.urandom(64 * 4096))
    scratch = tmp_path / "scratch"
    cmd = [sys.executable, "-m", "searchsvc.diskio", "--scratch", str(scratch)]
    cmd += ["--evict", str(victim), "--size-mb", "8", "--threads", "2", "--block-kb", "64"]
    diskio = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert diskio.stdin is not None and diskio.stdout is not None
    try:
        assert diskio.stdout.readline() == "ready\n"
        assert Path(f"/proc/{diskio.pid}/comm").read_text() == "qt-diskio\n"
        # Real data, not an unwritten extent that reads as zeros.
        assert scratch.stat().st_size == 8 << 20
        with scratch.open("rb") as f:
            f.seek(5 << 20)
            assert f.read(4096) != bytes(4096)
        fd = os.open(victim, os.O_RDONLY)
        try:
            os.pread(fd, 64 * 4096, 0)
            assert resident_pages(fd) == 64
            read_before = _read_bytes(diskio.pid)
            before = time.monotonic_ns()
            diskio.stdin.write("bogus\nstorm 50\n")
            diskio.stdin.flush()
            assert diskio.stdout.readline().startswith("error")
            word, evicted, start, end = diskio.stdout.readline().split()
            assert (word, int(evicted)) == ("storming", 64)
            # Reading for 50 ms from the answer, so from after the start.
            assert before <= int(start) and int(end) - int(start) > 50 * 10**6
            assert int(end) <= time.monotonic_ns() + 50 * 10**6
            assert resident_pages(fd) == 0
            # Every reader issues an O_DIRECT read from the disk for this storm. They
            # confirm just before the syscall, so the accounting may trail the answer.
            wait_for(
                lambda: _read_bytes(diskio.pid) - read_before >= 2 * 64 * 1024,
                10,
                "both readers' O_DIRECT reads",
            )
        finally:
            os.close(fd)
        diskio.stdin.close()
        assert diskio.wait(10) == 0
        assert not scratch.exists()
    finally:
        if diskio.poll() is None:
            diskio.kill()
        diskio.wait()
        diskio.stdout.close()


def test_diskio_exits_0_and_cleans_up_on_sigterm(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    cmd = [sys.executable, "-m", "searchsvc.diskio", "--scratch", str(scratch)]
    cmd += ["--evict", str(tmp_path / "nothing"), "--size-mb", "4"]
    (tmp_path / "nothing").write_bytes(b"")
    diskio = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert diskio.stdin is not None and diskio.stdout is not None
    try:
        assert diskio.stdout.readline() == "ready\n"
        assert scratch.exists()
        diskio.terminate()
        assert diskio.wait(10) == 0
        assert not scratch.exists()
    finally:
        if diskio.poll() is None:
            diskio.kill()
        diskio.wait()
        diskio.stdin.close()
        diskio.stdout.close()


def test_disk_io_slows_only_the_journaled_queries_reads(tmp_path: Path) -> None:
    n, rate, seed = 150, 0.05, 3
    faults = ("disk-io",)
    queries = make_queries(n, seed=43)
    started = time.monotonic()
    with (
        Cluster(tmp_path / "old", shards=SHARDS) as old,
        Cluster(
            tmp_path / "new", shards=SHARDS, fault_rate=rate, faults=faults, fault_seed=seed
        ) as new,
    ):
        assert old.diskio_pids == {} and new.proxy_pids == {}
        neighbours = new.diskio_pids
        assert set(neighbours) == {"leaf0", "leaf1"}
        for role, pid in neighbours.items():
            assert pid not in new.pids.values()
            assert Path(f"/proc/{pid}/comm").read_text() == "qt-diskio\n"
            assert (tmp_path / "new" / role / SCRATCH_FILE).stat().st_size == SCRATCH_MB << 20
        neighbour_read = {role: _read_bytes(pid) for role, pid in neighbours.items()}

        old_results = run_queries(old.root_url, queries, concurrency=1)
        # One query at a time: no other query of the leaf reloads the evicted
        # pages between a storm's eviction and the faulty query's preads.
        new_results = run_queries(new.root_url, queries, concurrency=1)
        journals = {role: new.journal(role, settle_s=10) for role in ("leaf0", "leaf1")}
        assert new.diskio_pids == neighbours  # alive all along
        neighbour_read = {
            role: _read_bytes(pid) - neighbour_read[role] for role, pid in neighbours.items()
        }
        leaf_read = {role: _read_bytes(new.pids[role]) for role in neighbours}
    elapsed = time.monotonic() - started
    assert new.returncodes == old.returncodes == {"root": 0, "leaf0": 0, "leaf1": 0}
    assert all(_pid_gone(pid) for pid in [*neighbours.values(), *new.pids.values()])
    assert not list((tmp_path / "new").glob(f"*/{SCRATCH_FILE}"))
    assert elapsed < 60, f"{n} queries took {elapsed:.1f}s"

    # Only the latency changes: every answer is the old one.
    for o, nw in zip(old_results, new_results, strict=True):
        assert o["status"] == nw["status"] == 200, (o, nw)
        assert _without_time(o["body"]) == _without_time(nw["body"]), nw["query_id"]

    terms = {qid: len(q.split()) for qid, q in queries}
    faulty_ms: list[float] = []
    normal_ms: list[float] = []
    evicted: list[int] = []
    for leaf in range(2):
        role = f"leaf{leaf}"
        journal = journals[role]
        assert journal["in_flight"] == 0
        recs = journal["records"]
        dice = FaultDice(FaultConfig(rate=rate, faults=faults, seed=seed), leaf)
        expected = Counter(dice.draw() for _ in range(n))
        # A draw arms a storm for a later query: the last draws may find none.
        got = Counter(r["fault"] for r in recs)
        assert set(got) <= {None, "disk-io"}
        assert expected["disk-io"] - 2 <= got["disk-io"] <= expected["disk-io"], (got, expected)
        assert 2 <= expected["disk-io"] <= 20, expected
        for r in recs:
            assert r["preads"] == terms[r["query_id"]] * SHARDS
            assert 0 < r["pread_ns"] <= r["end_ns"] - r["start_ns"]
            if r["fault"] != "disk-io":
                assert "diskio_pid" not in r and "evicted_pages" not in r
                normal_ms.append(r["pread_ns"] / 1e6)
                continue
            faulty_ms.append(r["pread_ns"] / 1e6)
            assert r["diskio_pid"] == neighbours[role]
            # The neighbour dropped what the cache held of the index (nothing if
            # no query read it since the storm before).
            evicted.append(r["evicted_pages"])
            # The storm, armed by an earlier query, was on when this one took it
            # (before its reads) and calmed once its reads were done, inside it.
            assert r["diskio_start_ns"] <= r["end_ns"]
            assert r["start_ns"] < r["diskio_end_ns"] <= r["end_ns"]
        assert sum(e >= SHARDS for e in evicted) >= len(evicted) / 2, evicted
        # The neighbour's O_DIRECT reads went to the disk, and so did the
        # leaf's reads of its evicted pages: at least a page per shard per fault.
        assert neighbour_read[role] >= got["disk-io"] * 1024 * 1024
        assert leaf_read[role] >= got["disk-io"] * SHARDS * 4096
    print(
        f"\ndisk-io: {len(faulty_ms)} faulty leaf answers, preads median "
        f"{statistics.median(faulty_ms):.2f} ms (max {max(faulty_ms):.1f}) vs "
        f"{statistics.median(normal_ms):.3f} ms for the {len(normal_ms)} others: "
        f"{statistics.median(faulty_ms) / statistics.median(normal_ms):.0f}x"
    )
