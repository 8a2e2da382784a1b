"""The worst case for tracing overhead: nginx serving one small static file over loopback.

Each request costs nginx only a few syscalls (accept or epoll, read, sendfile or writev), so
nearly all of a traced request's extra time is the probes and the agent: no application work
hides it. The bench starts its own nginx (a generated config in a temporary directory: a
free loopback port, a master and 2 workers, no access log) serving a 612-byte file, and
drives it with wrk (2 threads, 32 connections). Each round runs wrk untraced, then once per
traced mode while `qtrace agent trace` (a separate process, as in production) traces the
nginx master and workers. It prints each round's requests/s, the traced/untraced ratio and
the events written and lost, then the median ratio per mode: machines here are noisy, so
only side-by-side figures from one run mean anything.

Modes (--modes, a comma list) are extra agent arguments: a preset name (`full`:
`--probes all`; `recorder`: `--probes all --capture recorder`), `NAME=ARGS`, or bare ARGS.
A mode whose arguments the installed agent rejects as a usage error is skipped with a note.

Reproduce: `make bench-nginx` (installs nginx and wrk through `scripts/setup.sh --bench`,
then runs this with its defaults: 5 rounds of 5 s per configuration).

Goal: traced/untraced >= 0.93 for the recorder mode."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

QTRACE = str(Path(sys.executable).parent / "qtrace")
PRESETS = {"full": "--probes all", "recorder": "--probes all --capture recorder"}
GOAL = ("recorder", 0.93)
FILE_BYTES = 612
USAGE_ERROR = 2  # click's exit code for an unknown option or a bad value

CONFIG = """\
user root;
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type text/html;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
    }}
}}
"""


@dataclass(frozen=True)
class Mode:
    name: str
    args: list[str]


class Rejected(Exception):
    """The agent refused its arguments (a usage error), as an older CLI does new options."""


def parse_modes(spec: str) -> list[Mode]:
    modes = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in PRESETS:
            modes.append(Mode(item, shlex.split(PRESETS[item])))
        elif "=" in item and not item.startswith("-"):
            name, args = item.split("=", 1)
            modes.append(Mode(name.strip(), shlex.split(args)))
        else:
            modes.append(Mode(item, shlex.split(item)))
    if not modes:
        raise SystemExit("--modes names no mode")
    return modes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def nginx(d: Path, workers: int) -> Iterator[tuple[int, list[int]]]:
    """A private nginx in d: yields (port, [master, worker, ...]); stopped on the way out."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit("no nginx: run `bash scripts/setup.sh --bench` (or `make bench-nginx`)")
    (d / "www").mkdir()
    (d / "tmp").mkdir()
    body = "<!DOCTYPE html>\n<title>qtrace</title>\n"
    (d / "www" / "index.html").write_text(body + "x" * (FILE_BYTES - len(body) - 1) + "\n")
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(CONFIG.format(d=d, port=port, workers=workers))
    # Its own session: a Ctrl-C reaches this script, which then stops nginx gracefully.
    log = (d / "nginx.out").open("w")
    proc = subprocess.Popen(
        [binary, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:

        def up() -> bool:
            if proc.poll() is not None:
                log.flush()
                errors = (d / "nginx.out").read_text() + (d / "error.log").read_text()
                raise SystemExit(f"nginx exited with {proc.returncode}:\n{errors}")
            kids = psutil.Process(proc.pid).children()
            return len(kids) == workers and accepts(port)

        wait_for("nginx to listen", up)
        pids = [proc.pid, *sorted(k.pid for k in psutil.Process(proc.pid).children())]
        yield port, pids
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: workers finish their connections
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.close()


def wrk(port: int, seconds: int, threads: int, connections: int) -> float:
    """Requests per second, from wrk's `Requests/sec:` line."""
    url = f"http://127.0.0.1:{port}/index.html"
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url]
    run = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    m = re.search(r"^Requests/sec:\s+([\d.]+)", run.stdout, re.M)
    if run.returncode or not m:
        raise SystemExit(f"wrk failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    for bad in ("Socket errors", "Non-2xx"):
        if bad in run.stdout:
            line = next(x for x in run.stdout.splitlines() if bad in x)
            print(f"      wrk: {line.strip()}")
    return float(m.group(1))


def agent(pids: list[int], out: Path, mode: Mode) -> subprocess.Popen[str]:
    args = [QTRACE, "agent", "trace", "--out", str(out), "--format", "json"]
    for pid in pids:
        args += ["--pid", str(pid)]
    proc = subprocess.Popen(
        args + mode.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the agent prints this once its probes are attached
    if not line.startswith("tracing"):
        rest = proc.stderr.read()
        code = proc.wait()
        if code == USAGE_ERROR or "No such option" in line + rest:
            raise Rejected(f"{line}{rest}".strip())
        raise SystemExit(f"agent ({mode.name}) failed to start ({code}): {line}{rest}")
    return proc


def reason(usage: str) -> str:
    """The line of a usage error that says what was wrong, without click's box drawing."""
    lines = [x.strip(" \u2502\u256d\u256e\u2570\u256f\u2500") for x in usage.splitlines()]
    lines = [x for x in lines if x]
    return next((x for x in lines if "No such option" in x), lines[-1] if lines else usage)


def stop(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Ends the agent and returns its JSON summary (written, lost, received, produced...)."""
    proc.terminate()
    try:
        out, errs = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SystemExit("agent did not stop within 120 s of SIGTERM") from None
    try:
        summary: dict[str, Any] = json.loads(out)
    except ValueError:
        raise SystemExit(f"agent printed no JSON summary ({proc.returncode}):\n{errs}") from None
    return summary


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5, help="wrk's duration per configuration")
    ap.add_argument("--modes", default="full,recorder", help="traced modes (comma list)")
    ap.add_argument("--workers", type=int, default=2, help="nginx worker processes")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("no wrk: run `bash scripts/setup.sh --bench` (or `make bench-nginx`)")
    modes = parse_modes(a.modes)
    ratios: dict[str, list[float]] = {m.name: [] for m in modes}
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="qtrace-nginx-") as tmp:
            d = Path(tmp)
            with nginx(d, a.workers) as (port, pids):
                print(f"nginx on 127.0.0.1:{port}, pids {' '.join(map(str, pids))}; ", end="")
                print(f"wrk -t{a.threads} -c{a.connections} -d{a.seconds}s, {FILE_BYTES} B file")
                for m in modes:
                    print(f"mode {m.name}: agent {shlex.join(m.args) or '(defaults)'}")
                wrk(port, 1, a.threads, a.connections)  # warm up
                head = f"{'round':>5} {'mode':<10} {'untraced r/s':>13} {'traced r/s':>11}"
                print(f"{head} {'ratio':>6} {'written':>9} {'lost':>9}")
                for r in range(a.rounds):
                    base = wrk(port, a.seconds, a.threads, a.connections)
                    for m in list(modes):
                        out = d / f"events-{r}-{m.name}.jsonl"
                        try:
                            proc = agent(pids, out, m)
                        except Rejected as e:
                            print(
                                f"note: skipping mode {m.name}: the installed agent rejects "
                                f"{shlex.join(m.args)} ({reason(str(e))})"
                            )
                            modes.remove(m)
                            del ratios[m.name]
                            continue
                        try:
                            tr = wrk(port, a.seconds, a.threads, a.connections)
                        finally:
                            summary = stop(proc)
                            out.unlink(missing_ok=True)  # can be large; only the counts matter
                        ratios[m.name].append(tr / base)
                        print(
                            f"{r:>5} {m.name:<10} {base:>13.0f} {tr:>11.0f} {tr / base:>6.3f} "
                            f"{summary['written']:>9} {summary['lost']:>9}"
                        )
                    if not modes:
                        raise SystemExit("no traced mode left to measure")
    except KeyboardInterrupt:
        print("\ninterrupted: nginx stopped", file=sys.stderr)
        raise SystemExit(130) from None
    for name, rs in ratios.items():
        line = f"median traced/untraced, {name}: {statistics.median(rs):.3f} ({len(rs)} rounds)"
        if name == GOAL[0]:
            met = "met" if statistics.median(rs) >= GOAL[1] else "NOT met"
            line += f"; goal >= {GOAL[1]}: {met}"
        print(line)


if __name__ == "__main__":
    main()
