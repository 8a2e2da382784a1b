"""daemonset/: the kustomize base and the Helm chart, rendered by the real tools and checked
against Kubernetes' schemas (kubernetes-validate --strict) and qtrace's own rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import all_versions

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("QTRACE_TOOLS", "/var/cache/qtrace/tools"))
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
# The three newest Kubernetes minor versions the installed kubernetes-validate knows.
VERSIONS = sorted(
    {".".join(v.split(".")[:2]) for v in all_versions()},
    key=lambda v: tuple(int(x) for x in v.split(".")),
)[-3:]
HELM_VARIANTS = {
    "defaults": [],
    "nodeport-emptydir": [
        "--set", "collector.service.type=NodePort", "--set", "collector.service.nodePort=30707",
        "--set", "collector.persistence.enabled=false", "--set", "createNamespace=false",
    ],
    "other-release": [],
}  # fmt: skip


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} missing: run `bash scripts/setup.sh --test`"
    return str(path)


def render_kustomize() -> str:
    return subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / "daemonset/base")],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def render_helm(variant: str) -> str:
    release = "trace-prod" if variant == "other-release" else "qtrace"
    return subprocess.run(
        [tool("helm"), "template", release, str(ROOT / "daemonset/helm/qtrace"),
         "--namespace", "qtrace", *HELM_VARIANTS[variant]],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


RENDERINGS = ["kustomize", *(f"helm-{v}" for v in HELM_VARIANTS)]


def rendered(which: str) -> str:
    return render_kustomize() if which == "kustomize" else render_helm(which[5:])


@pytest.mark.parametrize("which", RENDERINGS)
def test_rendered_manifests_pass_strict_schemas(which: str, tmp_path: Path) -> None:
    path = tmp_path / f"{which}.yaml"
    path.write_text(rendered(which))
    assert len(VERSIONS) == 3
    for version in VERSIONS:
        res = subprocess.run(
            [str(VALIDATE), "--strict", "--quiet", "-k", f"{version}.0", str(path)],
            check=False, capture_output=True, text=True,
        )  # fmt: skip
        # A kind it has no schema for is only a warning to the tool, and a failure here.
        assert res.returncode == 0 and "WARN" not in res.stdout, (version, res.stdout)


@pytest.mark.parametrize("which", RENDERINGS)
def test_agent_asks_for_least_privilege(which: str) -> None:
    objs = docs(rendered(which))
    ds = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert ds["hostPID"] is True
    assert {"operator": "Exists"} in ds["tolerations"]
    (c,) = ds["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) <= {
        "BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_ADMIN"
    }  # fmt: skip
    assert c["imagePullPolicy"] == "Never" and c["image"] == "qtrace-agent:dev"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    volumes = {v["name"]: v for v in ds["volumes"]}
    for m in c["volumeMounts"]:
        if "hostPath" in volumes[m["name"]] and m["name"] != "spool":
            assert m.get("readOnly") is True, f"host mount {m['mountPath']} is writable"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The collector address is the Service's environment variables, named after it.
    service = one(objs, "Service")["metadata"]["name"]
    prefix = service.upper().replace("-", "_")
    (addr,) = [a for a in c["args"] if a.startswith("--collector=")]
    assert addr == f"--collector=$({prefix}_SERVICE_HOST):$({prefix}_SERVICE_PORT_GRPC)"


@pytest.mark.parametrize("which", RENDERINGS)
def test_rbac_only_reads(which: str) -> None:
    objs = docs(rendered(which))
    role = one(objs, "ClusterRole")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs <= {"get", "list", "watch"}
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"pods", "namespaces"}
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": "qtrace"}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    ds = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert ds["serviceAccountName"] == sa["name"]


@pytest.mark.parametrize("which", RENDERINGS)
def test_collector_owns_its_file_alone(which: str) -> None:
    objs = docs(rendered(which))
    dep = one(objs, "Deployment")["spec"]
    assert dep["replicas"] == 1 and dep["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in dep["template"]["spec"]["volumes"]}
    if which == "helm-nodeport-emptydir":
        assert "emptyDir" in volumes["data"]
        assert not [o for o in objs if o["kind"] in ("PersistentVolumeClaim", "Namespace")]
        assert one(objs, "Service")["spec"]["ports"][0]["nodePort"] == 30707
    else:
        claim = one(objs, "PersistentVolumeClaim")["metadata"]["name"]
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim


def test_helm_and_kustomize_deploy_the_same_thing() -> None:
    """Same names, same agent and collector pod specs: only Helm's bookkeeping labels differ."""

    def strip(objs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        out = {}
        for o in objs:
            text = yaml.safe_dump(o)
            for noise in (
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ):
                text = "\n".join(line for line in text.splitlines() if noise not in line)
            out[(o["kind"], o["metadata"]["name"])] = yaml.safe_load(text)
        return out

    kust, helm = strip(docs(render_kustomize())), strip(docs(render_helm("defaults")))
    assert kust.keys() == helm.keys()
    for key in kust:
        if key[0] in ("DaemonSet", "Deployment"):
            assert kust[key]["spec"]["template"]["spec"] == helm[key]["spec"]["template"]["spec"]
