"""Why one query went wrong: its hops, where their time went, how that compares with the
session's normal queries, and who else used the same resources at the time.

The output is the public JSON contract of `qtrace explain` (documented in the README)."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from collector.clocks import Aligner
from collector.store import Store
from qtrace.api.v1 import anomalies_pb2, services_pb2
from qtrace.wire import anomaly_to_json, event_to_json

# Waits measured from kernel events. block_io happens inside storage syscalls and page
# faults, so it is reported but never subtracted twice.
MEASURED = ("network", "storage", "block_io", "runqueue", "lock", "page_fault")
WAITS = ("network", "storage", "runqueue", "lock", "page_fault")
CATEGORY = {
    "network": "network",
    "storage": "storage",
    "block_io": "block_io",
    "runqueue": "cpu",
    "on_cpu": "cpu",
    "lock": "lock",
    "page_fault": "memory",
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


def _breakdown(h: dict[str, Any], groups: frozenset[str]) -> dict[str, int | None]:
    """Where a hop's time went. With the sched group, sleeps outside traced syscalls are
    measured (``other``) and what is left is on CPU; without it, ``on_cpu`` is unknown
    and ``other`` is everything not measured."""
    total = h["end_ns"] - h["start_ns"]
    b: dict[str, int | None] = {k: int(h[k]) for k in MEASURED}
    waits = sum(int(h[k]) for k in WAITS)
    if "sched" in groups:
        main, rest = int(h["offcpu_main"]), int(h["offcpu"]) - int(h["offcpu_main"])
        b["other"] = max(0, main - int(h["waits_others"])) + rest
        b["on_cpu"] = max(0, total - waits - b["other"])
    else:
        b["other"] = max(0, total - waits)
        b["on_cpu"] = None
    if "memory" not in groups:
        b["page_fault"] = None
    return b


def _baseline(normal: list[dict[str, Any]], groups: frozenset[str]) -> dict[str, Any]:
    """Percentiles of a kind of hop's normal queries, per breakdown field."""
    base: dict[str, Any] = {"queries": len(normal)}
    rows = [_breakdown(b, groups) for b in normal]
    for cat in (*MEASURED, "on_cpu", "other"):
        vals = [int(v) for v in (r[cat] for r in rows) if v is not None]
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


