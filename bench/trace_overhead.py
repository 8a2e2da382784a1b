"""Throughput of the test search service untraced vs traced, alternating in one run.

Each round drives the service for --seconds untraced, then again while `qtrace agent
trace` (a separate process, as in production) traces root and leaves. The printed ratio
is the median of per-round traced/untraced ratios: machines here are noisy, so only
side-by-side figures from one run mean anything."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from searchsvc.client import drive
from searchsvc.cluster import Cluster

QTRACE = str(Path(sys.executable).parent / "qtrace")


def traced(pids: list[int], out: Path, probes: str) -> subprocess.Popen[str]:
    args = [QTRACE, "agent", "trace", "--out", str(out), "--format", "json", "--probes", probes]
    for pid in pids:
        args += ["--pid", str(pid)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the agent prints this once its probes are attached
    if not line.startswith("tracing"):
        raise SystemExit(f"agent failed to start: {line}{proc.stderr.read()}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--probes", default="", help="probe groups (default: all but node)")
    a = ap.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as data, Cluster(Path(data)) as c:
        pids = list(c.pids.values())
        drive(c.root_url, 1.0, a.concurrency)  # warm caches and threads
        print(f"{'round':>5} {'untraced q/s':>13} {'traced q/s':>11} {'ratio':>6} {'events':>8}")
        for r in range(a.rounds):
            base = drive(c.root_url, a.seconds, a.concurrency) / a.seconds
            agent = traced(pids, Path(data) / f"events-{r}.jsonl", a.probes)
            try:
                tr = drive(c.root_url, a.seconds, a.concurrency) / a.seconds
            finally:
                agent.terminate()
                out, _ = agent.communicate(timeout=60)
            import json

            summary = json.loads(out)
            ratios.append(tr / base)
            print(f"{r:>5} {base:>13.0f} {tr:>11.0f} {tr / base:>6.3f} {summary['written']:>8}")
            if summary["lost"]:
                print(f"      lost events: {summary['lost']}")
    print(f"median traced/untraced throughput: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
