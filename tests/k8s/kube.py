"""The cluster under test, reached through scripts/k8s/'s interface: QTRACE_K8S_KUBECONFIG
(admin kubeconfig) and QTRACE_K8S_KUBECTL (the kubectl built with the cluster)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.procs import wait_for

T = TypeVar("T")


def _env_path(name: str) -> str:
    value = os.environ.get(name, "")
    if not value or not Path(value).exists():
        raise AssertionError(
            f"{name} is unset or missing ({value!r}): run the k8s tests with `make test-k8s`, "
            "or export it after scripts/k8s/up.sh (see scripts/k8s/README.md)"
        )
    return value


def kubectl(*args: str, stdin: str | None = None, check: bool = True, timeout: float = 60) -> str:
    cmd = [
        _env_path("QTRACE_K8S_KUBECTL"),
        "--kubeconfig",
        _env_path("QTRACE_K8S_KUBECONFIG"),
        *args,
    ]
    r = subprocess.run(
        cmd, check=False, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def get(*args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))


def apply(*objects: dict[str, Any]) -> None:
    kubectl(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def poll(cond: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll the API (or the network) until cond returns a truthy value."""
    value: T = wait_for(cond, timeout, what, interval=0.25)
    return value


def node_ready(node: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])
    )
