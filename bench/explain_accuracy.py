"""How often `explain` names the injected cause first: precision and recall per fault
class, and false positives on normal queries.

Runs a collector, a node agent, the test search service as old (twice) and new with
rare faults of every class, traces the new deployment, replays queries, then explains
every query the service journaled as faulty and a sample of normal ones. The expected
answer per class: the top finding is on the faulty leaf, with category storage (a
stale index file, naming the writer), other (a leaf sleeping past the root's deadline:
not measurable as CPU, network or storage), cpu (a SCHED_FIFO neighbour, named) or lock
(a neighbour holding the leaf's refresh lock, named)."""

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

from qtrace.demo import start
from searchsvc.client import make_queries
from searchsvc.cluster import Cluster

QTRACE = str(Path(sys.executable).parent / "qtrace")
EXPECTED = {"stale-index": "storage", "slow": "other", "cpu-starved": "cpu", "lock-held": "lock"}


def q(*args: str) -> Any:
    r = subprocess.run(
        [QTRACE, *args, "--format", "json"], capture_output=True, text=True, check=False
    )
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--fault-rate", type=float, default=1 / 100)
    ap.add_argument("--normal", type=int, default=60, help="normal queries to explain")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        col, line = start(["collector", "run", "--db", f"{d}/b.duckdb", "--listen",
                           "127.0.0.1:0"], "listening")  # fmt: skip
        addr = "127.0.0.1:" + line.split(":")[-1].split(",")[0]
        agent, _ = start(["agent", "run", "--collector", addr, "--node", "bench"], "agent")
        try:
            with (
                Cluster(tmp / "old-a") as old_a,
                Cluster(tmp / "old-b") as old_b,
                Cluster(tmp / "new", fault_rate=a.fault_rate, deadline_ms=400, fault_seed=11,
                        faults=("stale-index", "deadline", "cpu-starved", "lock-held")) as new,
            ):  # fmt: skip
                targets = [x for pid in new.pids.values() for x in ("--pid", str(pid))]
                sid = q("session", "start", *targets, "--duration", "30m",
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
            truth: dict[str, tuple[str, int]] = {}
            spins = []
            for role, j in journals.items():
                for r in j["records"]:
                    if r.get("fault") in EXPECTED:
                        truth[r["query_id"]] = (r["fault"], pids[role])
                    if r.get("fault") in ("cpu-starved", "lock-held"):
                        spins.append(r)
            records = [r for j in journals.values() for r in j["records"]]
            collateral = {
                r["query_id"] for r in records
                if any(r["start_ns"] < s["end_ns"] and s["start_ns"] < r["end_ns"] for s in spins)
            }  # fmt: skip
            faulty = {r["query_id"] for r in records if r.get("fault")}
            normal = sorted({r["query_id"] for r in journals["root"]["records"]}
                            - faulty - collateral)  # fmt: skip
            normal = normal[:: max(1, len(normal) // a.normal)][: a.normal]
            predicted: dict[str, str | None] = {}
            for qid in [*truth, *normal]:
                x = q("explain", qid, "--collector", addr)
                top = x["findings"][0] if x["findings"] else None
                leaf = truth.get(qid, ("", 0))[1]
                predicted[qid] = (
                    top["category"] if top and (not leaf or top["hop"]["pid"] == leaf) else None
                )
        finally:
            agent.terminate()
            agent.wait()
            col.terminate()
            col.wait()
    print(f"{'class':<12} {'n':>4} {'recall':>7} {'precision':>9}")
    for fault, cat in EXPECTED.items():
        mine = [qid for qid, (f, _p) in truth.items() if f == fault]
        hits = sum(predicted[qid] == cat for qid in mine)
        claimed = [qid for qid, p in predicted.items() if p == cat]
        correct = sum(truth.get(qid, ("", 0))[0] == fault for qid in claimed)
        recall = hits / len(mine) if mine else float("nan")
        precision = correct / len(claimed) if claimed else float("nan")
        print(f"{fault:<12} {len(mine):>4} {recall:>7.2f} {precision:>9.2f}")
    fp = Counter(predicted[qid] for qid in normal if predicted[qid])
    print(f"normal queries: {len(normal)}, with a finding: {sum(fp.values())} {dict(fp)}")


if __name__ == "__main__":
    main()
