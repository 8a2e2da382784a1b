"""POSIX record locks (fcntl): a target blocked on a lock a neighbour holds sees the wait,
and the neighbour's lock and unlock are kept, node-wide, because the file is one the
target locks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.probes import ProbeConfig
from agent.targets import TargetSpec
from tests.conftest import background_tracer
from tests.procs import wait_for

LOCKER = """
import fcntl, sys
f = open(sys.argv[1], "a+")
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "sh":
        fcntl.lockf(f, fcntl.LOCK_SH)
    elif cmd == "ex":
        fcntl.lockf(f, fcntl.LOCK_EX)
    elif cmd == "un":
        fcntl.lockf(f, fcntl.LOCK_UN)
    print(cmd, flush=True)
"""
SYS_FCNTL = 72  # x86_64


class Locker:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def answered(self, cmd: str) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == cmd

    def do(self, cmd: str) -> None:
        self.send(cmd)
        self.answered(cmd)

    def in_fcntl(self) -> bool:
        return Path(f"/proc/{self.proc.pid}/syscall").read_text().split()[0] == str(SYS_FCNTL)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_record_lock_wait_names_the_neighbour_holding_it(tmp_path: Path) -> None:
    path = tmp_path / "refresh.lock"
    target, neighbour = Locker(path), Locker(path)
    try:
        config = ProbeConfig(groups=frozenset({"storage"}))
        with background_tracer(TargetSpec(pids=[target.proc.pid]), None, config) as (_t, sink):
            target.do("sh")  # the target locks this file: its neighbours' locks matter
            target.do("un")
            neighbour.do("ex")
            target.send("sh")
            wait_for(target.in_fcntl, 10, "the target to block on the lock")
            neighbour.do("un")
            target.answered("sh")
    finally:
        target.close()
        neighbour.close()
    locks = [e for e in sink.events if e.kind == "fcntl"]
    assert {e.target for e in locks} == {str(path)}
    mine = [e for e in locks if e.pid == target.proc.pid]
    theirs = [e for e in locks if e.pid == neighbour.proc.pid]
    assert [e.detail["op"] for e in theirs if e.detail] == ["LOCK_EX|F_SETLKW", "LOCK_UN|F_SETLKW"]
    blocked = mine[-1]
    assert blocked.detail == {"op": "LOCK_SH|F_SETLKW"} and blocked.group == "lock"
    # It waited from before the neighbour let go until after.
    release = theirs[-1]
    assert blocked.ts_ns < release.ts_ns <= blocked.ts_ns + blocked.dur_ns
