"""Real qtrace processes for end-to-end tests: a collector and node agents."""

from __future__ import annotations

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

QTRACE = str(Path(sys.executable).parent / "qtrace")


def qtrace(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [QTRACE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and r.returncode != 0:
        raise AssertionError(f"qtrace {' '.join(args)} failed: {r.stderr}")
    return r


def qtrace_json(*args: str) -> Any:
    return json.loads(qtrace(*args, "--format", "json").stdout)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll a condition that has no notification to wait on (another process's state)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def session_status(addr: str, sid: str) -> dict[str, Any]:
    status: dict[str, Any] = qtrace_json("session", "status", sid, "--collector", addr)
    return status


def joined(addr: str, sid: str, n: int = 1) -> bool:
    """At least n agents have attached the session's probes (they announce it)."""
    return len(session_status(addr, sid)["agents"]) >= n


def start_session(addr: str, pids: Iterable[int], *extra: str) -> str:
    """A session on these pids, once an agent has attached it."""
    targets = [a for pid in pids for a in ("--pid", str(pid))]
    sid: str = qtrace_json(
        "session", "start", *targets, "--duration", "10m", "--collector", addr, *extra
    )["session_id"]
    wait_for(lambda: session_status(addr, sid)["agents"], 30, "the agent to attach")
    return sid


def replay(
    log: Path, queries: Iterable[str], urls: tuple[str, str, str], sid: str, addr: str
) -> dict[str, Any]:
    """``qtrace replay`` of these queries against (primary, secondary, candidate) roots,
    reporting to the session; its JSON summary."""
    log.write_text("".join(f"{q}\n" for q in queries))
    primary, secondary, candidate = urls
    r = subprocess.run(
        [QTRACE, "replay", "--format", "json", "--queries", str(log),
         "--template", "GET /search?q={query}", "--primary", primary,
         "--secondary", secondary, "--candidate", candidate,
         "--concurrency", "4", "--session", sid, "--collector", addr],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    summary: dict[str, Any] = json.loads(r.stdout)
    return summary


def complete(addr: str, sid: str, n: int = 1) -> bool:
    """At least n agents sent their final batch for the session: all their data is in."""
    agents = session_status(addr, sid)["agents"]
    return len(agents) >= n and all(a["complete"] for a in agents)


class Proc:
    def __init__(
        self,
        args: list[str],
        ready: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,  # e.g. nsenter --net=...
    ) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), QTRACE, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        assert self.proc.stderr is not None
        self.log: list[str] = []
        # The banner, printed once serving/attached; log lines (a recovered spool) may come
        # before it.
        while (line := self.proc.stderr.readline()) and line.startswith("20"):
            self.log.append(line)
        self.first_line = line
        if ready not in self.first_line:
            rest = self.proc.stderr.read()
            self.proc.kill()
            raise AssertionError(f"qtrace {args[0]} did not start: {self.first_line}{rest}")
        # Read on, so a chatty process never blocks on a full pipe and tests can look.
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            # Hung: the test fails, but no later test may inherit its probes.
            self.proc.kill()
            self.proc.wait(10)
            raise
        finally:
            self._reader.join(10)


class Collector(Proc):
    def __init__(
        self, db: Path, port: int = 0, args: Sequence[str] = (), host: str = "127.0.0.1"
    ) -> None:
        super().__init__(
            ["collector", "run", "--db", str(db), "--listen", f"{host}:{port}", *args], "listening"
        )
        m = re.search(r":(\d+),", self.first_line)
        assert m, self.first_line
        self.port = int(m.group(1))
        self.addr = f"{host}:{self.port}"


class Agent(Proc):
    def __init__(
        self,
        collector: str,
        node: str,
        scope: Path | None = None,
        skew_ns: int = 0,
        ring_pages: int = 1024,
        spool: Path | None = None,
        extra: list[str] | None = None,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        # Never the shared default spool: other tests' agents run on this machine too.
        self.own_spool = spool is None
        self.spool = spool or Path(tempfile.mkdtemp(prefix="qtrace-spool-"))
        args = ["agent", "run", "--collector", collector, "--node", node]
        args += ["--ring-pages", str(ring_pages), "--spool-dir", str(self.spool), *(extra or [])]
        if scope is not None:
            args += ["--scope-cgroup", str(scope)]
        env = {**(env or {}), **({"QTRACE_CLOCK_SKEW_NS": str(skew_ns)} if skew_ns else {})}
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding tracefs.
        prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else None
        super().__init__(args, "agent", env or None, prefix)
        self.agent_id = self.first_line.split()[1]

    def stop(self) -> int:
        try:
            return super().stop()
        finally:
            if self.own_spool:
                shutil.rmtree(self.spool, ignore_errors=True)


def move_to_cgroup(pid: int, cg: Path) -> None:
    (cg / "cgroup.procs").write_text(str(pid))


def env_without_collector() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "QTRACE_COLLECTOR"}
