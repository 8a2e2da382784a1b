"""What the node probe group costs processes that are not traced: an untraced neighbour's
file syscall rate with no agent, with an agent tracing the default groups, and with the
node group added (whose programs look at every process's file syscalls), alternating in
one run. Also the agent's event count: the node group keeps only what touches the
targets' files, so an unrelated neighbour should add nothing but kernel filtering."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QTRACE = str(Path(sys.executable).parent / "qtrace")

NEIGHBOUR = """
import os, sys, time
d = sys.argv[1]
big = os.open(os.path.join(d, "data.bin"), os.O_RDONLY)
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    fd = os.open(os.path.join(d, "small.txt"), os.O_RDONLY)
    os.read(fd, 4096)
    os.close(fd)
    for i in range(8):
        os.pread(big, 4096, i * 4096)
    n += 1
print(n * 11)
"""


def syscalls_per_s(d: str, seconds: float) -> float:
    out = subprocess.run(
        [sys.executable, "-c", NEIGHBOUR, d, str(seconds)], capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    return int(out) / seconds


def agent(target: int, probes: str, out: Path) -> subprocess.Popen[str]:
    args = [QTRACE, "agent", "trace", "--out", str(out), "--pid", str(target), "--format",
            "json", "--probes", probes]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    if not proc.stderr.readline().startswith("tracing"):
        raise SystemExit(f"agent failed to start: {proc.stderr.read()}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        Path(d, "small.txt").write_text("x" * 100)
        Path(d, "data.bin").write_bytes(os.urandom(1 << 16))
        # The traced process: it holds a file open so that the node group has one to watch.
        target = subprocess.Popen(
            [sys.executable, "-c", f"import time\nf = open({d!r} + '/target.idx', 'w')\n"
             "time.sleep(3600)"],
        )  # fmt: skip
        rows: dict[str, list[float]] = {"default": [], "node": []}
        events: dict[str, list[int]] = {"default": [], "node": []}
        print(f"{'round':>5} {'untraced/s':>11} {'default':>8} {'+node':>8}")
        try:
            for r in range(a.rounds):
                base = syscalls_per_s(d, a.seconds)
                line = [f"{r:>5} {base:>11.0f}"]
                for name, probes in (("default", ""), ("node", "all")):
                    proc = agent(target.pid, probes or "net,storage,sched,memory",
                                 Path(d) / f"{name}.jsonl")  # fmt: skip
                    rate = syscalls_per_s(d, a.seconds)
                    proc.terminate()
                    summary = json.loads(proc.communicate(timeout=60)[0])
                    events[name].append(summary["written"])
                    rows[name].append(rate / base)
                    line.append(f"{rate / base:>8.3f}")
                print(" ".join(line))
        finally:
            target.kill()
            target.wait()
    for name, ratios in rows.items():
        print(f"neighbour syscall rate with agent ({name}) / without: "
              f"{statistics.median(ratios):.3f}, events kept: {max(events[name])}")  # fmt: skip


if __name__ == "__main__":
    main()
