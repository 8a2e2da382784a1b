"""End-to-end tests of the search service and its ground-truth journals."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from searchsvc.client import make_queries, run_queries
from searchsvc.cluster import Cluster, get_json
from searchsvc.index import BLOCK_SIZE, Index, build_index, doc_leaf, shard_path

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
        journals = {role: cluster.journal(role) for role in pids}
    codes = cluster.returncodes

    assert [r["query_id"] for r in results] == [qid for qid, _ in queries]
    for r in results:
        assert r["status"] == 200, r
        assert r["leaves"] == 2 and all(n > 0 for n in r["leaf_hits"]), r
        assert 0 < len(r["hits"]) <= 10
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
        for rec in recs:
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
        root = cluster.journal("root")
        leaf = cluster.journal("leaf0")
    assert [r["query_id"] for r in root["records"]] == [None] * 3
    assert [(r["query_id"], r["preads"]) for r in leaf["records"]] == [(None, 4)]
    assert cluster.returncodes == {"root": 0, "leaf0": 0, "leaf1": 0}
