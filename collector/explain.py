"""Why one query went wrong: its hops, where their time went, how that compares with the
session's normal queries, and who else used the same resources at the time.

The output is the public JSON contract of `qtrace explain` (documented in the README)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from collector.store import Store
from qtrace.api.v1 import anomalies_pb2, services_pb2
from qtrace.wire import anomaly_to_json, event_to_json

MEASURED = ("network", "storage", "block_io", "runqueue", "lock")
# Not measured until the memory probe group exists (and on-CPU time): null, never 0.
UNMEASURED = ("on_cpu", "page_fault")
CATEGORY = {
    "network": "network",
    "storage": "storage",
    "block_io": "block_io",
    "runqueue": "cpu",
    "lock": "lock",
    "other": "other",
}
MIN_BASELINE = 20  # fewer normal queries than this: no percentiles, no findings by excess
MIN_EXCESS_NS = 1_000_000  # below a millisecond, an excess is not worth a person's time
THRESHOLD = 0.2  # a finding must explain at least this share of the query's time
BASELINE_HOPS = 5000  # the latest normal hops of each kind make its baseline


class NotFound(LookupError):
    pass


def _pct(values: list[int], p: float) -> int:
    if not values:
        return 0
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return int(values[k])


def _breakdown(h: dict[str, Any]) -> dict[str, int | None]:
    total = h["end_ns"] - h["start_ns"]
    b: dict[str, int | None] = {k: int(h[k]) for k in MEASURED}
    b["other"] = max(0, total - sum(int(h[k]) for k in MEASURED))
    for k in UNMEASURED:
        b[k] = None
    return b


def _baseline(normal: list[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles of a kind of hop's normal queries, per breakdown field."""
    base: dict[str, Any] = {"queries": len(normal)}
    for cat in (*MEASURED, "other"):
        vals = [int(v) for v in (_breakdown(b)[cat] for b in normal) if v is not None]
        base[cat] = {"p50": _pct(vals, 50), "p90": _pct(vals, 90), "p99": _pct(vals, 99)}
    durations = [b["end_ns"] - b["start_ns"] for b in normal]
    base["duration"] = {"p50": _pct(durations, 50), "p99": _pct(durations, 99)}
    return base


def _event(ne: services_pb2.NodeEvent) -> dict[str, Any]:
    e = event_to_json(ne.event)
    return {
        "node": ne.node,
        "ts_ns": e["ts_ns"],
        "dur_ns": e["dur_ns"],
        "kind": e["kind"],
        "pid": e["pid"],
        "tid": e["tid"],
        "comm": e["comm"],
        "target": e["target"],
        "ret": e["ret"],
    }


