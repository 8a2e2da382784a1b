"""Flight recorder: how many anomalous queries get their whole timeline back, by how late
the anomaly is reported, at a given event rate per node.

A recorder session (default history size) traces the test search service and a load
process that keeps the node's traced event rate near --rate (50k events/s by default).
For each delay (1 s, 10 s, 30 s), --queries marked queries are sent; the anomaly for each
is reported that long after it ran, and its explanation is asked for. A query counts as
recovered when the explanation is complete: every hop has its events, and no node's
history had been overwritten in the query's window.

    .venv/bin/python bench/recorder_recovery.py [--rate 50000] [--history-size 64M]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.abi import HSLOT_SIZE
from qtrace.demo import start
from searchsvc.client import drive
from searchsvc.cluster import Cluster

QTRACE = str(Path(sys.executable).parent / "qtrace")

# The load: preads of a small file at a paced rate (each is one storage event).
LOAD = """
import os, sys, threading, time
fd = os.open(sys.argv[1], os.O_RDONLY)
rate = [0]
def read_rates():
    for line in sys.stdin:
        rate[0] = int(line)
threading.Thread(target=read_rates, daemon=True).start()
print("ready", flush=True)
start, n, last = time.monotonic(), 0, 0
while True:
    if rate[0] != last:  # a new rate counts from now
        start, n, last = time.monotonic(), 0, rate[0]
    due = int((time.monotonic() - start) * last)
    while n < due:
        os.pread(fd, 64, 0)
        n += 1
    time.sleep(0.002)
"""


def q(*args: str) -> Any:
    r = subprocess.run(
        [QTRACE, *args, "--format", "json"], capture_output=True, text=True, check=False
    )
    if r.returncode:
        raise SystemExit(f"qtrace {' '.join(args)} failed: {r.stderr}")
    return json.loads(r.stdout)


def query(root_url: str, qid: str) -> None:
    req = urllib.request.Request(f"{root_url}/search?q=alpha+beta", headers={"X-Query-Id": qid})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=50_000, help="traced events/s on the node")
    ap.add_argument("--delays", default="1,10,30", help="seconds, comma separated")
    ap.add_argument("--queries", type=int, default=20, help="anomalous queries per delay")
    ap.add_argument("--history-size", default="64M")
    ap.add_argument("--verbose", action="store_true", help="print every reason")
    a = ap.parse_args()
    delays = [float(x) for x in a.delays.split(",")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        col, line = start(["collector", "run", "--db", f"{d}/r.duckdb", "--listen",
                           "127.0.0.1:0"], "listening")  # fmt: skip
        addr = "127.0.0.1:" + line.split(":")[-1].split(",")[0]
        agent, _ = start(["agent", "run", "--collector", addr, "--node", "bench",
                          "--spool-dir", f"{d}/spool"], "agent")  # fmt: skip
        (tmp / "file").write_bytes(b"x" * 4096)
        stop = threading.Event()
        try:
            with Cluster(tmp / "svc") as svc:
                # The service itself makes part of the rate; the load the rest.
                load = subprocess.Popen(
                    [sys.executable, "-c", LOAD, str(tmp / "file")],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                assert load.stdout is not None and load.stdout.readline() == "ready\n"
                assert load.stdin is not None
                targets = [x for p in [*svc.pids.values(), load.pid] for x in ("--pid", str(p))]
                sid = q("session", "start", *targets, "--duration", "30m", "--probes", "all",
                        "--capture", "recorder", "--history-size", a.history_size,
                        "--max-event-rate", "5000000",
                        "--collector", addr)["session_id"]  # fmt: skip
                while not q("session", "status", sid, "--collector", addr)["agents"]:
                    time.sleep(0.1)  # the agent announces itself once attached
                background = threading.Thread(
                    target=lambda: [drive(svc.root_url, 1.0, 2) for _ in iter(stop.is_set, True)],
                    daemon=True,
                )
                background.start()
                time.sleep(3.0)  # the service's own rate, measured by the agent
                hist = q("session", "status", sid, "--collector", addr)["agents"][0]["history"]
                own = (hist or {}).get("events_per_s", 0)
                load.stdin.write(f"{max(0, a.rate - own)}\n")
                load.stdin.flush()
                time.sleep(3.0)  # let the rate settle before measuring it
                status = q("session", "status", sid, "--collector", addr)["agents"][0]
                hist = status["history"] or {}
                size, rate = hist.get("bytes", 0), max(1, hist.get("events_per_s", 1))
                print(f"history {size >> 20} MiB, filling at {rate} events/s: "
                      f"{size / HSLOT_SIZE / rate:.1f} s on average; the busiest CPU's ring "
                      f"covers {hist.get('covers_s', 0):.1f} s so far")  # fmt: skip
                rows = []
                for delay in delays:
                    qids = [f"late{int(delay)}-{i:04d}" for i in range(a.queries)]
                    sent_at = []
                    for qid in qids:
                        query(svc.root_url, qid)
                        sent_at.append(time.monotonic())
                        time.sleep(0.05)
                    recovered = 0
                    reasons: dict[str, int] = {}
                    # All at once, as a comparator's batch of verdicts: the last query's
                    # anomaly comes `delay` after it, the first one's up to a second more.
                    time.sleep(max(0.0, sent_at[-1] + delay - time.monotonic()))
                    verdicts = tmp / f"late{int(delay)}.jsonl"
                    verdicts.write_text("".join(
                        json.dumps({"query_id": x, "type": "latency", "session_id": sid}) + "\n"
                        for x in qids
                    ))  # fmt: skip
                    q("anomaly", "import", str(verdicts), "--collector", addr)
                    for qid in qids:
                        x = q("explain", qid, "--collector", addr)
                        if x["completeness"]["complete"]:
                            recovered += 1
                        if a.verbose:
                            print(qid, x["completeness"]["reasons"])
                        for r in x["completeness"]["reasons"]:
                            key = r.split(":")[0][:60]
                            reasons[key] = reasons.get(key, 0) + 1
                    rows.append((delay, recovered, len(qids), reasons))
                    print(f"delay {delay:>4.0f} s: {recovered}/{len(qids)} recovered "
                          f"({recovered / len(qids):.2f})"
                          + (f"; {reasons}" if reasons else ""), flush=True)  # fmt: skip
                drops = q("session", "status", sid, "--collector", addr)["agents"][0]["drops"]
                lost = {
                    k: {c: v for c, v in d.items() if c.startswith("lost") and v}
                    for k, d in drops.items()
                }
                print("lost on the way:", {k: v for k, v in lost.items() if v} or "nothing")
                stop.set()
                background.join()
                load.kill()
                load.wait()
        finally:
            stop.set()
            agent.terminate()
            agent.wait(30)
            col.terminate()
            col.wait(30)
    print("recovered share by delay: "
          + ", ".join(f"{d:.0f} s {r / n:.2f}" for d, r, n, _ in rows))  # fmt: skip


if __name__ == "__main__":
    main()
