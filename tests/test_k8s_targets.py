"""Pod awareness without a cluster: kubepods cgroup paths (made for real under this
machine's cgroup v2 tree), pod cgroups joining and leaving a running tracer, label
selectors, session validation, and the agent's health endpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.health import HealthServer
from agent.k8s import Pod, PodTargets, container_id, parse_cgroup_path, scan_cgroups
from agent.labels import SelectorError, parse_selector
from agent.targets import TargetSpec, cgroup2_root
from collector.sessions import SessionError, validate_start
from qtrace.api.v1 import services_pb2, sessions_pb2
from tests.conftest import background_tracer
from tests.procs import wait_for
from tests.test_targets import workload

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
CID = "a" * 63 + "1"
CID2 = "b" * 63 + "2"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/kubepods/pod{UID}/{CID}", (UID, CID)),  # cgroupfs driver, Guaranteed
        (f"/kubepods/burstable/pod{UID}/{CID}", (UID, CID)),
        (f"/kubepods/besteffort/pod{UID}", (UID, None)),
        (f"/kubepods/burstable/pod{UID}/{CID}/sub", (UID, CID)),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
            (UID, CID),
        ),
        (
            f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope",
            (UID, CID),
        ),
        ("/system.slice/containerd.service", None),
        ("/kubepods/burstable", None),
        (f"/user.slice/pod{UID}x/{CID}", None),
    ],
)
def test_cgroup_paths_name_pod_and_container(path: str, expected: tuple[str, str] | None) -> None:
    assert parse_cgroup_path(path) == expected


def test_container_ids_lose_their_runtime_prefix() -> None:
    assert container_id(f"containerd://{CID}") == CID
    assert container_id(f"docker://{CID}") == CID


@contextmanager
def cgroup_tree(*rels: str) -> Iterator[Path]:
    """Real cgroup v2 directories under a test root of their own (never the kubelet's)."""
    root = cgroup2_root() / f"qtrace-test-k8s-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    made: list[Path] = []
    try:
        for rel in rels:
            p = root
            for part in Path(rel).parts:
                p = p / part
                if not p.exists():
                    p.mkdir(parents=True)
                    made.append(p)
        yield root
    finally:
        for p in sorted(made, key=lambda p: -len(p.parts)):
            p.rmdir()
        if root.exists():
            root.rmdir()


def test_scan_finds_every_container_cgroup_by_inode() -> None:
    systemd_uid = str(uuid.uuid4())
    a = f"node-a/kubepods/burstable/pod{UID}/{CID}"  # a kubelet with --cgroup-root=/node-a
    b = (
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
        f"{systemd_uid.replace('-', '_')}.slice/cri-containerd-{CID2}.scope"
    )
    with cgroup_tree(a, b, "system.slice/other.service", f"user.slice/pod{UID}/{CID}") as root:
        found = scan_cgroups(root)
        assert found[(root / a).stat().st_ino] == (UID, CID)
        assert found[(root / b).stat().st_ino] == (systemd_uid, CID2)
        assert found[(root / a).parent.stat().st_ino] == (UID, None)
        assert (root / "system.slice/other.service").stat().st_ino not in found
        assert (root / f"user.slice/pod{UID}/{CID}").stat().st_ino not in found
        assert all(uid in (UID, systemd_uid) for uid, _ in found.values())


def test_pod_cgroups_join_and_leave_a_running_tracer(tmp_path: Path) -> None:
    """Pods that start or stop during a session: the tracer asks for their cgroups on
    every rescan and follows, without a restart."""
    with cgroup_tree(f"kubepods/burstable/pod{UID}/{CID}") as root:
        container = root / f"kubepods/burstable/pod{UID}/{CID}"
        live: set[int] = set()
        with workload(tmp_path, "pod") as w:
            (container / "cgroup.procs").write_text(str(w.pid))
            try:
                spec = TargetSpec(pod_cgroups=lambda: set(live))
                calls = 0
                with background_tracer(spec) as (tracer, sink):
                    w.do("pwrite 10")  # its pod is not a target yet
                    live.add(container.stat().st_ino)

                    def traced() -> bool:
                        nonlocal calls
                        calls += 1
                        w.do("pwrite 1")
                        return any(e.pid == w.pid for e in sink.events)

                    # The tracer's own once-a-second rescan finds it.
                    wait_for(traced, 10, "the pod's cgroup to be picked up")
                    live.clear()
                    tracer.rescan()  # the pod stopped: gone from the kernel's map now
                    before = len(sink.events)
                    w.do("pwrite 20")
                    after = [e for e in sink.events[before:] if e.kind == "pwrite64"]
            finally:
                (root.parent / "cgroup.procs").write_text(str(w.pid))
        writes = [e for e in sink.events if e.kind == "pwrite64"]
        assert 1 <= len(writes) <= calls, "the pod was traced before it was a target"
        assert {e.cgroup_id for e in sink.events} == {container.stat().st_ino}
        assert after == []


def test_label_selectors() -> None:
    sel = parse_selector("app=leaf, tier!=cache, env in (a, b), !canary")
    assert sel.matches({"app": "leaf", "env": "a"})
    assert not sel.matches({"app": "leaf", "env": "c"})
    assert not sel.matches({"app": "leaf", "env": "a", "canary": "1"})
    assert not sel.matches({"app": "leaf", "env": "a", "tier": "cache"})
    assert parse_selector("").matches({})
    assert parse_selector("app.kubernetes.io/name=x").matches({"app.kubernetes.io/name": "x"})
    for bad in ("a b", "=x", "app in a", "app=(x)"):
        with pytest.raises(SelectorError):
            parse_selector(bad)


def test_pod_targets_pick_by_namespace_selector_and_name() -> None:
    leaf = Pod("search", "leaf-1", UID, {"app": "leaf"}, {})
    root = Pod("search", "root-0", UID, {"app": "root"}, {})
    other = Pod("default", "leaf-1", UID, {"app": "leaf"}, {})
    t = PodTargets.of(["search"], "app=leaf", [])
    assert [p.name for p in (leaf, root, other) if t.matches(p)] == ["leaf-1"]
    assert PodTargets.of([], "", ["search/root-0"]).matches(root)
    assert not PodTargets.of([], "", ["search/root-0"]).matches(leaf)
    assert PodTargets.of([], "", ["leaf-1"]).matches(other)
    assert t.describe() == "namespace search, selector app=leaf"
    assert not PodTargets.of([], "", [])


def start_req(**targets: object) -> services_pb2.StartSessionRequest:
    return services_pb2.StartSessionRequest(targets=sessions_pb2.Targets(**targets))  # type: ignore[arg-type]


def test_sessions_check_kubernetes_targets() -> None:
    validate_start(start_req(namespaces=["search"], label_selector="app=leaf"))
    validate_start(start_req(pods=["search/leaf-1"]))
    for targets, said in (
        ({"namespaces": ["Search"]}, "invalid namespace 'Search'"),
        ({"pods": ["a/b/c"]}, "invalid pod 'a/b/c'"),
        ({"namespaces": ["s"], "label_selector": "a b"}, "invalid label selector"),
        ({"label_selector": "app=leaf"}, "--selector needs --namespace"),
    ):
        with pytest.raises(SessionError, match=said):
            validate_start(start_req(**targets))


def test_health_endpoint_says_when_the_loop_is_stuck() -> None:
    beat = [time.monotonic()]
    connected = threading.Event()
    server = HealthServer(0, lambda: beat[0], connected.is_set).start()

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
                return r.status, r.read().decode().strip()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode().strip()

    try:
        assert get("/healthz") == (200, "ok")
        assert get("/readyz") == (503, "not connected to the collector yet")
        connected.set()
        assert get("/readyz") == (200, "ok")
        beat[0] -= 120
        code, text = get("/healthz")
        assert code == 503 and text.startswith("main loop stuck for 120")
        assert get("/other")[0] == 404
    finally:
        server.close()


def test_sockets_are_listed_in_the_process_own_network_namespace() -> None:
    """A pod's sockets live in its network namespace: the agent lists them there (the
    DaemonSet's agent is in a namespace of its own), never its own instead."""
    from agent.netns import NetnsTable

    code = (
        "import socket, sys; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen();"
        "print(s.getsockname()[1], flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    here = socket.socket()
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        here.bind(("0.0.0.0", 0))
        here.listen()
        table = NetnsTable(proc.pid)
        table.refresh(force=True)
        assert table.listen_ports == {port}
    finally:
        here.close()
        proc.kill()
        proc.wait(10)


def test_pods_of_events_are_stored_and_read_back(tmp_path: Path) -> None:
    """namespace/pod/container survive the wire, the store (also a file made before those
    columns existed) and come back in query_events and as explain's `pod`."""
    import duckdb

    from collector.store import Store
    from qtrace.api.v1 import events_pb2
    from tests.test_store import batch, event

    db = tmp_path / "old.duckdb"
    with Store(db):
        pass
    con = duckdb.connect(str(db))  # as an older collector left it: no pod columns
    con.execute("DROP INDEX events_query_id")  # DuckDB alters no indexed table
    for col in ("namespace", "pod", "container"):
        con.execute(f"ALTER TABLE events DROP COLUMN {col}")
    con.execute("CREATE INDEX events_query_id ON events (query_id)")
    con.close()
    with Store(db) as store:
        leaf = event(namespace="search", pod="leaf-7", container="leaf")
        host = events_pb2.Event(ts_ns=1, kind="read", query_id="q1", has_query_id=True)
        store.ingest(batch(1, [leaf, host]), received_ns=1)
        got, _ = store.query_events("q1", 10)
    pods = sorted((e.event.namespace, e.event.pod, e.event.container) for e in got)
    assert pods == [("", "", ""), ("search", "leaf-7", "leaf")]
