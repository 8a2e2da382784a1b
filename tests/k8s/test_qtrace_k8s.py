"""qtrace on the real two-node cluster (scripts/k8s/): deployed with the kustomize base and
with the Helm chart's rendered output, a session by label traces exactly the matching pods
on both nodes, a restarted pod is picked up mid-session, and what keeps a session from
tracing (no pod matches, no such namespace, RBAC) is said in its status."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from searchsvc.client import run_queries
from tests.k8s.kube import apply, get, kubectl, poll

REPO = Path(__file__).resolve().parents[2]
QTRACE = str(Path(sys.executable).parent / "qtrace")
TOOLS = Path(os.environ.get("QTRACE_TOOLS", "/var/cache/qtrace/tools"))
NODES = ("node-a", "node-b")
APP_NS = "qtrace-e2e"
LEAVES = {"leaf-a": ("node-a", 0), "leaf-b": ("node-b", 1)}
# The images are the manifests' `:dev` ones; another tag tests other builds on a shared
# cluster without replacing its `:dev` images.
TAG = os.environ.get("QTRACE_K8S_IMAGE_TAG", "dev")
SEARCHSVC = f"qtrace-searchsvc:{TAG}"


# -- deploying qtrace ----------------------------------------------------------------------


def render(how: str) -> str:
    if how == "kustomize":
        kubectl_bin = os.environ.get("QTRACE_K8S_RENDER_KUBECTL") or str(TOOLS / "kubectl")
        cmd = [kubectl_bin, "kustomize", str(REPO / "daemonset/base")]
    else:
        helm = os.environ.get("QTRACE_HELM") or str(TOOLS / "helm")
        cmd = [helm, "template", "qtrace", str(REPO / "daemonset/helm/qtrace"), "-n", "qtrace"]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    for image in ("qtrace-agent", "qtrace-collector"):
        text = text.replace(f"image: {image}:dev", f"image: {image}:{TAG}")
    return text


@dataclass
class Deployed:
    how: str
    collector: str  # host:port, reached from this machine through kube-proxy


def ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def agents_ready() -> bool:
    pods = get("pods", "-n", "qtrace", "-l", "app.kubernetes.io/component=agent")["items"]
    return sorted(p["spec"].get("nodeName") for p in pods if ready(p)) == list(NODES)


@pytest.fixture(scope="module", params=["kustomize", "helm"])
def deployed(request: pytest.FixtureRequest) -> Iterator[Deployed]:
    how: str = request.param
    manifests = render(how)
    # The test cluster has no dynamic provisioner: the collector's claim binds to this.
    data = Path(f"/var/lib/qtrace-k8s-e2e/{how}-{uuid.uuid4().hex[:6]}")
    data.mkdir(parents=True)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"qtrace-e2e-{how}"},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(data), "type": "Directory"},
        },
    }
    apply(pv)
    kubectl("apply", "-f", "-", stdin=manifests)
    try:
        poll(agents_ready, 240, f"agents Ready on {NODES} ({how})")

        def collector_ready() -> bool:
            pods = get("pods", "-n", "qtrace", "-l", "app.kubernetes.io/component=collector")
            return any(ready(p) for p in pods["items"])

        poll(collector_ready, 120, "the collector Ready")
        ip = get("service", "qtrace-collector", "-n", "qtrace")["spec"]["clusterIP"]
        yield Deployed(how, f"{ip}:7070")
    finally:
        kubectl("delete", "-f", "-", "--wait=true", stdin=manifests, check=False, timeout=180)
        kubectl("delete", "pv", f"qtrace-e2e-{how}", check=False)
        shutil.rmtree(data, ignore_errors=True)
        with contextlib.suppress(OSError):
            data.parent.rmdir()  # when the other deployment's is gone too


# -- the search service as pods ------------------------------------------------------------


def leaf_deployment(name: str, node: str, leaf_id: int) -> dict[str, Any]:
    labels = {"app": "leaf", "leaf": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": APP_NS, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "leaf",
                            "image": SEARCHSVC,
                            "imagePullPolicy": "Never",
                            "args": ["leaf", "--leaf-id", str(leaf_id), "--port", "8080"],
                            "ports": [{"containerPort": 8080}],
                            "readinessProbe": {
                                "httpGet": {"path": "/_health", "port": 8080},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def service(name: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": APP_NS},
        "spec": {"selector": selector, "ports": [{"port": 8080, "targetPort": 8080}]},
    }


def root_pod() -> dict[str, Any]:
    # Leaves through their Services (a restarted leaf keeps its address); the Services
    # exist before this pod, so their variables are in its environment.
    leaves = [f"--leaf=$({n.upper().replace('-', '_')}_SERVICE_HOST):8080" for n in LEAVES]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root", "namespace": APP_NS, "labels": {"app": "root"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "node-a"},
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "root",
                    "image": SEARCHSVC,
                    "imagePullPolicy": "Never",
                    "args": ["root", *leaves],
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {
                        "httpGet": {"path": "/_health", "port": 8080},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }


@dataclass
class App:
    root_url: str


def app_pods() -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in get("pods", "-n", APP_NS)["items"]}


def leaf_pods() -> dict[str, str]:
    """Running, ready leaf pods: pod name -> node."""
    return {
        name: p["spec"]["nodeName"]
        for name, p in app_pods().items()
        if p["metadata"]["labels"].get("app") == "leaf"
        and ready(p)
        and not p["metadata"].get("deletionTimestamp")
    }


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": APP_NS}})
    try:
        apply(*[service(n, {"leaf": n}) for n in LEAVES])
        apply(*[leaf_deployment(n, node, i) for n, (node, i) in LEAVES.items()])
        apply(root_pod())

        def root_ready() -> str | None:
            pods = app_pods()
            root = pods.get("root")
            if root and ready(root) and len(leaf_pods()) == len(LEAVES):
                return f"http://{root['status']['podIP']}:8080"
            return None

        yield App(poll(root_ready, 180, "the root and both leaves Ready"))
    finally:
        kubectl("delete", "namespace", APP_NS, "--wait=true", check=False, timeout=180)


# -- the CLI ---------------------------------------------------------------------------


def qtrace(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([QTRACE, *args], check=False, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"qtrace {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def start_session(d: Deployed, *targets: str) -> str:
    r = qtrace(
        "session", "start", *targets, "--duration", "10m", "--probes", "net,storage",
        "--collector", d.collector, "--format", "json",
    )  # fmt: skip
    sid: str = json.loads(r.stdout)["session_id"]
    return sid


def status(d: Deployed, sid: str) -> dict[str, Any]:
    r = qtrace("session", "status", sid, "--collector", d.collector, "--format", "json")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def tracing_on_both_nodes(d: Deployed, sid: str) -> bool:
    """Every node's agent said it started the session (its first, empty batch)."""
    agents = status(d, sid)["agents"]
    return sorted(a["node"] for a in agents if not a["error"]) == list(NODES)


