"""Attribution against ground truth: the test search service journals which thread served
which query id, and the agent's kernel events must agree with it exactly."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from typing import Any

import pytest

from agent.model import Event
from agent.targets import TargetSpec
from searchsvc.client import make_queries, run_queries
from searchsvc.cluster import Cluster
from tests.conftest import background_tracer


def _journals(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {role: cluster.journal(role) for role in cluster.pids}


def _check_against_journal(
    events: list[Event], journals: dict[str, dict[str, Any]], query_ids: set[str]
) -> None:
    records_by_tid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for j in journals.values():
        for r in j["records"]:
            if r["query_id"] in query_ids:
                records_by_tid[r["tid"]].append(r)
    for tid_recs in records_by_tid.values():
        tid_recs.sort(key=lambda r: r["start_ns"])
    starts = {tid: [r["start_ns"] for r in recs] for tid, recs in records_by_tid.items()}

    wrong: list[str] = []
    missing: list[str] = []
    for e in events:
        recs = records_by_tid.get(e.tid, [])
        if not recs:
            if e.query_id in query_ids:
                wrong.append(f"{e.kind} tid={e.tid} says {e.query_id}; thread served none")
            continue
        i = bisect.bisect_right(starts[e.tid], e.mono_ns) - 1
        inside = i >= 0 and e.mono_ns <= recs[i]["end_ns"]
        if inside:
            expected = {recs[i]["query_id"]}
            if e.query_id is None:
                missing.append(f"{e.kind} tid={e.tid} inside {recs[i]['query_id']}")
                continue
        else:
            # Between two requests of a reused thread (an idle keep-alive read that the
            # next request completes, a close after the response): either neighbour.
            expected = {recs[j]["query_id"] for j in (i, i + 1) if 0 <= j < len(recs)}
            if e.query_id is None:
                continue
        if e.query_id not in expected:
            wrong.append(f"{e.kind} tid={e.tid} at {e.mono_ns} says {e.query_id}, not {expected}")
    assert not wrong, f"{len(wrong)} misattributed events, e.g. {wrong[:5]}"
    assert not missing, f"{len(missing)} unattributed events inside requests, e.g. {missing[:5]}"


def _run(cluster: Cluster, n: int, concurrency: int, seed: int) -> None:
    queries = make_queries(n, seed=seed)
    qids = {q for q, _ in queries}
    before = {role: len(j["records"]) for role, j in _journals(cluster).items()}
    spec = TargetSpec(pids=list(cluster.pids.values()))
    with background_tracer(spec) as (_tracer, sink):
        results = run_queries(cluster.root_url, queries, concurrency=concurrency)
    assert all(r["status"] == 200 for r in results)
    events = sink.events
    journals = _journals(cluster)
    for role, j in journals.items():
        j["records"] = j["records"][before[role] :]

    # Every query reached root and both leaves, and each saw it in the kernel.
    by_query: dict[str | None, Counter[int]] = defaultdict(Counter)
    for e in events:
        by_query[e.query_id][e.pid] += 1
    for qid in qids:
        for role, pid in cluster.pids.items():
            assert by_query[qid][pid] > 0, f"{qid}: no events on {role}"

    # Every index pread of every leaf is present and attributed to its query.
    for role, pid in cluster.pids.items():
        if not role.startswith("leaf"):
            continue
        expected = Counter({r["query_id"]: r["preads"] for r in journals[role]["records"]})
        seen = Counter(
            e.query_id for e in events if e.pid == pid and e.kind == "pread64" and e.ret > 0
        )
        assert seen == expected, f"{role}: preads per query differ from the journal"
        idx = [e for e in events if e.pid == pid and e.kind == "pread64"]
        assert all(e.target and e.target.endswith(".idx") for e in idx)

    _check_against_journal(events, journals, qids)
    # Fan-out threads are attributed by inheritance and say so.
    fanout_tids = {r["tid"] for r in journals["root"]["records"] if r["role"] == "fanout"}
    fan = [e for e in events if e.tid in fanout_tids and e.query_id]
    assert fan and all(e.inferred for e in fan), [e for e in fan if not e.inferred][:3]
    # Outbound connections to the leaves are resolved to their addresses.
    leaf_ports = {u.rsplit(":", 1)[1] for u in cluster.leaf_urls}
    connects = [e for e in fan if e.kind == "connect"]
    assert len(connects) == 2 * n
    assert all(e.target and e.target.rsplit(":", 1)[1] in leaf_ports for e in connects)
    # Both ends resolve to full 4-tuples, each connection its own (TIME_WAIT forbids reuse
    # within a minute), and the leaves' accepts are exactly the root's connects reversed.
    out = {e.target for e in connects}
    assert len(out) == 2 * n and not any(t.startswith("?") for t in out if t)
    leaf_pids = {pid for role, pid in cluster.pids.items() if role.startswith("leaf")}
    accepted = {e.target for e in events if e.pid in leaf_pids and e.kind in ("accept", "accept4")}
    assert accepted == {"->".join(reversed(t.split("->"))) for t in out if t}


@pytest.mark.parametrize(("n", "concurrency"), [(500, 1), (500, 8)], ids=["serial", "8-clients"])
def test_every_event_carries_its_query(cluster: Cluster, n: int, concurrency: int) -> None:
    _run(cluster, n, concurrency, seed=concurrency)
