"""Pipeline rate: the highest event rate carried from the kernel to the collector with zero
loss, and what the node agent costs at 10k, 100k events/s and at that rate.

A collector (`qtrace collector run`) and a node agent (`qtrace agent run`) run as their own
processes, as deployed. A load generator (--workers processes, started by this script)
issues pread64 calls of 64 bytes on a regular file, each one storage event, paced to a
schedule per 10 ms tick; the achieved rate is its own count over its own wall time. Each
step starts a fresh session on the generator's pids (`--probes storage`, and
`--max-event-rate 5000000` so the collector's default per-node limit of 200k events/s does
not shed), waits for the agent to attach, drives the load for --seconds, stops the
session, waits for the agent's final batch (`complete`) and reads the session's counters:
events stored, dropped (lost in the ring buffer, a full map, the agent or its spool) and
shed. A step has zero loss when dropped and shed are both 0.

Steps: 10k/s and 100k/s, then a ladder upward (--ladder) until the first step with loss,
or the generator can no longer reach its target, then --bisect steps between the highest
zero-loss rate and the first lossy one. Per step, the agent's CPU (user+system over the
load, % of one core), its peak RSS (sampled every 0.5 s through the step, drain included)
and the collector's CPU as a side figure.

Run as root (the agent loads BPF programs): `make bench` runs it, or alone:
    .venv/bin/python bench/pipeline_rate.py [--seconds 10] [--workers 1] [--format json]
The last line says what bounded the figure: a lossy step above it (the pipeline's ceiling),
or, when none lost events, a generator short of its target or the top of the ladder (a lower
bound). The generator, agent and collector share this machine's CPUs: on a small or busy
machine (host CPU% in the table) the ceiling found is that of the machine."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

QTRACE = str(Path(sys.executable).parent / "qtrace")
MAX_EVENT_RATE = 5_000_000  # the collector's bound on a session's --max-event-rate
TICK = 0.01
LOSSES = ("lost_ringbuf", "lost_mapfull", "lost_agent", "lost_spool")  # a session's dropped
# A step whose generator reached less than this share of its target says nothing about
# higher targets: the search stops there.
REACHED = 0.95

# One worker: prints its pid, then per stdin line "RATE SECONDS" issues RATE pread64/s for
# SECONDS, paced per 10 ms tick (at most one tick's worth per turn, so a worker that cannot
# keep up falls behind rather than bursting), and prints "COUNT ELAPSED".
GENERATOR = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
pread, monotonic, sleep = os.pread, time.monotonic, time.sleep
tick = float(sys.argv[2])
print(os.getpid(), flush=True)
for line in sys.stdin:
    rate, seconds = map(float, line.split())
    per_tick = max(1, int(rate * tick))
    n = 0
    t0 = monotonic()
    end = t0 + seconds
    while (now := monotonic()) < end:
        due = int(rate * (now - t0))
        for _ in range(min(due - n, per_tick)):
            pread(fd, 64, 0)
        n = max(n, min(due, n + per_tick))
        if n >= due:
            nxt = t0 + (int((now - t0) / tick) + 1) * tick
            sleep(max(0.0, min(nxt, end) - monotonic()))
    for _ in range(min(int(rate * seconds) - n, per_tick)):  # the last tick's share
        pread(fd, 64, 0)
        n += 1
    print(n, monotonic() - t0, flush=True)
"""