def events_of(d: Deployed, query_id: str) -> list[dict[str, Any]]:
    r = qtrace("query", "show", query_id, "--collector", d.collector, "--format", "json")
    events: list[dict[str, Any]] = json.loads(r.stdout)["events"]
    return events


def replay(app: App, prefix: str, n: int) -> list[str]:
    queries = [(f"{prefix}-{i:04d}", q) for i, (_, q) in enumerate(_queries(n))]
    results = run_queries(app.root_url, queries, concurrency=2)
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200]
    return [qid for qid, _ in queries]


def _queries(n: int) -> list[tuple[str, str]]:
    from searchsvc.client import make_queries

    return make_queries(n, seed=n)


def stop(d: Deployed, sid: str) -> None:
    qtrace("session", "stop", sid, "--collector", d.collector)


# -- the tests ---------------------------------------------------------------------------


def test_session_by_label_traces_exactly_the_matching_pods(deployed: Deployed, app: App) -> None:
    sid = start_session(deployed, "--namespace", APP_NS, "--selector", "app=leaf")
    try:
        poll(lambda: tracing_on_both_nodes(deployed, sid), 120, "agents tracing on both nodes")
        leaves = leaf_pods()
        # The first queries may race the agents' first rescan: traced ones are checked.
        ids = replay(app, f"lbl-{deployed.how}", 40)

        def attributed() -> list[dict[str, Any]] | None:
            evs = events_of(deployed, ids[-1])
            return evs if {e.get("pod") for e in evs} == set(leaves) else None

        poll(attributed, 60, f"events of the last query from both leaves {sorted(leaves)}")
        ips = {name: p["status"]["podIP"] for name, p in app_pods().items()}
        served: set[str] = set()
        for qid in ids[-10:]:
            evs = events_of(deployed, qid)
            assert evs, f"no events for {qid}"
            for e in evs:
                # Only the labelled pods: the root (app=root) is as busy and says nothing.
                assert e.get("pod") in leaves, e
                assert e["namespace"] == APP_NS and e["container"] == "leaf", e
                assert e["node"] == leaves[e["pod"]], f"{e['pod']} is on {leaves[e['pod']]}"
            assert {e["node"] for e in evs} == set(NODES)
            # Our side of the leaf's connections, found in the pod's own network namespace.
            served |= {
                e["pod"] for e in evs if (e["target"] or "").startswith(f"{ips[e['pod']]}:8080->")
            }
        assert served == set(leaves)
        st = status(deployed, sid)
        assert {a["node"] for a in st["agents"] if a["events_stored"]} == set(NODES)
        assert not [a for a in st["agents"] if a["error"]], st["agents"]
        # explain names the pod of every hop
        r = qtrace("explain", ids[-1], "--collector", deployed.collector, "--format", "json")
        hops = json.loads(r.stdout)["hops"]
        assert hops and {h["pod"] for h in hops} <= {f"{APP_NS}/{p}" for p in leaves}
    finally:
        stop(deployed, sid)