def explain(
    store: Store,
    query_id: str,
    anomalies: list[anomalies_pb2.Anomaly],
    aligner: Aligner | None = None,
) -> dict[str, Any]:
    """Works on the stored clocks (a node's own events compare as they are), then moves
    every timestamp of the answer onto the happens-before aligned clock."""
    events, truncated = store.query_events(query_id, 100_000)
    summaries = store.summaries(query_id)
    if not events and not summaries and not anomalies:
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
    if not events and not summaries:
        reasons.append("no kernel events for this query: it ran outside any trace session")
        return out
    session_id = events[0].session_id if events else summaries[0][0]
    session = next((x for x in store.load_sessions() if x.id == session_id), None)
    groups = frozenset(session.probes if session else ())
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
        breakdown = _breakdown(h, groups)
        hop = {
            "node": h["node"],
            "pod": _pod_of(by_hop[(h["node"], h["pid"])]),
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
            baselines[kind] = _baseline(by_kind.get(kind, []), groups)
            seen_targets[kind] = store.targets_seen(
                session_id, h["node"], h["comm"], sorted(anomalous)
            )
        base = baselines[kind]
        out["baseline"][f"{h['node']}/{h['comm']}"] = base
        hop_events = by_hop[(h["node"], h["pid"])]
        query_tids = {ne.event.tid for ne in hop_events}
        if base["queries"] >= MIN_BASELINE:
            found: dict[str, dict[str, Any]] = {}
            for cat in (*MEASURED, "on_cpu", "other"):
                # Waits of parallel threads add up past the hop's own time: a hop cannot
                # have lost more than it lasted.
                value = min(breakdown[cat] or 0, h["end_ns"] - h["start_ns"])
                excess = value - max(base[cat]["p99"], base[cat]["p50"])
                if excess < MIN_EXCESS_NS or excess / query_total < THRESHOLD:
                    continue
                found[cat] = _excess_finding(store, query_id, hop, cat, value, base[cat], excess,
                                             query_total, hop_events, query_tids)  # fmt: skip
            out["findings"] += _merge_disk_waits(found)
        unusual = sorted(
            {
                ne.event.target
                for ne in hop_events
                if ne.event.has_target and ne.event.group == "storage"
            }
            - seen_targets[kind]
            - {""}
        )
        files = [t for t in unusual if t.startswith("/")]
        if files and base["queries"] >= MIN_BASELINE:
            found_file = _unusual_files(store, query_id, hop, files, hop_events, query_tids)
            if found_file is not None:
                out["findings"].append(found_file)

    _blame_downstream(out["findings"], hops)
    out["findings"].sort(key=lambda f: f["score"], reverse=True)
    stats = store.session_stats(session_id)
    drops = [a for a in stats if a.dropped]
    if drops:
        lost = sum(a.dropped for a in drops)
        reasons.append(
            f"{lost} events of this session were lost on {', '.join(a.node for a in drops)}: "
            "some of this query's may be among them"
        )
    shedding = [a for a in stats if a.shed]
    if shedding:
        reasons.append(
            f"{sum(a.shed for a in shedding)} events of this session were over its event-rate "
            f"limit on {', '.join(a.node for a in shedding)} and were only counted (one in 64 "
            "kept as a sample): raise --max-event-rate or narrow the targets"
        )
    if "sched" not in groups:
        reasons.append("on_cpu is null: the session did not trace the sched group")
    if "memory" not in groups:
        reasons.append("page_fault is null: the session did not trace the memory group")
    recorded = _recorder_gaps(store, query_id, out["hops"], by_hop)
    reasons += recorded
    out["completeness"]["complete"] = not truncated and not drops and not shedding and not recorded
    alignment = (aligner or Aligner(store)).alignment(session_id)
    _align(out, alignment.shifts)
    uncertainty = store.clock_uncertainty(session_id)
    if alignment.uncertainty_ns:
        uncertainty = min(uncertainty, alignment.uncertainty_ns)
    out["completeness"]["clock_uncertainty_ns"] = uncertainty
    return out


def _recorder_gaps(
    store: Store,
    query_id: str,
    hops: list[dict[str, Any]],
    by_hop: dict[tuple[str, int], list[services_pb2.NodeEvent]],
) -> list[str]:
    """Flight recorder sessions: what of the query's detail could not be fetched."""
    gaps = []
    for f in store.fetches(query_id):
        where = f"the recent history on {f['node']}"
        if f["error"]:
            gaps.append(f"{where} could not be read: {f['error']}")
        elif f["done_ns"] is None:
            gaps.append(f"{where} was asked for this query's window; the answer has not come")
        elif not f["complete"]:
            short = (f["covered_from_ns"] or f["to_ns"]) - f["from_ns"]
            gaps.append(
                f"{where} had been overwritten: it reached back to {short / 1e6:.0f} ms after "
                "the start of this query's window, so earlier events are missing (report "
                "anomalies sooner, or raise --history-size)"
            )
    for hop in hops:
        if not by_hop.get((hop["node"], hop["pid"])):
            gaps.append(
                f"{hop['comm']} (pid {hop['pid']}) on {hop['node']}: only the kernel's summary "
                "of this hop is known, no event detail"
            )
    return gaps


def _align(out: dict[str, Any], shifts: dict[str, int]) -> None:
    if not any(shifts.values()):
        return
    for hop in out["hops"]:
        shift = shifts.get(hop["node"], 0)
        hop["start_ns"] += shift
        hop["end_ns"] += shift
    for f in out["findings"]:
        for ev in f["evidence"]:
            ev["ts_ns"] += shifts.get(ev["node"], 0)


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
    by_key = {(h["node"], h["pid"]): h for h in hops}
    for f in findings:
        if f["category"] != "network":
            continue
        for ev in f["evidence"]:
            down = served_by.get(ev["target"] or "")
            if down is None:
                # Not reached directly (a proxy, a load balancer between): a hop of the same
                # query with its own finding, served while this one waited.
                down = next(
                    (by_key[k] for k in slow
                     if k != (f["hop"]["node"], f["hop"]["pid"]) and k in by_key
                     and by_key[k]["start_ns"] < ev["ts_ns"] + ev["dur_ns"]
                     and ev["ts_ns"] < by_key[k]["end_ns"]),
                    None,
                )  # fmt: skip
            if down is not None and (down["node"], down["pid"]) in slow:
                f["score"] = round(f["score"] * 0.5, 3)
                f["summary"] += (
                    f": waiting for {down['comm']} (pid {down['pid']}) on {down['node']}, "
                    "whose own finding explains it"
                )
                break


def _merge_disk_waits(found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Slow storage syscalls (or page faults) whose excess the disk explains are one cause,
    the disk: a single block_io finding, with the score of the wait it caused."""
    blk = found.get("block_io")
    if blk is not None:
        for cat in ("storage", "page_fault"):
            f = found.get(cat)
            if f is not None and blk["excess_ns"] >= 0.5 * f["excess_ns"]:
                blk["score"] = max(blk["score"], f["score"])
                blk["evidence"] = f["evidence"][:3] + blk["evidence"][:3]
                del found[cat]
    for f in found.values():
        del f["excess_ns"]
    return list(found.values())


def _memory_culprits(
    node: str, waits: list[services_pb2.NodeEvent], ours: set[int]
) -> list[dict[str, Any]]:
    """Who held the mmap_lock the query's threads waited for, by time waited."""
    held: dict[int, dict[str, Any]] = {}
    for ne in waits:
        detail = json.loads(ne.event.detail_json or "{}")
        tid = int(detail.get("holder_tid", 0))
        if not tid or tid in ours:
            continue
        c = held.setdefault(
            tid,
            {"node": node, "pod": None, "pid": int(detail.get("holder_pid", tid)), "tid": tid,
             "comm": detail.get("holder_comm", "?"), "events": 0, "kinds": ["mmap_lock"],
             "waited_ns": 0},
        )  # fmt: skip
        c["events"] += 1
        c["waited_ns"] += ne.event.dur_ns
    return sorted(held.values(), key=lambda c: -c["waited_ns"])


def _pod_name(ne: services_pb2.NodeEvent) -> str | None:
    """namespace/pod of the event's container; None outside Kubernetes."""
    return f"{ne.event.namespace}/{ne.event.pod}" if ne.event.pod else None


def _pod_of(events: list[services_pb2.NodeEvent]) -> str | None:
    return next((p for p in map(_pod_name, events) if p), None)


def _culprits(others: list[services_pb2.NodeEvent], query_tids: set[int]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, int, int], dict[str, Any]] = {}
    for ne in others:
        # tid 0: the kernel acting for a socket in interrupt context, nobody's doing
        if ne.event.tid in query_tids or ne.event.tid == 0:
            continue
        key = (ne.node, ne.event.pid, ne.event.tid)
        c = seen.setdefault(
            key,
            {"node": ne.node, "pod": _pod_name(ne), "pid": ne.event.pid, "tid": ne.event.tid,
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
    def relevant_to(ne: services_pb2.NodeEvent) -> bool:
        k, g = ne.event.kind, ne.event.group
        return {
            "network": g == "net",
            "storage": g == "storage" and k != "block_rq",
            "block_io": k == "block_rq",
            "runqueue": k == "runq",
            "lock": g == "lock" or k == "mmap_lock",
            "page_fault": k == "page_fault",
            "other": k == "offcpu" or g == "other",
        }.get(cat, False)

    relevant = [ne for ne in hop_events if relevant_to(ne)]
    relevant.sort(key=lambda ne: -ne.event.dur_ns)
    evidence = [_event(ne) for ne in relevant[:5]]
    targets = sorted({ne.event.target for ne in relevant[:5] if ne.event.has_target})
    category = CATEGORY[cat]
    mmap_lock = bool(relevant) and relevant[0].event.kind == "mmap_lock"
    if cat == "runqueue":
        culprits = _cpu_culprits(hop["node"], relevant, query_tids | {hop["pid"]})
        if not culprits:
            # The task that ran just before us may be a sibling thread that waited too;
            # the CPU's real taker shows in the waits of the rest of the process.
            waits = store.kind_in_window(hop["node"], hop["start_ns"], hop["end_ns"], "runq")
            culprits = _cpu_culprits(hop["node"], waits, query_tids | {hop["pid"]})
    elif mmap_lock:
        category = "memory"
        culprits = _memory_culprits(
            hop["node"], [ne for ne in relevant if ne.event.kind == "mmap_lock"], query_tids
        )
    elif cat in ("other", "on_cpu"):
        culprits = []
    else:
        others = store.window_events(hop["node"], hop["start_ns"], hop["end_ns"], targets, query_id)
        if cat == "lock":  # the holders: exclusive lockers, not other shared readers
            others = [ne for ne in others if "LOCK_EX" in ne.event.detail_json]
        culprits = _culprits(others, query_tids)
    if cat == "page_fault" and targets and targets[0].startswith("/"):
        category = "storage"  # a fault on a mapped file is a read of that file
    where = f"{hop['comm']} (pid {hop['pid']}) on {hop['node']}"
    if cat == "other" and evidence:
        summary = (
            f"{where} slept {value / 1e6:.1f} ms outside any traced syscall (normal p99 "
            f"{base['p99'] / 1e6:.1f} ms), longest {evidence[0]['dur_ns'] / 1e6:.1f} ms: "
            "a sleep, a futex or a lock of its runtime, not a wait for CPU, network, "
            "storage or memory"
        )
    elif cat == "other":
        summary = (
            f"{where} spent {value / 1e6:.1f} ms outside traced syscalls and CPU waits "
            f"(normal p99 {base['p99'] / 1e6:.1f} ms): on CPU or asleep; trace the sched "
            "group to tell them apart"
        )
    elif cat == "on_cpu":
        summary = (
            f"{where} ran {value / 1e6:.1f} ms on CPU (normal p99 {base['p99'] / 1e6:.1f} "
            "ms) without waiting: the work itself was heavier"
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
        if mmap_lock and culprits:
            c = culprits[0]
            summary = (
                f"{where} waited {value / 1e6:.1f} ms for its mmap_lock (normal p99 "
                f"{base['p99'] / 1e6:.1f} ms) held by {c['comm']} (pid {c['pid']})"
            )
        if cat == "block_io" and culprits:
            c = culprits[0]
            summary += f"; {c['comm']} (pid {c['pid']}) kept the same disk busy"
        if cat == "runqueue" and culprits:
            c = culprits[0]
            summary = (
                f"{where} waited {value / 1e6:.1f} ms for a CPU (normal p99 "
                f"{base['p99'] / 1e6:.1f} ms) while {c['comm']} (pid {c['pid']}) had it"
            )
    return {
        "category": category,
        # A sleep nothing explains is the least specific finding: any measured wait of the
        # same size (a CPU held by a neighbour while the thread looked asleep) ranks above.
        "score": round(min(1.0, excess / query_total) * (0.5 if cat == "other" else 1.0), 3),
        "excess_ns": excess,
        "summary": summary,
        "hop": {"node": hop["node"], "pid": hop["pid"], "comm": hop["comm"]},
        "evidence": evidence,
        "culprits": culprits,
    }


# A file a query read may have been rewritten a little before: writers are looked for this
# far back (and the flight recorder fetches at least this much before a query).
WRITER_LOOKBACK_NS = 1_000_000_000


def _unusual_files(
    store: Store,
    query_id: str,
    hop: dict[str, Any],
    files: list[str],
    hop_events: list[services_pb2.NodeEvent],
    query_tids: set[int],
) -> dict[str, Any] | None:
    used = [ne for ne in hop_events if ne.event.target in files]
    others = store.window_events(hop["node"], hop["start_ns"] - WRITER_LOOKBACK_NS, hop["end_ns"],
                                 files, query_id)  # fmt: skip
    writers = [
        ne for ne in others if ne.event.kind.startswith(("pwrite", "write", "rename", "ftruncate"))
    ]
    if not writers:
        # Merely unusual (a module loaded lazily, a cache file): not evidence of anything.
        return None
    culprits = _culprits(writers, query_tids)
    c = culprits[0] if culprits else {"comm": "?", "pid": 0, "tid": 0}
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
