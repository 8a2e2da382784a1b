"""Smoke test of the cluster that scripts/k8s/up.sh brings up: two Ready nodes, pods of
qtrace-searchsvc:dev on each reachable from the host by pod IP, and a ClusterIP Service
reached through kube-proxy that balances over pods on both nodes."""

from __future__ import annotations

import functools
import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.k8s.kube import apply, get, kubectl, node_ready, poll

NODES = ("node-a", "node-b")


def leaf_pod(name: str, node: str, leaf_id: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "smoke-leaf"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "leaf",
                    "image": "qtrace-searchsvc:dev",
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
    }


def search(host: str, port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/search?q=smoke", timeout=3) as r:
            answer: dict[str, Any] = json.load(r)
            return answer
    except OSError:
        return None


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"smoke-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", ns)
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false")


def test_two_nodes_ready() -> None:
    nodes = {n["metadata"]["name"]: n for n in get("nodes")["items"]}
    assert sorted(nodes) == sorted(NODES)
    for name in NODES:
        assert node_ready(nodes[name]), f"{name} is not Ready"
    ips = {
        a["address"]
        for n in nodes.values()
        for a in n["status"]["addresses"]
        if a["type"] == "InternalIP"
    }
    assert len(ips) == 2, f"nodes share an InternalIP: {ips}"


def test_pods_on_both_nodes_and_a_cluster_ip(namespace: str) -> None:
    # Leaf ids differ per node so the answers tell which pod served them.
    pods = {f"leaf-{i}": (node, i) for i, node in enumerate(NODES)}
    apply(
        *[
            {
                **leaf_pod(name, node, i),
                "metadata": {**leaf_pod(name, node, i)["metadata"], "namespace": namespace},
            }
            for name, (node, i) in pods.items()
        ],
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "smoke-leaf", "namespace": namespace},
            "spec": {
                "selector": {"app": "smoke-leaf"},
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        },
    )

    def all_ready() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = get("pods", "-n", namespace)["items"]
        ready = [
            p
            for p in items
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p["status"].get("conditions", [])
            )
        ]
        return items if len(ready) == len(pods) else None

    running = poll(all_ready, 120, "both leaf pods Ready")
    by_name = {p["metadata"]["name"]: p for p in running}
    for name, (node, leaf_id) in pods.items():
        pod = by_name[name]
        assert pod["spec"]["nodeName"] == node
        ip: str = pod["status"]["podIP"]
        answer = poll(functools.partial(search, ip, 8080), 30, f"{name} by pod IP {ip}")
        assert answer["leaf"] == leaf_id
    assert len({p["status"]["podIP"] for p in running}) == 2

    cluster_ip = get("service", "smoke-leaf", "-n", namespace)["spec"]["clusterIP"]
    seen: set[int] = set()

    def both_leaves_answered() -> bool:
        answer = search(cluster_ip, 80)
        if answer is not None:
            seen.add(answer["leaf"])
        return seen == {0, 1}

    poll(both_leaves_answered, 60, f"answers from both nodes' pods through {cluster_ip}:80")
