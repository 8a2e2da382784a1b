"""Latency outliers: queries far slower than their session's other queries, per hop.

A hop's latency is the server side's own: from the end of the read that received the
request to the end of the response written on that connection, from kernel events."""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict

from collector.store import Store
from qtrace.api.v1 import anomalies_pb2

# Slower than this many times the session's p75 for that kind of hop: the bulk. A
# quartile still describes it when slow queries are far from rare (one fault per leaf can
# touch a tenth of a fan-out's queries), where a p95 would already be one of them...
DEFAULT_FACTOR = 5.0
DEFAULT_MIN_EXCESS_NS = 20_000_000  # ...and at least this much slower than the median
MIN_QUERIES = 50  # fewer queries of a kind of hop than this: no distribution to judge by


def detect(
    store: Store,
    session_id: str,
    factor: float = DEFAULT_FACTOR,
    min_excess_ns: int = DEFAULT_MIN_EXCESS_NS,
) -> list[anomalies_pb2.Anomaly]:
    """New `latency` anomalies for the session (queries already flagged so are skipped)."""
    groups: dict[tuple[str, str], list[tuple[str, int, int]]] = defaultdict(list)
    for h in store.hops(session_id, None, None, limit=1_000_000):
        groups[(h["node"], h["comm"])].append(
            (h["query_id"], h["pid"], h["end_ns"] - h["start_ns"])
        )
    known = {
        a.query_id
        for a in store.list_anomalies(session_id)
        if a.type == anomalies_pb2.ANOMALY_TYPE_LATENCY
    }
    worst: dict[str, tuple[float, dict[str, object]]] = {}
    for (node, comm), hops in groups.items():
        if len(hops) < MIN_QUERIES:
            continue
        durations = sorted(d for _q, _p, d in hops)
        median = statistics.median(durations)
        p75 = durations[int(0.75 * (len(durations) - 1))]
        limit = max(p75 * factor, median + min_excess_ns)
        for qid, pid, dur in hops:
            if dur > limit and qid not in known:
                ratio = dur / max(median, 1)
                if ratio > worst.get(qid, (0.0, {}))[0]:
                    worst[qid] = (ratio, {"node": node, "comm": comm, "pid": pid,
                                          "latency_ns": dur, "median_ns": int(median),
                                          "p75_ns": p75, "limit_ns": int(limit),
                                          "factor": round(ratio, 1)})  # fmt: skip
    now = time.time_ns()
    return [
        anomalies_pb2.Anomaly(
            query_id=qid,
            type=anomalies_pb2.ANOMALY_TYPE_LATENCY,
            session_id=session_id,
            ts_ns=now,
            detail_json=json.dumps(detail),
            source="latency",
        )
        for qid, (_r, detail) in sorted(worst.items())
    ]
