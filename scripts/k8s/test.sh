#!/usr/bin/env bash
# `make test-k8s`: build Kubernetes (cached), bring the cluster up, build and import the images,
# run tests/k8s/ against it, and always tear it down (trap), whatever failed.
# QTRACE_K8S_KEEP=1 leaves the cluster up afterwards (for debugging).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/lib.sh"
need_root
cd "$repo"

t0=$(date +%s)
lap() { echo "qtrace k8s: $1 took $(( $(date +%s) - t ))s" >&2; }
t=$(date +%s); bin=$(bash "$here/build.sh" | tail -1); lap build
[[ -d $STATE ]] && die "a cluster is already up ($STATE): run scripts/k8s/down.sh first (make test-k8s owns its cluster)"
teardown() {
  local rc=$?
  if [[ ${QTRACE_K8S_KEEP:-0} == 1 ]]; then
    say "QTRACE_K8S_KEEP=1: cluster left up ($KUBECONFIG_PATH)"
  else
    t=$(date +%s); bash "$here/down.sh" || rc=1; lap down
  fi
  say "make test-k8s: $( ((rc == 0)) && echo passed || echo FAILED) in $(( $(date +%s) - t0 ))s"
  exit "$rc"
}
trap teardown EXIT
t=$(date +%s); bash "$here/up.sh" >/dev/null; lap up
t=$(date +%s); bash "$here/images.sh"; lap images
export QTRACE_K8S_KUBECONFIG=$KUBECONFIG_PATH QTRACE_K8S_KUBECTL=$bin/kubectl
QTRACE_HELM=$(bash "$here/helm.sh")
QTRACE_K8S_RENDER_KUBECTL=$(bash "$here/helm.sh" --kubectl)
export QTRACE_HELM QTRACE_K8S_RENDER_KUBECTL
# Deploying qtrace (kustomize and Helm) is part of tests/k8s/ (fixtures), so the tests own it.
t=$(date +%s); "$repo/.venv/bin/python" -m pytest -q tests/k8s/; lap tests