def explain(store: Store, query_id: str, anomalies: list[anomalies_pb2.Anomaly]) -> dict[str, Any]:
    events, truncated = store.query_events(query_id, 100_000)
    if not events and not anomalies:
        raise NotFound(
            f"query {query_id!r} is unknown: no events and no anomaly mention it "
            "(was it traced? `qtrace session list --all`)"
        )
    out: dict[str, Any] = {
        "query_id": query_id,
        "anomalies": [anomaly_to_json(a) for a in anomalies],
        "hops": [],
        "baseline": {},
        "findings": [],
        "completeness": {
            "complete": False,
            "reasons": [],
            "clock_uncertainty_ns": 0,
            "events": len(events),
        },
    }
    reasons: list[str] = out["completeness"]["reasons"]
    if not events:
        reasons.append("no kernel events for this query: it ran outside any trace session")
        return out
    session_id = events[0].session_id
    if truncated:
        reasons.append("more than 100000 events: the explanation used the first 100000")
    hops = store.hops(session_id, None, None, [query_id])
    anomalous = {a.query_id for a in store.list_anomalies(session_id)} | {query_id}
    by_hop: dict[tuple[str, int], list[services_pb2.NodeEvent]] = defaultdict(list)
    for ne in events:
        by_hop[(ne.node, ne.event.pid)].append(ne)
    query_start = min(h["start_ns"] for h in hops)
    query_end = max(h["end_ns"] for h in hops)
    query_total = max(1, query_end - query_start)
    # The session's normal hops, by kind of hop (node, comm): one pass over the store
    # whatever the number of hops of this query.
    by_kind: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for b in store.hops(session_id, None, None, limit=BASELINE_HOPS * 20):
        if b["query_id"] not in anomalous and len(by_kind[(b["node"], b["comm"])]) < BASELINE_HOPS:
            by_kind[(b["node"], b["comm"])].append(b)
    baselines: dict[tuple[str, str], dict[str, Any]] = {}
    seen_targets: dict[tuple[str, str], set[str]] = {}

    for h in sorted(hops, key=lambda h: h["start_ns"]):
        breakdown = _breakdown(h)
        hop = {
            "node": h["node"],
            "pod": None,
            "pid": h["pid"],
            "tid": h["tid"],
            "comm": h["comm"],
            "start_ns": h["start_ns"],
            "end_ns": h["end_ns"],
            "events": h["events"],
            "breakdown_ns": breakdown,
        }
        out["hops"].append(hop)
        kind = (h["node"], h["comm"])
        if kind not in baselines:
            baselines[kind] = _baseline(by_kind.get(kind, []))
            seen_targets[kind] = store.targets_seen(
                session_id, h["node"], h["comm"], sorted(anomalous)
            )
        base = baselines[kind]
        out["baseline"][f"{h['node']}/{h['comm']}"] = base
        hop_events = by_hop[(h["node"], h["pid"])]
        query_tids = {ne.event.tid for ne in hop_events}
        if base["queries"] >= MIN_BASELINE:
            for cat in (*MEASURED, "other"):
                value = breakdown[cat] or 0
                excess = value - max(base[cat]["p99"], base[cat]["p50"])
                if excess < MIN_EXCESS_NS or excess / query_total < THRESHOLD:
                    continue
                out["findings"].append(
                    _excess_finding(store, query_id, hop, cat, value, base[cat], excess,
                                    query_total, hop_events, query_tids)
                )  # fmt: skip
        unusual = sorted(
            {ne.event.target for ne in hop_events if ne.event.has_target}
            - seen_targets[kind]
            - {""}
        )
        files = [t for t in unusual if t.startswith("/")]
        if files and base["queries"] >= MIN_BASELINE:
            out["findings"].append(
                _unusual_files(store, query_id, hop, files, hop_events, query_tids)
            )

    _blame_downstream(out["findings"], hops)
    out["findings"].sort(key=lambda f: f["score"], reverse=True)
    drops = [a for a in store.session_stats(session_id) if a.dropped]
    if drops:
        lost = sum(a.dropped for a in drops)
        reasons.append(
            f"{lost} events of this session were lost on {', '.join(a.node for a in drops)}: "
            "some of this query's may be among them"
        )
    reasons.append("on_cpu and page_fault are not measured yet (null)")
    out["completeness"]["complete"] = not truncated and not drops
    out["completeness"]["clock_uncertainty_ns"] = store.clock_uncertainty(session_id)
    return out


def _blame_downstream(findings: list[dict[str, Any]], hops: list[dict[str, Any]]) -> None:
    """A hop waiting on the network for another hop of the same query that has its own
    finding is a symptom, not the cause: rank the downstream hop's finding first."""
    served_by = {}
    for h in hops:
        conn = h.get("conn") or ""
        if "->" in conn:
            ours, theirs = conn.split("->", 1)
            served_by[f"{theirs}->{ours}"] = h
    slow = {(f["hop"]["node"], f["hop"]["pid"]) for f in findings if f["category"] != "network"}
    for f in findings:
        if f["category"] != "network":
            continue
        for ev in f["evidence"]:
            down = served_by.get(ev["target"] or "")
            if down is not None and (down["node"], down["pid"]) in slow:
                f["score"] = round(f["score"] * 0.5, 3)
                f["summary"] += (
                    f": waiting for {down['comm']} (pid {down['pid']}) on {down['node']}, "
                    "whose own finding explains it"
                )
                break


def _culprits(others: list[services_pb2.NodeEvent], query_tids: set[int]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, int, int], dict[str, Any]] = {}
    for ne in others:
        # tid 0: the kernel acting for a socket in interrupt context, nobody's doing
        if ne.event.tid in query_tids or ne.event.tid == 0:
            continue
        key = (ne.node, ne.event.pid, ne.event.tid)
        c = seen.setdefault(
            key,
            {"node": ne.node, "pod": None, "pid": ne.event.pid, "tid": ne.event.tid,
             "comm": ne.event.comm, "events": 0, "kinds": []},
        )  # fmt: skip
        c["events"] += 1
        if ne.event.kind not in c["kinds"]:
            c["kinds"].append(ne.event.kind)
    return sorted(seen.values(), key=lambda c: -c["events"])


def _cpu_culprits(
    node: str, waits: list[services_pb2.NodeEvent], ours: set[int]
) -> list[dict[str, Any]]:
    """Who had the CPU while the query's threads waited for it, by time taken."""
    taken: dict[int, dict[str, Any]] = {}
    for ne in waits:
        detail = json.loads(ne.event.detail_json or "{}")
        pid = int(detail.get("running_pid", 0))
        if not pid or pid in ours:
            continue
        c = taken.setdefault(
            pid,
            {"node": node, "pod": None, "pid": pid, "tid": int(detail.get("running_tid", pid)),
             "comm": detail.get("running_comm", "?"), "events": 0, "kinds": ["runq"],
             "waited_ns": 0},
        )  # fmt: skip
        c["events"] += 1
        c["waited_ns"] += ne.event.dur_ns
    return sorted(taken.values(), key=lambda c: -c["waited_ns"])


