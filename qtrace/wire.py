"""Conversions between qtrace's Python objects and the wire contract in protos/."""

from __future__ import annotations

import json
import time
from typing import Any

from agent.model import Event
from qtrace.api.v1 import anomalies_pb2, events_pb2, services_pb2, sessions_pb2

STATE_NAMES = {
    sessions_pb2.SESSION_STATE_ACTIVE: "active",
    sessions_pb2.SESSION_STATE_STOPPED: "stopped",
    sessions_pb2.SESSION_STATE_EXPIRED: "expired",
}


def event_to_pb(e: Event) -> events_pb2.Event:
    return events_pb2.Event(
        ts_ns=e.ts_ns,
        dur_ns=e.dur_ns,
        kind=e.kind,
        pid=e.pid,
        tid=e.tid,
        comm=e.comm,
        fd=e.fd,
        target=e.target or "",
        has_target=e.target is not None,
        ret=e.ret,
        query_id=e.query_id or "",
        has_query_id=e.query_id is not None,
        request_key=e.request_key,
        inferred=e.inferred,
        group=e.group,
        cgroup_id=e.cgroup_id,
        mono_ns=e.mono_ns,
        detail_json=json.dumps(e.detail) if e.detail is not None else "",
        request=e.request or b"",
        namespace=e.namespace or "",
        pod=e.pod or "",
        container=e.container or "",
    )


def event_to_json(e: events_pb2.Event) -> dict[str, Any]:
    """The keys of `qtrace agent trace` output, from the wire form."""
    d: dict[str, Any] = {
        "ts_ns": e.ts_ns,
        "dur_ns": e.dur_ns,
        "kind": e.kind,
        "pid": e.pid,
        "tid": e.tid,
        "comm": e.comm,
        "fd": e.fd,
        "target": e.target if e.has_target else None,
        "ret": e.ret,
        "query_id": e.query_id if e.has_query_id else None,
        "request_key": e.request_key,
        "inferred": e.inferred,
        "group": e.group,
        "cgroup_id": e.cgroup_id,
        "mono_ns": e.mono_ns,
    }
    if e.detail_json:
        d["detail"] = json.loads(e.detail_json)
    if e.pod:
        d |= {"namespace": e.namespace, "pod": e.pod, "container": e.container}
    return d


def node_event_to_json(ne: services_pb2.NodeEvent) -> dict[str, Any]:
    d = event_to_json(ne.event)
    d["node"] = ne.node
    d["agent_id"] = ne.agent_id
    d["session_id"] = ne.session_id
    return d


def session_to_json(s: sessions_pb2.Session) -> dict[str, Any]:
    t = s.targets
    ex = s.extractor
    return {
        "session_id": s.id,
        "state": STATE_NAMES.get(s.state, "unknown"),
        "targets": {
            "pids": list(t.pids),
            "comms": list(t.comms),
            "cmdline_regexes": list(t.cmdline_regexes),
            "cgroups": list(t.cgroups),
            "namespaces": list(t.namespaces),
            "label_selector": t.label_selector or None,
            "pods": list(t.pods),
        },
        "probes": list(s.probes),
        "max_event_rate": s.max_event_rate or None,
        "detail": "recorder" if s.detail == sessions_pb2.DETAIL_MODE_RECORDER else "full",
        "history_bytes": s.history_bytes or None,
        "extractor": {"regex": ex.regex}
        if ex.WhichOneof("how") == "regex"
        else {"header": ex.header or "X-Query-Id"},
        "created_ns": s.created_ns,
        "expires_ns": s.expires_ns,
        "remaining_s": max(0.0, (s.expires_ns - time.time_ns()) / 1e9)
        if s.state == sessions_pb2.SESSION_STATE_ACTIVE
        else 0.0,
        "started_by": s.started_by,
        "capture": {
            "requests": s.capture.requests,
            "bodies": s.capture.bodies,
            "max_bytes": s.capture.max_bytes,
            "redact": {
                "headers": list(s.capture.redact.headers),
                "regexes": list(s.capture.redact.regexes),
            },
        },
    }


def stats_to_json(a: services_pb2.SessionAgentStats) -> dict[str, Any]:
    return {
        "session_id": a.session_id,
        "agent_id": a.agent_id,
        "node": a.node,
        "events_stored": a.events_stored,
        "batches": a.batches,
        "duplicate_batches": a.duplicates,
        "dropped": a.dropped,
        "shed": a.shed,
        "complete": a.complete,
        "disconnected": a.disconnected,
        "error": a.error or None,
        "drops": drops_to_json(a.drops),
        "history": history_to_json(a),
    }


def history_to_json(a: services_pb2.SessionAgentStats) -> dict[str, Any] | None:
    """Flight recorder sessions: the node's recent history and how far back it reaches."""
    if not a.HasField("history"):
        return None
    h = a.history
    covered_s = max(0.0, (time.time_ns() - h.covered_from_ns) / 1e9) if h.covered_from_ns else 0.0
    return {
        "bytes": h.bytes,
        "covered_from_ns": h.covered_from_ns,
        "covers_s": round(covered_s, 3),
        "events_per_s": h.events_per_s,
    }


def history_text(history: dict[str, Any] | None) -> str:
    if history is None:
        return "-"
    return (
        f"{history['covers_s']:.1f} s ({history['bytes'] >> 20} MiB, {history['events_per_s']}/s)"
    )


def drops_to_json(drops: Any) -> dict[str, dict[str, int]]:
    return {
        d.kind: {
            "produced": d.produced,
            "received": d.received,
            "lost_ringbuf": d.lost_ringbuf,
            "lost_mapfull": d.lost_mapfull,
            "lost_agent": d.lost_agent,
            "lost_spool": d.lost_spool,
            "filtered": d.filtered,
            "shed": d.shed,
            "recorded": d.recorded,
        }
        for d in drops
    }


ANOMALY_TYPES = {
    "mismatch": anomalies_pb2.ANOMALY_TYPE_MISMATCH,
    "latency": anomalies_pb2.ANOMALY_TYPE_LATENCY,
    "error": anomalies_pb2.ANOMALY_TYPE_ERROR,
}
ANOMALY_NAMES = {v: k for k, v in ANOMALY_TYPES.items()}


def anomaly_to_json(a: anomalies_pb2.Anomaly) -> dict[str, Any]:
    return {
        "query_id": a.query_id,
        "type": ANOMALY_NAMES.get(a.type, "unknown"),
        "session_id": a.session_id or None,
        "ts_ns": a.ts_ns,
        "source": a.source,
        "detail": json.loads(a.detail_json) if a.detail_json else None,
    }


def anomaly_from_json(obj: Any) -> anomalies_pb2.Anomaly:
    """One anomaly from its JSON form; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("an anomaly must be a JSON object")
    qid = obj.get("query_id")
    if not isinstance(qid, str) or not qid:
        raise ValueError("'query_id' must be a non-empty string")
    kind = obj.get("type")
    if kind not in ANOMALY_TYPES:
        raise ValueError("'type' must be mismatch, latency or error")
    ts = obj.get("ts_ns", 0)
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise ValueError("'ts_ns' must be a non-negative integer")
    sid = obj.get("session_id") or ""
    if not isinstance(sid, str):
        raise ValueError("'session_id' must be a string")
    detail = obj.get("detail")
    return anomalies_pb2.Anomaly(
        query_id=qid,
        type=ANOMALY_TYPES[kind],
        session_id=sid,
        ts_ns=ts,
        detail_json=json.dumps(detail) if detail is not None else "",
        source=str(obj.get("source") or "import"),
    )