def test_a_restarted_leaf_is_traced_without_restarting_anything(
    deployed: Deployed, app: App
) -> None:
    sid = start_session(deployed, "--namespace", APP_NS, "--selector", "app=leaf")
    try:
        poll(lambda: tracing_on_both_nodes(deployed, sid), 120, "agents tracing on both nodes")
        before = leaf_pods()
        (old,) = [p for p, node in before.items() if node == "node-b"]
        agents_before = {a["agent_id"] for a in status(deployed, sid)["agents"]}
        kubectl("delete", "pod", old, "-n", APP_NS, "--wait=true", timeout=120)

        def replaced() -> str | None:
            now = leaf_pods()
            new = [p for p, node in now.items() if node == "node-b" and p != old]
            return new[0] if new and len(now) == len(LEAVES) else None

        new = poll(replaced, 120, "a new leaf pod on node-b")

        def new_pod_traced() -> bool:
            (qid,) = replay(app, f"rst-{deployed.how}-{uuid.uuid4().hex[:4]}", 1)
            return new in {e.get("pod") for e in events_of(deployed, qid)}

        poll(new_pod_traced, 60, f"events from the new pod {new}")
        (qid,) = replay(app, f"rst-{deployed.how}-last", 1)
        pods = {e.get("pod") for e in events_of(deployed, qid)}
        assert old not in pods and new in pods
        # Same agents (no restart), same session.
        st = status(deployed, sid)
        assert {a["agent_id"] for a in st["agents"]} == agents_before
        assert st["state"] == "active"
    finally:
        stop(deployed, sid)


def agent_errors(d: Deployed, sid: str) -> dict[str, str]:
    return {a["node"]: a["error"] or "" for a in status(d, sid)["agents"]}


def test_a_selector_matching_nothing_is_said(deployed: Deployed, app: App) -> None:
    sid = start_session(deployed, "--namespace", APP_NS, "--selector", "app=nothing-here")
    try:

        def said() -> dict[str, str] | None:
            errors = agent_errors(deployed, sid)
            return errors if sorted(errors) == list(NODES) and all(errors.values()) else None

        errors = poll(said, 60, "both agents saying no pod matches")
        for node, error in errors.items():
            assert error == (
                f"no pods on node {node} match namespace {APP_NS}, selector app=nothing-here"
            )
        text = qtrace("session", "status", sid, "--collector", deployed.collector).stdout
        for node in NODES:
            assert f"{node}: waiting: no pods on node {node} match namespace {APP_NS}" in text
    finally:
        stop(deployed, sid)


def test_a_missing_namespace_is_said(deployed: Deployed, app: App) -> None:
    sid = start_session(deployed, "--namespace", "no-such-ns", "--selector", "app=leaf")
    try:

        def said() -> dict[str, str] | None:
            errors = agent_errors(deployed, sid)
            return errors if sorted(errors) == list(NODES) and all(errors.values()) else None

        errors = poll(said, 60, "both agents saying the namespace does not exist")
        assert set(errors.values()) == {"namespace 'no-such-ns' does not exist"}
    finally:
        stop(deployed, sid)


def test_missing_rbac_is_said_and_recovers(deployed: Deployed, app: App) -> None:
    binding = get("clusterrolebinding", "qtrace-agent")
    kubectl("delete", "clusterrolebinding", "qtrace-agent")
    try:
        # New agents: their first pod list is refused.
        kubectl("delete", "pod", "-n", "qtrace", "-l", "app.kubernetes.io/component=agent")
        poll(agents_ready, 180, "agents back after their restart")
        sid = start_session(deployed, "--namespace", APP_NS, "--selector", "app=leaf")

        def said() -> dict[str, str] | None:
            errors = agent_errors(deployed, sid)
            return errors if sorted(errors) == list(NODES) and all(errors.values()) else None

        errors = poll(said, 90, "both agents saying RBAC refused the pod list")
        for error in errors.values():
            assert error.startswith("RBAC: the agent may not list pods"), error
            assert "system:serviceaccount:qtrace:qtrace-agent" in error, error
            assert "get/list/watch on pods" in error
    finally:
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
            binding["metadata"].pop(key, None)
        apply(binding)
    # Put back, the same agents trace without a restart.
    try:

        def recovered() -> bool:
            return all(not e for e in agent_errors(deployed, sid).values())

        poll(recovered, 90, "the agents tracing once the binding is back")
    finally:
        stop(deployed, sid)