def _excess_finding(
    store: Store,
    query_id: str,
    hop: dict[str, Any],
    cat: str,
    value: int,
    base: dict[str, int],
    excess: int,
    query_total: int,
    hop_events: list[services_pb2.NodeEvent],
    query_tids: set[int],
) -> dict[str, Any]:
    group = {"network": "net", "storage": "storage", "runqueue": "sched", "lock": "lock"}.get(cat)
    relevant = [
        ne
        for ne in hop_events
        if (group and ne.event.group == group and ne.event.kind != "block_rq")
        or (cat == "block_io" and ne.event.kind == "block_rq")
    ]
    relevant.sort(key=lambda ne: -ne.event.dur_ns)
    evidence = [_event(ne) for ne in relevant[:5]]
    targets = sorted({ne.event.target for ne in relevant[:5] if ne.event.has_target})
    if cat == "runqueue":
        culprits = _cpu_culprits(hop["node"], relevant, query_tids | {hop["pid"]})
        if not culprits:
            # The task that ran just before us may be a sibling thread that waited too;
            # the CPU's real taker shows in the waits of the rest of the process.
            waits = store.kind_in_window(hop["node"], hop["start_ns"], hop["end_ns"], "runq")
            culprits = _cpu_culprits(hop["node"], waits, query_tids | {hop["pid"]})
    else:
        others = store.window_events(hop["node"], hop["start_ns"], hop["end_ns"], targets, query_id)
        if cat == "lock":  # the holders: exclusive lockers, not other shared readers
            others = [ne for ne in others if "LOCK_EX" in ne.event.detail_json]
        culprits = _culprits(others, query_tids)
    where = f"{hop['comm']} (pid {hop['pid']}) on {hop['node']}"
    if cat == "other":
        summary = (
            f"{where} spent {value / 1e6:.1f} ms outside traced syscalls and CPU waits "
            f"(normal p99 {base['p99'] / 1e6:.1f} ms): on CPU, in a lock, asleep or on a "
            "pipe; the memory probe group (not yet available) will tell locks apart"
        )
    else:
        top = evidence[0] if evidence else None
        what = (
            f", longest {top['kind']} on {top['target']} {top['dur_ns'] / 1e6:.1f} ms"
            if top
            else ""
        )
        summary = (
            f"{where} spent {value / 1e6:.1f} ms in {cat.replace('_', ' ')} (normal p99 "
            f"{base['p99'] / 1e6:.1f} ms){what}"
        )
        if cat == "lock" and culprits:
            c = culprits[0]
            summary = (
                f"{where} waited {value / 1e6:.1f} ms for a file lock on {targets[0]} "
                f"(normal p99 {base['p99'] / 1e6:.1f} ms) held by {c['comm']} (pid {c['pid']})"
            )
        if cat == "runqueue" and culprits:
            c = culprits[0]
            summary = (
                f"{where} waited {value / 1e6:.1f} ms for a CPU (normal p99 "
                f"{base['p99'] / 1e6:.1f} ms) while {c['comm']} (pid {c['pid']}) had it"
            )
    return {
        "category": CATEGORY[cat],
        "score": round(min(1.0, excess / query_total), 3),
        "summary": summary,
        "hop": {"node": hop["node"], "pid": hop["pid"], "comm": hop["comm"]},
        "evidence": evidence,
        "culprits": culprits,
    }


def _unusual_files(
    store: Store,
    query_id: str,
    hop: dict[str, Any],
    files: list[str],
    hop_events: list[services_pb2.NodeEvent],
    query_tids: set[int],
) -> dict[str, Any]:
    used = [ne for ne in hop_events if ne.event.target in files]
    others = store.window_events(hop["node"], hop["start_ns"] - 1_000_000_000, hop["end_ns"],
                                 files, query_id)  # fmt: skip
    writers = [
        ne for ne in others if ne.event.kind.startswith(("pwrite", "write", "rename", "ftruncate"))
    ]
    culprits = _culprits(writers or others, query_tids)
    who = ""
    if writers:
        c = culprits[0]
        who = f"; {c['comm']} (pid {c['pid']}, tid {c['tid']}) was writing it"
    return {
        "category": "storage",
        # Reading a file that no normal query reads changes results, not just latency: it
        # outranks any excess of time.
        "score": 1.0,
        "summary": (
            f"{hop['comm']} (pid {hop['pid']}) on {hop['node']} read {files[0]}, which no normal "
            f"query of this session read{who}"
        ),
        "hop": {"node": hop["node"], "pid": hop["pid"], "comm": hop["comm"]},
        "evidence": [_event(ne) for ne in used[:5]] + [_event(ne) for ne in writers[:5]],
        "culprits": culprits,
    }
