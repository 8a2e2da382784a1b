"""Pods on this node, from the API server, and the cgroups their containers run in.

One PodWatcher per agent lists and watches the pods scheduled on its node (a field
selector on spec.nodeName, so the API server sends nothing else). Containers are matched
to cgroup v2 ids by their directory names: the kubelet puts a pod under
`kubepods[/<qos>]/pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid>.slice` (systemd
driver), and the runtime puts each container below it, named by the container id."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.labels import Selector, parse_selector
from qtrace.errors import QtraceError

log = logging.getLogger("qtrace.agent.k8s")

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_DIR = re.compile(rf"(?:^|-)pod(?P<uid>{_UID})(?:\.slice)?$")
_CONTAINER_DIR = re.compile(
    r"^(?:(?:cri-containerd|containerd|docker|crio|cri-o)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$"
)
CACHE_SECONDS = 0.5  # every session's tracer asks once a second; one walk serves them all


@dataclass(frozen=True, slots=True)
class ContainerRef:
    namespace: str
    pod: str
    container: str


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    containers: Mapping[str, str]  # container id (no runtime prefix) -> container name
    phase: str = ""


def parse_cgroup_path(rel: str) -> tuple[str, str | None] | None:
    """(pod uid, container id or None for the pod's own directory) of a kubepods cgroup
    path, or None for a path that is no pod's."""
    parts = [p for p in rel.split("/") if p]
    for i, part in enumerate(parts):
        m = _POD_DIR.search(part)
        if m is None or not part.startswith(("pod", "kubepods")):
            continue
        uid = m["uid"].replace("_", "-")
        if i + 1 == len(parts):
            return uid, None
        c = _CONTAINER_DIR.match(parts[i + 1])
        # The pause ("sandbox") container and anything else unnamed still belong to the pod.
        return uid, c["id"] if c else parts[i + 1]
    return None


def container_id(status_id: str) -> str:
    """`containerd://abc...` -> `abc...`."""
    return status_id.rpartition("://")[2]


def _kubepods_dirs(root: Path, depth: int = 3) -> list[str]:
    """The kubelet's top cgroup(s), `kubepods*`, at most `depth` levels down (a kubelet
    given --cgroup-root puts it below that, as several on one machine must)."""
    found: list[str] = []
    level = [str(root)]
    for _ in range(depth):
        nxt: list[str] = []
        for d in level:
            try:
                entries = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for e in entries:
                (found if e.name.startswith("kubepods") else nxt).append(e.path)
        level = nxt
    return found


def scan_cgroups(root: Path) -> dict[int, tuple[str, str | None]]:
    """cgroup id (directory inode) -> (pod uid, container id) for every pod cgroup."""
    found: dict[int, tuple[str, str | None]] = {}
    for top in _kubepods_dirs(root):
        for dirpath, _dirs, _files in os.walk(top):
            where = parse_cgroup_path(os.path.relpath(dirpath, root))
            if where is None:
                continue
            try:
                found[os.stat(dirpath).st_ino] = where
            except OSError:
                continue  # the container just went away
    return found


@dataclass(frozen=True)
class PodTargets:
    """A session's Kubernetes targets: pods in these namespaces, with these labels, or
    named (`name` or `namespace/name`)."""

    namespaces: tuple[str, ...] = ()
    selector: Selector = field(default_factory=lambda: parse_selector(""))
    pods: tuple[str, ...] = ()

    @classmethod
    def of(cls, namespaces: Iterable[str], selector: str, pods: Iterable[str]) -> PodTargets:
        return cls(tuple(namespaces), parse_selector(selector), tuple(pods))

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.pods)

    def matches(self, pod: Pod) -> bool:
        if self.namespaces and pod.namespace not in self.namespaces:
            return False
        if self.pods and not any(p in (pod.name, f"{pod.namespace}/{pod.name}") for p in self.pods):
            return False
        return self.selector.matches(pod.labels)

    def describe(self) -> str:
        said = []
        if self.namespaces:
            said.append("namespace " + ",".join(self.namespaces))
        if self.selector.requirements:
            said.append(f"selector {self.selector.text}")
        if self.pods:
            said.append("pod " + ",".join(self.pods))
        return ", ".join(said)


def _api_client(kubeconfig: str | None) -> Any:
    """In the cluster: the pod's service account; outside: a kubeconfig file."""
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        conf = client.Configuration()
        config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        return client.ApiClient(conf)
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not os.path.exists(path):
        raise QtraceError(
            "this agent cannot reach the Kubernetes API: not in a pod and no kubeconfig",
            "run it as the DaemonSet (daemonset/), or give `qtrace agent run --kubeconfig`",
        )
    try:
        return config.new_client_from_config(config_file=path)  # type: ignore[no-untyped-call]
    except Exception as e:  # the client raises ConfigException, ValueError, yaml errors...
        raise QtraceError(f"cannot load kubeconfig {path} ({e})") from e


def _forbidden(e: Any, what: str) -> str:
    """A 403 from the API server, said with the permission the agent's role lacks."""
    import json

    try:
        message = json.loads(e.body)["message"]
    except Exception:
        message = str(e.reason)
    return (
        f"RBAC: the agent may not {what} ({message}); bind its service account a ClusterRole "
        "allowing get/list/watch on pods and get on namespaces (daemonset/base/rbac.yaml)"
    )


