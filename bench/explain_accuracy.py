"""How often `explain` names the injected cause first: precision and recall per fault
class, and false positives on normal queries.

Runs a collector, a node agent (every probe group, node-wide context included), the test
search service as old (twice) and new with rare faults of every class, traces the new
deployment, replays queries, then explains every query the service journaled as faulty
and a sample of normal ones. The expected answer per class, for the top finding:

- stale-index: on the faulty leaf, storage, naming the thread that rewrote the file;
- slow (a leaf sleeping past the root's deadline): on the faulty leaf, other;
- cpu-starved: on the faulty leaf, cpu, naming the SCHED_FIFO neighbour;
- lock-held: on the faulty leaf, lock, naming the neighbour holding the file lock;
- disk-io: on the faulty leaf, block_io, naming the neighbour keeping the disk busy;
- net-delay (the leaf's answer held on the way back): network, on the root's hop, waiting
  on the connection to that leaf (through its proxy), with no finding on the leaf."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qtrace.demo import start
from searchsvc.client import make_queries
from searchsvc.cluster import Cluster

QTRACE = str(Path(sys.executable).parent / "qtrace")
EXPECTED = {
    "stale-index": "storage",
    "slow": "other",
    "cpu-starved": "cpu",
    "lock-held": "lock",
    "disk-io": "block_io",
    "net-delay": "network",
}
NEIGHBOUR = {"cpu-starved": "hog_pid", "lock-held": "locker_pid", "disk-io": "diskio_pid"}
FAULTS = ("stale-index", "deadline", "cpu-starved", "lock-held", "net-delay", "disk-io")


def q(*args: str) -> Any:
    r = subprocess.run(
        [QTRACE, *args, "--format", "json"], capture_output=True, text=True, check=False
    )
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)


def judge(x: dict[str, Any], truth: tuple[str, int, int | None] | None, root: int) -> str | None:
    """The top finding's category if it is right about where and who, else None. For a
    normal query (no truth), any finding at all is its category (a false positive)."""
    top = x["findings"][0] if x["findings"] else None
    if top is None or truth is None:
        return top["category"] if top else None
    fault, leaf, named = truth
    if fault == "net-delay":
        on_leaf = any(f["hop"]["pid"] == leaf for f in x["findings"])
        targets = [e["target"] or "" for e in top["evidence"]]
        waited = any(t.endswith(f":{named}") for t in targets)
        ok = top["hop"]["pid"] == root and waited and not on_leaf
        return top["category"] if ok else None
    if top["hop"]["pid"] != leaf:
        return None
    culprits = {c["pid"] for c in top["culprits"]}
    if fault in NEIGHBOUR and named not in culprits:
        return None
    if fault == "stale-index" and not top["culprits"]:
        return None
    return str(top["category"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--fault-rate", type=float, default=1 / 100)
    ap.add_argument("--normal", type=int, default=60, help="normal queries to explain")
    ap.add_argument("--verbose", action="store_true", help="print every wrong top finding")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        col, line = start(["collector", "run", "--db", f"{d}/b.duckdb", "--listen",
                           "127.0.0.1:0"], "listening")  # fmt: skip
        addr = "127.0.0.1:" + line.split(":")[-1].split(",")[0]
        agent, _ = start(["agent", "run", "--collector", addr, "--node", "bench",
                          "--spool-dir", f"{d}/spool"], "agent")  # fmt: skip
        try:
            with (
                Cluster(tmp / "old-a") as old_a,
                Cluster(tmp / "old-b") as old_b,
                Cluster(tmp / "new", fault_rate=a.fault_rate, deadline_ms=400, fault_seed=11,
                        faults=FAULTS) as new,
            ):  # fmt: skip
                targets = [x for pid in new.pids.values() for x in ("--pid", str(pid))]
                sid = q("session", "start", *targets, "--duration", "30m", "--probes", "all",
                        "--collector", addr)["session_id"]  # fmt: skip
                while not q("session", "status", sid, "--collector", addr)["agents"]:
                    time.sleep(0.1)  # the agent announces itself once attached
                log = tmp / "q.txt"
                log.write_text("".join(f"{t}\n" for _i, t in make_queries(a.queries, seed=4)))
                subprocess.run(
                    [QTRACE, "replay", "--queries", str(log), "--template",
                     "GET /search?q={query}", "--primary", old_a.root_url, "--secondary",
                     old_b.root_url, "--candidate", new.root_url, "--concurrency", "4",
                     "--session", sid, "--collector", addr, "--format", "json"],
                    check=True, capture_output=True,
                )  # fmt: skip
                q("session", "stop", sid, "--collector", addr)
                while not all(
                    x["complete"]
                    for x in q("session", "status", sid, "--collector", addr)["agents"]
                ):
                    time.sleep(0.1)
                journals = {role: new.journal(role, settle_s=10) for role in new.pids}
                pids = dict(new.pids)
                proxy_ports = {role: urlsplit(u).port for role, u in new.proxy_urls.items()}
            # qid -> (fault, leaf pid, what must be named: a neighbour pid, or the port of
            # the leaf's proxy for net-delay)
            truth: dict[str, tuple[str, int, int | None]] = {}
            busy = []  # windows in which a neighbour slowed whatever ran then
            for role, j in journals.items():
                for r in j["records"]:
                    fault = r.get("fault")
                    if fault not in EXPECTED:
                        continue
                    named = r.get(NEIGHBOUR.get(fault, ""))
                    if fault == "net-delay":
                        named = proxy_ports.get(role)
                    truth[r["query_id"]] = (fault, pids[role], named)
                    if fault in ("cpu-starved", "lock-held"):
                        busy.append((r["start_ns"], r["end_ns"]))
                    if fault == "disk-io":
                        busy.append((r["diskio_start_ns"], r["diskio_end_ns"]))
            records = [r for j in journals.values() for r in j["records"]]
            collateral = {
                r["query_id"] for r in records
                if any(r["start_ns"] < e and s < r["end_ns"] for s, e in busy)
            }  # fmt: skip
            faulty = {r["query_id"] for r in records if r.get("fault")}
            normal = sorted({r["query_id"] for r in journals["root"]["records"]}
                            - faulty - collateral)  # fmt: skip
            normal = normal[:: max(1, len(normal) // a.normal)][: a.normal]
            predicted: dict[str, str | None] = {}
            for qid in [*truth, *normal]:
                x = q("explain", qid, "--collector", addr)
                predicted[qid] = judge(x, truth.get(qid), pids["root"])
                t = truth.get(qid)
                wrong = predicted[qid] != (EXPECTED[t[0]] if t else None)
                if a.verbose and wrong:
                    top = x["findings"][0] if x["findings"] else {}
                    print(f"{qid} {t}: top {top.get('category')} on {top.get('hop')}, "
                          f"culprits {[c['pid'] for c in top.get('culprits', [])]}: "
                          f"{top.get('summary')}", file=sys.stderr)  # fmt: skip
        finally:
            agent.terminate()
            agent.wait()
            col.terminate()
            col.wait()
    print(f"{'class':<12} {'n':>4} {'recall':>7} {'precision':>9}")
    for fault, cat in EXPECTED.items():
        mine = [qid for qid, t in truth.items() if t[0] == fault]
        hits = sum(predicted[qid] == cat for qid in mine)
        claimed = [qid for qid, p in predicted.items() if p == cat]
        correct = sum(qid in truth and truth[qid][0] == fault for qid in claimed)
        recall = hits / len(mine) if mine else float("nan")
        precision = correct / len(claimed) if claimed else float("nan")
        print(f"{fault:<12} {len(mine):>4} {recall:>7.2f} {precision:>9.2f}")
    fp = Counter(predicted[qid] for qid in normal if predicted[qid])
    print(f"normal queries: {len(normal)}, with a finding: {sum(fp.values())} {dict(fp)}")


if __name__ == "__main__":
    main()
