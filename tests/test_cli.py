"""`qtrace agent trace` as a user runs it: output, stopping, bad input, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, qtrace_programs
from tests.test_targets import workload

QTRACE = str(Path(sys.executable).parent / "qtrace")
REQUIRED_KEYS = {"ts_ns", "dur_ns", "kind", "pid", "tid", "comm", "fd", "target", "ret", "query_id"}


def wait_until_detached(timeout: float = 10.0) -> list[str]:
    # The kernel frees programs asynchronously after their last fd closes; there is no
    # notification to wait on, so look until they are gone (bounded).
    deadline = time.monotonic() + timeout
    while (left := qtrace_programs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def start_trace(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [QTRACE, "agent", "trace", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # printed once the probes are attached
    assert line.startswith("tracing"), line + proc.stderr.read()
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stops_cleanly_on_signal_and_flushes(tmp_path: Path, sig: signal.Signals) -> None:
    assert qtrace_programs() == []
    out = tmp_path / "events.jsonl"
    with workload(tmp_path) as w:
        proc = start_trace(["--pid", str(w.pid), "--out", str(out), "--format", "json"])
        assert len(qtrace_programs()) > 40
        w.do("pwrite 100")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["written"] == len(lines)
    writes = [e for e in lines if e["kind"] == "pwrite64"]
    assert len(writes) == 100
    assert all(e.keys() >= REQUIRED_KEYS for e in lines)
    assert writes[0]["pid"] == w.pid and writes[0]["target"].endswith(".dat")
    assert wait_until_detached() == []


def test_duration_ends_the_trace(tmp_path: Path) -> None:
    out = tmp_path / "e.jsonl"
    with workload(tmp_path) as w:
        r = subprocess.run(
            [QTRACE, "agent", "trace", "--pid", str(w.pid), "--out", str(out), "--duration", "1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert r.returncode == 0, r.stderr
    assert "events written" in r.stdout
    assert out.exists()
    assert wait_until_detached() == []


def test_probes_go_away_when_the_agent_is_killed(tmp_path: Path) -> None:
    with workload(tmp_path) as w:
        proc = start_trace(["--pid", str(w.pid), "--out", str(tmp_path / "k.jsonl")])
        assert qtrace_programs()
        proc.kill()
        proc.wait(10)
    assert wait_until_detached() == []


def _bad(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    before = qtrace_programs()
    r = subprocess.run(
        [QTRACE, "agent", "trace", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert qtrace_programs() == before == []
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return r


def test_missing_pid(tmp_path: Path) -> None:
    r = _bad(["--pid", "999999999", "--out", str(tmp_path / "x")])
    assert "no process with pid 999999999" in r.stderr
    assert not (tmp_path / "x").exists()


def test_missing_cgroup(tmp_path: Path) -> None:
    r = _bad(["--cgroup", "/no/such/cgroup", "--out", str(tmp_path / "x")])
    assert "no cgroup v2 directory" in r.stderr


def test_no_target_and_bad_regex(tmp_path: Path) -> None:
    assert "nothing to trace" in _bad(["--out", str(tmp_path / "x")]).stderr
    r = _bad(["--pid", "1", "--query-id-regex", "qid=\\d+", "--out", str(tmp_path / "x")])
    assert "has no group" in r.stderr


def test_missing_kernel_headers(tmp_path: Path) -> None:
    env = dict(os.environ, BCC_KERNEL_SOURCE=str(tmp_path / "no-headers"))
    r = _bad(["--pid", "1", "--out", str(tmp_path / "x")], env=env)
    assert "kernel headers not found" in r.stderr and "make setup" in r.stderr


def test_not_root(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    before = qtrace_programs()
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         QTRACE, "agent", "trace", "--pid", "1", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert qtrace_programs() == before == []
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "needs root" in r.stderr, r.stderr