class PodWatcher:
    """The pods on one node, kept current by a list+watch loop in a thread."""

    def __init__(self, node: str, kubeconfig: str | None = None) -> None:
        self.node = node
        self._api = _api_client(kubeconfig)
        self._pods: dict[str, Pod] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()  # the first full list arrived
        self.problem = ""  # why the pods cannot be known right now ("" when they can)
        self._namespaces: dict[str, tuple[float, bool | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qtrace-pods", daemon=True)
        self._cgroups: tuple[float, dict[int, ContainerRef]] = (0.0, {})

    def start(self) -> PodWatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def pods(self) -> list[Pod]:
        with self._lock:
            return list(self._pods.values())

    # -- the API server --------------------------------------------------------------------

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._api)

    def _loop(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = 0.2
        selector = f"spec.nodeName={self.node}"
        while not self._stop.is_set():
            try:
                core = self._core()
                listed = core.list_pod_for_all_namespaces(
                    field_selector=selector, _request_timeout=30
                )
                with self._lock:
                    self._pods = {p.metadata.uid: _pod(p) for p in listed.items}
                self.problem = ""
                self.synced.set()
                backoff = 0.2
                version = listed.metadata.resource_version
                w = watch.Watch()  # type: ignore[no-untyped-call]
                for ev in w.stream(  # type: ignore[no-untyped-call]
                    core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=60,
                    # A connection that died silently ends too, and is listed again.
                    _request_timeout=90,
                ):
                    if self._stop.is_set():
                        w.stop()  # type: ignore[no-untyped-call]
                        return
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        break  # e.g. 410 Gone: the version is too old, list again
                    with self._lock:
                        if ev["type"] == "DELETED":
                            self._pods.pop(obj.metadata.uid, None)
                        else:
                            self._pods[obj.metadata.uid] = _pod(obj)
            except ApiException as e:
                said = (
                    _forbidden(e, "list pods")
                    if e.status == 403
                    else f"the API server refused the pod list ({e.status} {e.reason})"
                )
                if said != self.problem:
                    log.error("%s", said)
                self.problem = said
            except Exception as e:  # connection refused, timeouts, TLS: all retried
                said = f"cannot reach the Kubernetes API server ({type(e).__name__}: {e})"
                if said != self.problem:
                    log.warning("%s; retrying", said)
                self.problem = said
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def namespace_exists(self, name: str) -> bool | None:
        """None when it cannot be known (forbidden, unreachable); cached for 10 s."""
        from kubernetes.client.exceptions import ApiException

        now = time.monotonic()
        cached = self._namespaces.get(name)
        if cached and now - cached[0] < 10:
            return cached[1]
        exists: bool | None
        try:
            # Asked from the agent's main loop: never wait long for an answer.
            self._core().read_namespace(name, _request_timeout=5)
            exists = True
        except ApiException as e:
            exists = False if e.status == 404 else None
            if e.status == 403:
                log.error("%s", _forbidden(e, f"get namespace {name}"))
        except Exception:
            exists = None
        self._namespaces[name] = (now, exists)
        return exists

    # -- cgroups ---------------------------------------------------------------------------

    def containers(self, root: Path) -> dict[int, ContainerRef]:
        """cgroup id -> container, for every pod on this node (cached briefly)."""
        at, known = self._cgroups
        if time.monotonic() - at < CACHE_SECONDS:
            return known
        by_uid = {p.uid: p for p in self.pods()}
        found: dict[int, ContainerRef] = {}
        for cg, (uid, cid) in scan_cgroups(root).items():
            pod = by_uid.get(uid)
            if pod is None:
                continue  # a pod the watch has not told us about yet, or gone
            name = pod.containers.get(cid or "", "") if cid else ""
            found[cg] = ContainerRef(pod.namespace, pod.name, name)
        self._cgroups = (time.monotonic(), found)
        return found

    def cgroups_of(self, targets: PodTargets, root: Path) -> set[int]:
        """Every cgroup of the containers of the pods the targets pick."""
        picked = {(p.namespace, p.name) for p in self.pods() if targets.matches(p)}
        return {cg for cg, c in self.containers(root).items() if (c.namespace, c.pod) in picked}

    def problem_with(self, targets: PodTargets, root: Path) -> str:
        """What keeps a session from tracing anything on this node, or ""."""
        if self.problem:
            return self.problem
        if not self.synced.is_set():
            return ""
        for ns in targets.namespaces:
            if self.namespace_exists(ns) is False:
                return f"namespace {ns!r} does not exist"
        picked = [p for p in self.pods() if targets.matches(p)]
        if not picked:
            return f"no pods on node {self.node} match {targets.describe()}"
        if not self.cgroups_of(targets, root) and any(p.containers for p in picked):
            return (
                f"{len(picked)} pod(s) match but none of their containers' cgroups is under "
                f"{root}: mount the host's /sys/fs/cgroup into the agent"
            )
        return ""


def _pod(p: Any) -> Pod:
    statuses = list(p.status.container_statuses or []) + list(
        p.status.init_container_statuses or []
    )
    return Pod(
        namespace=str(p.metadata.namespace),
        name=str(p.metadata.name),
        uid=str(p.metadata.uid),
        labels=dict(p.metadata.labels or {}),
        containers={container_id(s.container_id): str(s.name) for s in statuses if s.container_id},
        phase=str(p.status.phase or ""),
    )
