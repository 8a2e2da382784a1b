"""Throughput of the test search service untraced vs traced, alternating in one run.

Each round drives the service for --seconds untraced, then again under each traced mode
while `qtrace agent trace` (a separate process, as in production) traces root and leaves:
by default full capture (every event leaves the kernel) and the flight recorder (per-request
summaries; the detail stays in the kernel's recent history). The printed ratios are the
medians of per-round traced/untraced ratios: machines here are noisy, so only side-by-side
figures from one run mean anything. Goal for the recorder with all probe groups: >= 0.98.

    .venv/bin/python bench/trace_overhead.py [--probes all] [--modes full,recorder]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from searchsvc.client import drive
from searchsvc.cluster import Cluster

QTRACE = str(Path(sys.executable).parent / "qtrace")
MODES = {"full": [], "recorder": ["--capture", "recorder"]}


def traced(pids: list[int], out: Path, probes: str, extra: list[str]) -> subprocess.Popen[str]:
    args = [QTRACE, "agent", "trace", "--out", str(out), "--format", "json", "--probes", probes]
    for pid in pids:
        args += ["--pid", str(pid)]
    proc = subprocess.Popen(
        [*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
    ap.add_argument("--modes", default="full,recorder", help="of: " + ", ".join(MODES))
    a = ap.parse_args()
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}: pick from {', '.join(MODES)}")
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as data, Cluster(Path(data)) as c:
        pids = list(c.pids.values())
        drive(c.root_url, 1.0, a.concurrency)  # warm caches and threads
        print(f"probes: {a.probes or 'default'}")
        print(f"{'round':>5} {'mode':<9} {'untraced q/s':>13} {'traced q/s':>11} {'ratio':>6}"
              f" {'shipped':>8} {'recorded':>9} {'lost':>5}")  # fmt: skip
        for r in range(a.rounds):
            base = drive(c.root_url, a.seconds, a.concurrency) / a.seconds
            for mode in modes:
                agent = traced(pids, Path(data) / f"ev-{r}-{mode}.jsonl", a.probes, MODES[mode])
                try:
                    tr = drive(c.root_url, a.seconds, a.concurrency) / a.seconds
                finally:
                    agent.terminate()
                    out, _ = agent.communicate(timeout=60)
                s = json.loads(out)
                ratios[mode].append(tr / base)
                print(f"{r:>5} {mode:<9} {base:>13.0f} {tr:>11.0f} {tr / base:>6.3f}"
                      f" {s['written']:>8} {s.get('recorded', 0):>9} {s['lost']:>5}")  # fmt: skip
    for mode in modes:
        print(f"median traced/untraced throughput, {mode}: {statistics.median(ratios[mode]):.3f}")


if __name__ == "__main__":
    main()
