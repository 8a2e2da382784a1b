"""Run a root and its leaves as separate local processes."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import psutil

from searchsvc.diskio import PROCESS_NAME as DISKIO_NAME
from searchsvc.faults import DEFAULT_FAULTS, FaultConfig
from searchsvc.hog import PROCESS_NAME as HOG_NAME
from searchsvc.index import build_index
from searchsvc.locker import PROCESS_NAME as LOCKER_NAME
from searchsvc.netdelay import PROCESS_NAME as NETDELAY_NAME
from searchsvc.server import connect_host

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def get_json(url: str, path: str, timeout_s: float = 30.0) -> Any:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {url}{path}: {resp.status} {body!r}")
        return json.loads(body)
    finally:
        conn.close()


class Cluster:
    """Builds indexes under ``data_dir`` and runs ``n_leaves`` leaves + 1 root.

    Roles are ``"root"``, ``"leaf0"``, ``"leaf1"``, ...

    ``fault_rate`` 0 is the "old deployment"; above 0 it is the "new" one, where
    each query may hit the ``faults`` (see :mod:`searchsvc.faults`), decided by
    each leaf from ``random.Random(fault_seed + leaf_id)``.  With ``cpu-starved``
    in ``faults``, each leaf is pinned to one CPU and runs its own hog process
    (:mod:`searchsvc.hog`) there, see :mod:`searchsvc.leaf` and :attr:`hog_pids`.
    With ``lock-held``, each leaf runs its own locker process
    (:mod:`searchsvc.locker`), see :attr:`locker_pids`.  With ``net-delay``,
    each leaf runs its own delaying TCP proxy (:mod:`searchsvc.netdelay`) and
    the root reaches the leaf only through it, see :attr:`proxy_pids` and
    :attr:`proxy_urls` (:attr:`leaf_urls` and :meth:`journal` stay direct).
    With ``disk-io``, each leaf runs its own disk neighbour
    (:mod:`searchsvc.diskio`, with a scratch file in the leaf's index
    directory), see :attr:`diskio_pids`.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        root_port: int = 0,
        n_leaves: int = 2,
        shards: int = 4,
        n_buckets: int = 1024,
        startup_timeout_s: float = 30.0,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = DEFAULT_FAULTS,
        deadline_ms: int = 2000,
        fault_seed: int = 0,
    ) -> None:
        self.fault_config = FaultConfig(
            rate=fault_rate, faults=tuple(faults), deadline_ms=deadline_ms, seed=fault_seed
        )
        self.data_dir = Path(data_dir)
        self.host = host
        self.root_port = root_port
        self.n_leaves = n_leaves
        self.shards = shards
        self.n_buckets = n_buckets
        self.startup_timeout_s = startup_timeout_s
        self.urls: dict[str, str] = {}
        # Leaf role -> URL of the proxy in front of it (net-delay only).
        self.proxy_urls: dict[str, str] = {}
        self.returncodes: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def root_url(self) -> str:
        return self.urls["root"]

    @property
    def leaf_urls(self) -> list[str]:
        return [self.urls[f"leaf{i}"] for i in range(self.n_leaves)]

    @property
    def pids(self) -> dict[str, int]:
        return {role: proc.pid for role, proc in self._procs.items()}

    @property
    def hog_pids(self) -> dict[str, int]:
        """Leaf role -> pid of its hog (the leaf's ``qt-hog`` child), for the leaves
        that have one: only with the ``cpu-starved`` fault enabled."""
        return self._leaf_children(HOG_NAME)

    @property
    def locker_pids(self) -> dict[str, int]:
        """Leaf role -> pid of its locker (the leaf's ``qt-locker`` child), for the
        leaves that have one: only with the ``lock-held`` fault enabled."""
        return self._leaf_children(LOCKER_NAME)

    @property
    def proxy_pids(self) -> dict[str, int]:
        """Leaf role -> pid of the delaying proxy in front of it (the leaf's
        ``qt-netdelay`` child), for the leaves that have one: only with the
        ``net-delay`` fault enabled."""
        return self._leaf_children(NETDELAY_NAME)

    @property
    def diskio_pids(self) -> dict[str, int]:
        """Leaf role -> pid of its disk neighbour (the leaf's ``qt-diskio``
        child), for the leaves that have one: only with the ``disk-io`` fault
        enabled."""
        return self._leaf_children(DISKIO_NAME)

    def _leaf_children(self, name: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for role, proc in self._procs.items():
            if role.startswith("leaf") and proc.poll() is None:
                for child in psutil.Process(proc.pid).children():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if child.name() == name:
                            found[role] = child.pid
        return found

    def start(self) -> Cluster:
        try:
            leaf_addrs = []
            for i in range(self.n_leaves):
                index_dir = self.data_dir / f"leaf{i}"
                build_index(index_dir, i, n_buckets=self.n_buckets, shards=self.shards)
                args = ["--index", str(index_dir), *self.fault_config.argv()]
                port, extra = self._spawn(f"leaf{i}", "searchsvc.leaf", args, 0)
                if "netdelay" in extra:
                    # The root's way to this leaf is through its proxy.
                    port = int(extra["netdelay"])
                    self.proxy_urls[f"leaf{i}"] = _url(connect_host(self.host), port)
                leaf_addrs += ["--leaf", f"{connect_host(self.host)}:{port}"]
            root_args = [*leaf_addrs, *self.fault_config.argv()]
            self._spawn("root", "searchsvc.root", root_args, self.root_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(
        self, role: str, module: str, args: list[str], port: int
    ) -> tuple[int, dict[str, str]]:
        """Start ``role``; its bound port and the ``KEY=VALUE`` words that
        followed the port on its announcement line."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p
        )
        cmd = [sys.executable, "-m", module, *args, "--host", self.host]
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._procs[role] = proc
        assert proc.stdout is not None
        # The child prints its port only once it is listening, so this read is
        # the readiness signal; the selector only bounds a hung start.
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(self.startup_timeout_s):
                raise TimeoutError(f"{role} did not report its port")
        words = proc.stdout.readline().decode().split()
        if not words:
            raise RuntimeError(f"{role} exited with status {proc.wait()}")
        bound = int(words[0])
        self.urls[role] = _url(connect_host(self.host), bound)
        return bound, {k: v for k, _, v in (word.partition("=") for word in words[1:])}

    def journal(self, role: str, settle_s: float = 0.0) -> dict[str, Any]:
        """``role``'s journal; with ``settle_s``, first wait up to that long until
        it has no span in flight (its ``in_flight`` says if that was reached)."""
        path = f"/_journal?settle_ms={round(settle_s * 1000)}" if settle_s > 0 else "/_journal"
        result: dict[str, Any] = get_json(self.urls[role], path, timeout_s=30.0 + settle_s)
        return result

    def stop(self, timeout_s: float = 10.0) -> dict[str, int]:
        """SIGTERM every child, reap them, and return role -> exit status."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for role, proc in self._procs.items():
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            self.returncodes[role] = proc.returncode
        return dict(self.returncodes)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
