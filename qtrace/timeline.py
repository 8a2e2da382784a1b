"""Post-mortem timelines of one query: Perfetto (Chrome trace-event JSON) and HTML."""

from __future__ import annotations

import html
from typing import Any

_COLOURS = {
    "net": "#3b82f6",
    "storage": "#f59e0b",
    "block_rq": "#ef4444",
    "hop": "#10b981",
    "sched": "#a855f7",
    "other": "#6b7280",
    "culprit": "#db2777",
}


def _peer(target: str | None) -> tuple[str, str] | None:
    if not target or "->" not in target:
        return None
    a, b = target.split("->", 1)
    return a, b


def perfetto(explanation: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Trace-event JSON (ui.perfetto.dev, chrome://tracing): a process per node and pid,
    a track per thread, a slice per syscall, hop slices, flows from a sub-request to the
    hop that served it, culprits on tracks of their own."""
    out: list[dict[str, Any]] = []
    evidence = [ev for f in explanation["findings"] for ev in f["evidence"]]
    t0 = min(
        [e["ts_ns"] for e in [*events, *evidence]] + [h["start_ns"] for h in explanation["hops"]]
        or [0]
    )
    procs: dict[tuple[str, int], int] = {}

    def pid_of(node: str, pid: int, comm: str, culprit: bool = False) -> int:
        key = (node, pid)
        if key not in procs:
            procs[key] = len(procs) + 1
            label = f"{node} · {comm} {pid}" + (" (culprit)" if culprit else "")
            out.append({"ph": "M", "name": "process_name", "pid": procs[key],
                        "args": {"name": label}})  # fmt: skip
        return procs[key]

    def us(ns: int) -> float:
        return float((ns - t0) / 1000.0)

    for h in explanation["hops"]:
        p = pid_of(h["node"], h["pid"], h["comm"])
        out.append({"ph": "M", "name": "thread_name", "pid": p, "tid": 0,
                    "args": {"name": "hop"}})  # fmt: skip
        out.append({
            "ph": "X", "name": f"hop {h['comm']}", "cat": "hop", "pid": p, "tid": 0,
            "ts": us(h["start_ns"]), "dur": max(0.001, (h["end_ns"] - h["start_ns"]) / 1000),
            "args": {k: v for k, v in h["breakdown_ns"].items() if v is not None},
        })  # fmt: skip
    inbound: dict[str, dict[str, Any]] = {}
    for e in events:
        p = pid_of(e["node"], e["pid"], e["comm"])
        out.append({
            "ph": "X", "name": e["kind"], "cat": e["group"], "pid": p, "tid": e["tid"],
            "ts": us(e["ts_ns"]), "dur": max(0.001, e["dur_ns"] / 1000),
            "args": {"target": e["target"], "ret": e["ret"], "fd": e["fd"]},
        })  # fmt: skip
        peer = _peer(e["target"])
        if peer and e["kind"] in ("recvfrom", "read", "recvmsg", "readv"):
            inbound.setdefault(peer[0], e)  # first read on our side of a connection
    flow = 0
    for e in events:
        peer = _peer(e["target"])
        if not peer or e["kind"] not in ("sendto", "write", "sendmsg", "writev"):
            continue
        served = inbound.get(peer[1])
        if served is None or served["pid"] == e["pid"]:
            continue
        flow += 1
        src, dst = (
            pid_of(e["node"], e["pid"], e["comm"]),
            pid_of(served["node"], served["pid"], served["comm"]),
        )
        out.append({"ph": "s", "id": flow, "name": "sub-request", "cat": "flow", "pid": src,
                    "tid": e["tid"], "ts": us(e["ts_ns"])})  # fmt: skip
        out.append({"ph": "f", "bp": "e", "id": flow, "name": "sub-request", "cat": "flow",
                    "pid": dst, "tid": served["tid"], "ts": us(served["ts_ns"] + served["dur_ns"])})  # fmt: skip
        inbound.pop(peer[1])
    for f in explanation["findings"]:
        for c in f["culprits"]:
            p = pid_of(c["node"], c["pid"], c["comm"], culprit=True)
            for ev in f["evidence"]:
                if ev["pid"] == c["pid"] and ev["tid"] == c["tid"]:
                    out.append({
                        "ph": "X", "name": ev["kind"], "cat": "culprit", "pid": p,
                        "tid": ev["tid"], "ts": us(ev["ts_ns"]), "dur": max(0.001, ev["dur_ns"] / 1000),
                        "args": {"target": ev["target"], "finding": f["summary"]},
                    })  # fmt: skip
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "metadata": {
            "query_id": explanation["query_id"],
            "clock_uncertainty_ns": explanation["completeness"]["clock_uncertainty_ns"],
        },
    }


def render_html(explanation: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """One self-contained page: findings, hops, and an SVG timeline (no scripts, no
    network). Everything that came from traced processes is escaped."""
    esc = html.escape
    hops = explanation["hops"]
    t0 = min([e["ts_ns"] for e in events] + [h["start_ns"] for h in hops] or [0])
    t1 = max([e["ts_ns"] + e["dur_ns"] for e in events] + [h["end_ns"] for h in hops] or [1])
    span = max(1, t1 - t0)
    width, label_w, row_h = 1100, 260, 22
    rows: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for e in events:
        rows.setdefault((e["node"], e["pid"], e["tid"]), []).append(e)
    svg = []
    y = 10

    def x_of(ns: int) -> float:
        return float(label_w + (ns - t0) / span * (width - label_w - 10))

    for h in hops:
        x0, x1 = x_of(h["start_ns"]), x_of(h["end_ns"])
        svg.append(
            f'<text x="4" y="{y + 15}" class="lbl">hop {esc(h["node"])} · {esc(h["comm"])} {h["pid"]}</text>'
        )
        svg.append(
            f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(1.0, x1 - x0):.1f}" height="{row_h - 6}" fill="{_COLOURS["hop"]}"><title>{esc(h["comm"])}: {(h["end_ns"] - h["start_ns"]) / 1e6:.3f} ms</title></rect>'
        )
        y += row_h
    for (node, pid, tid), evs in sorted(rows.items()):
        svg.append(
            f'<text x="4" y="{y + 15}" class="lbl">{esc(node)} · {esc(evs[0]["comm"])} {pid}/{tid}</text>'
        )
        for e in evs:
            x0 = x_of(e["ts_ns"])
            w = max(1.0, e["dur_ns"] / span * (width - label_w - 10))
            colour = (
                _COLOURS["block_rq"]
                if e["kind"] == "block_rq"
                else _COLOURS.get(e["group"], "#999")
            )
            tip = f"{e['kind']} {e['target'] or ''} {e['dur_ns'] / 1e3:.1f} µs ret={e['ret']}"
            svg.append(
                f'<rect x="{x0:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{colour}"><title>{esc(tip)}</title></rect>'
            )
        y += row_h
    findings = (
        "".join(
            f"<li><b>{esc(f['category'])}</b> (score {f['score']}): {esc(f['summary'])}"
            + (
                "<br>culprits: "
                + ", ".join(f"{esc(c['comm'])} pid {c['pid']}" for c in f["culprits"])
                if f["culprits"]
                else ""
            )
            + "</li>"
            for f in explanation["findings"]
        )
        or "<li>no finding above the threshold: this query looks like its peers</li>"
    )
    anomalies = ", ".join(esc(a["type"]) for a in explanation["anomalies"]) or "none reported"
    comp = explanation["completeness"]
    hop_rows = "".join(
        f"<tr><td>{esc(h['node'])}</td><td>{esc(h['comm'])}</td><td>{h['pid']}</td>"
        f"<td>{(h['end_ns'] - h['start_ns']) / 1e6:.3f}</td>"
        + "".join(
            f"<td>{'' if v is None else f'{v / 1e6:.3f}'}</td>" for v in h["breakdown_ns"].values()
        )
        + "</tr>"
        for h in hops
    )
    cols = "".join(f"<th>{esc(k)} ms</th>" for k in (hops[0]["breakdown_ns"] if hops else {}))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>qtrace: query {esc(explanation["query_id"])}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #111; }}
h1 {{ font-size: 20px; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ddd; padding: 2px 8px; text-align: right; }}
.lbl {{ font: 11px monospace; fill: #333; }} .legend span {{ padding: 0 8px; color: #fff; }}
</style></head><body>
<h1>Query <code>{esc(explanation["query_id"])}</code></h1>
<p>Anomalies: {anomalies}. Events: {comp["events"]}. Clock uncertainty between nodes:
±{comp["clock_uncertainty_ns"] / 1e3:.0f} µs. {"Complete." if comp["complete"] else "Incomplete: " + esc("; ".join(comp["reasons"]))}</p>
<h2>Findings, most likely cause first</h2><ol id="findings">{findings}</ol>
<h2>Hops</h2><table><tr><th>node</th><th>process</th><th>pid</th><th>total ms</th>{cols}</tr>{hop_rows}</table>
<h2>Timeline</h2>
<p class="legend"><span style="background:{_COLOURS["hop"]}">hop</span><span style="background:{_COLOURS["net"]}">network</span><span style="background:{_COLOURS["storage"]}">storage</span><span style="background:{_COLOURS["block_rq"]}">block I/O</span><span style="background:{_COLOURS["sched"]}">CPU wait</span><span style="background:{_COLOURS["other"]}">pipe etc.</span> hover a bar for details; {span / 1e6:.3f} ms in all</p>
<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}">{"".join(svg)}</svg>
</body></html>
"""