def qtrace(*args: str, timeout: float = 60) -> str:
    r = subprocess.run(
        [QTRACE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if r.returncode != 0:
        raise SystemExit(f"qtrace {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def qtrace_json(*args: str) -> Any:
    return json.loads(qtrace(*args, "--format", "json"))


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return value


class Service:
    """A qtrace process started with its banner awaited; its stderr read on so it never
    blocks on a full pipe."""

    def __init__(self, args: list[str], ready: str) -> None:
        self.proc = subprocess.Popen(
            [QTRACE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stderr is not None
        self.log: list[str] = []
        # Log lines (timestamped) may come before the banner.
        while (line := self.proc.stderr.readline()) and line.startswith("20"):
            self.log.append(line)
        self.banner = line
        if ready not in line:
            self.proc.kill()
            raise SystemExit(f"qtrace {args[0]} did not start: {line}{self.proc.stderr.read()}")
        self.ps = psutil.Process(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)


class RssPeak:
    """Peak resident set of a process, sampled every 0.5 s while in the with block."""

    def __init__(self, ps: psutil.Process, interval: float = 0.5) -> None:
        self.ps = ps
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):  # it exited: its peak is already in
            self.peak = max(self.peak, self.ps.memory_info().rss)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class Generator:
    """--workers processes issuing pread64 of 64 bytes from one regular file."""

    def __init__(self, path: Path, workers: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", GENERATOR, str(path), str(TICK)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(workers)
        ]
        self.pids = [int(self._line(p)) for p in self.procs]

    @staticmethod
    def _line(p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise SystemExit("load generator exited")
        return line

    def run(self, rate: float, seconds: float) -> tuple[int, float]:
        """Drive `rate` calls/s in all for `seconds`: (calls issued, wall seconds)."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(f"{rate / len(self.procs)} {seconds}\n")
            p.stdin.flush()
        done = [self._line(p).split() for p in self.procs]
        return sum(int(n) for n, _ in done), max(float(t) for _, t in done)

    def close(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@dataclass
class Step:
    target: int  # events/s asked of the generator
    achieved: float  # its calls over its wall time
    calls: int
    produced: int  # pread64 events the kernel produced for the session
    stored: int  # events in the collector's store
    dropped: int  # lost on the way: ring buffer, full map, agent, spool
    shed: int  # over the session's event-rate limit
    agent_cpu: float  # % of one core, over the load
    agent_rss_mib: float  # peak over the step
    collector_cpu: float  # % of one core, over the load
    drain_s: float  # from the end of the load to the agent's final batch in the store
    host_cpu: float  # the whole machine's CPU use over the load, % of all cores
    losses: dict[str, int]  # dropped, by where: lost_ringbuf, lost_mapfull, ...

    @property
    def zero_loss(self) -> bool:
        return self.dropped == 0 and self.shed == 0

    @property
    def reached(self) -> bool:
        return self.achieved >= REACHED * self.target


def run_step(
    rate: int, seconds: float, gen: Generator, agent: Service, col: Service, addr: str
) -> Step:
    start = ["session", "start", "--collector", addr, "--duration", "10m"]
    start += ["--probes", "storage", "--max-event-rate", str(MAX_EVENT_RATE)]
    for pid in gen.pids:
        start += ["--pid", str(pid)]
    sid = qtrace_json(*start)["session_id"]

    def status() -> dict[str, Any]:
        st: dict[str, Any] = qtrace_json("session", "status", sid, "--collector", addr)
        return st

    with RssPeak(agent.ps) as rss:
        # The agent announces a session once its probes are attached.
        wait_for(lambda: status()["agents"], 120, f"the agent to attach session {sid}")
        psutil.cpu_percent()  # starts the machine-wide measure
        a0, c0, t0 = agent.cpu_s(), col.cpu_s(), time.monotonic()
        calls, gen_wall = gen.run(rate, seconds)
        a1, c1, t1 = agent.cpu_s(), col.cpu_s(), time.monotonic()
        host = psutil.cpu_percent()
        qtrace("session", "stop", sid, "--collector", addr)
        agents = wait_for(
            lambda: (ag := status()["agents"]) and all(a["complete"] for a in ag) and ag,
            300,
            f"the agent's final batch of session {sid}",
        )
        drain = time.monotonic() - t1
    wall = t1 - t0
    produced = sum(a["drops"].get("pread64", {}).get("produced", 0) for a in agents)
    losses = {c: n for c in LOSSES if (n := sum(d[c] for a in agents for d in a["drops"].values()))}
    return Step(
        target=rate,
        achieved=calls / gen_wall,
        calls=calls,
        produced=produced,
        stored=sum(a["events_stored"] for a in agents),
        dropped=sum(a["dropped"] for a in agents),
        shed=sum(a["shed"] for a in agents),
        agent_cpu=100 * (a1 - a0) / wall,
        agent_rss_mib=rss.peak / (1 << 20),
        collector_cpu=100 * (c1 - c0) / wall,
        drain_s=drain,
        host_cpu=host,
        losses=losses,
    )


HEADER = (
    f"{'target/s':>9} {'achieved/s':>10} {'stored':>9} {'lost':>7} {'shed':>6} "
    f"{'agent CPU%':>10} {'agent RSS MiB':>13} {'collector CPU%':>14} {'host CPU%':>9} "
    f"{'drain s':>7}"
)


def row(s: Step) -> str:
    line = (
        f"{s.target:>9,} {s.achieved:>10,.0f} {s.stored:>9,} {s.dropped:>7,} {s.shed:>6,} "
        f"{s.agent_cpu:>10.1f} {s.agent_rss_mib:>13.1f} {s.collector_cpu:>14.1f} "
        f"{s.host_cpu:>9.0f} {s.drain_s:>7.1f}"
    )
    if s.losses:
        line += "  (" + ", ".join(f"{k} {v:,}" for k, v in s.losses.items()) + ")"
    if not s.reached:
        line += "  (generator short of target)"
    return line


def parse_rate(text: str) -> int:
    t = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


def search(ladder: list[int], bisect: int, measure: Callable[[int], Step]) -> None:
    """Up the ladder until a step loses events (or the generator falls short of its target:
    nothing higher can be driven), then bisect between the last clean target and the first
    lossy one."""
    lo = 0
    hi = None
    for rate in ladder:
        s = measure(rate)
        if not s.zero_loss:
            hi = rate
            break
        if not s.reached:
            return
        lo = rate
    if hi is None:
        return
    for _ in range(bisect):
        mid = round((lo + hi) / 2, -3)
        if not lo < mid < hi:
            return
        s = measure(int(mid))
        if s.zero_loss and not s.reached:
            return
        lo, hi = (int(mid), hi) if s.zero_loss else (lo, int(mid))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="load per step")
    ap.add_argument(
        "--ladder",
        default="150k,200k,300k,400k,600k,800k,1m,1.5m,2m",
        help="rates tried after 10k and 100k, upward until the first loss",
    )
    ap.add_argument("--bisect", type=int, default=3, help="steps between good and lossy")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    ap.add_argument("--ring-pages", type=int, default=1024, help="the agent's ring buffer")
    ap.add_argument("--format", choices=("text", "json"), default="text")
    a = ap.parse_args()
    ladder = sorted({parse_rate(r) for r in a.ladder.split(",") if r.strip()})
    text = a.format == "text"
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="qtrace-rate-") as d:
        data = Path(d, "data.bin")
        data.write_bytes(os.urandom(1 << 16))
        col = Service(
            ["collector", "run", "--db", f"{d}/rate.duckdb", "--listen", "127.0.0.1:0"],
            "listening",
        )
        m = re.search(r":(\d+),", col.banner)
        assert m, col.banner
        addr = f"127.0.0.1:{m.group(1)}"
        spool = Path(d, "spool")
        agent: Service | None = None
        gen: Generator | None = None
        try:
            agent = Service(
                ["agent", "run", "--collector", addr, "--node", "bench-node",
                 "--ring-pages", str(a.ring_pages), "--spool-dir", str(spool)],
                "agent",
            )  # fmt: skip
            gen = Generator(data, a.workers)
            if text:
                print(HEADER, flush=True)

            def measure(rate: int) -> Step:
                assert agent is not None and gen is not None
                s = run_step(rate, a.seconds, gen, agent, col, addr)
                steps.append(s)
                if text:
                    print(row(s), flush=True)
                return s

            search([10_000, 100_000, *(r for r in ladder if r > 100_000)], a.bisect, measure)
        finally:
            if gen is not None:
                gen.close()
            if agent is not None:
                agent.stop()
            col.stop()
            shutil.rmtree(spool, ignore_errors=True)
    # The highest rate actually carried without loss (the generator's count, not its target).
    clean = [s for s in steps if s.zero_loss]
    best = max(clean, key=lambda s: s.achieved, default=None)
    best_rate = round(best.achieved) if best else 0
    # What set the ceiling: a step that lost events above it (the pipeline's), or, with none,
    # a generator short of its target or the end of the ladder (then it is a lower bound).
    if best is None or any(not s.zero_loss and s.achieved > best.achieved for s in steps):
        bound = "loss"
    else:
        bound = "ladder" if best.reached else "generator"
    if a.format == "json":
        print(
            json.dumps(
                {
                    "seconds": a.seconds,
                    "workers": a.workers,
                    "ring_pages": a.ring_pages,
                    "steps": [asdict(s) | {"zero_loss": s.zero_loss} for s in steps],
                    "max_zero_loss_rate": best_rate,
                    "bound": bound,
                },
                indent=2,
            )
        )
        return
    if bound == "generator":
        print("no loss up to where the load generator fell short: a lower bound (--workers)")
    elif bound == "ladder":
        print("no loss up to the top of the ladder: a lower bound (--ladder)")
    print(f"max zero-loss rate: {best_rate} events/s")


if __name__ == "__main__":
    main()
