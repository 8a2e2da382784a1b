# Shared settings of the scripts/k8s/ tools (sourced, not run).
# Every path lives outside the repo: the build cache survives `down.sh`, the state dir does not.
K8S_VERSION_WANT=${QTRACE_K8S_VERSION:-1.20}
CACHE=${QTRACE_K8S_CACHE:-/var/cache/qtrace-k8s}
STATE=${QTRACE_K8S_STATE:-/var/lib/qtrace-k8s}
RUN=$STATE/run
LOGS=$STATE/logs
KUBECONFIG_PATH=$STATE/admin.kubeconfig
# Address plan: a host bridge carries the two node addresses; pods get a /24 per node.
BRIDGE=qk8s0
NODES=(node-a node-b)
declare -A NODE_IP=([node-a]=10.77.0.11 [node-b]=10.77.0.12)
declare -A POD_CIDR=([node-a]=10.78.1.0/24 [node-b]=10.78.2.0/24)
HOST_IP=10.77.0.1
CLUSTER_CIDR=10.78.0.0/16
SERVICE_CIDR=10.79.0.0/24
KUBERNETES_SVC_IP=10.79.0.1
ETCD_CLIENT_PORT=23791
ETCD_PEER_PORT=23801
APISERVER_PORT=6443

die() { echo "qtrace k8s: $*" >&2; exit 1; }
say() { echo "qtrace k8s: $*" >&2; }
need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root: re-run with sudo"; }


# The newest cached build of the wanted minor version, e.g. /var/cache/qtrace-k8s/1.20.5/bin.
k8s_bin_dir() {
  local d
  d=$(ls -d "$CACHE"/"$K8S_VERSION_WANT".*/bin 2>/dev/null | sort -V | tail -1 || true)
  [[ -n $d && -x $d/kubectl ]] || return 1
  echo "$d"
}

# buildah with its storage in the cache (images survive down.sh; nothing under /var/lib/containers).
bah() {
  buildah --root "$CACHE/buildah/root" --runroot "$CACHE/buildah/run" --storage-driver overlay "$@"
}
# Saves an image as a docker-archive tarball that `ctr images import` names docker.io/library/NAME.
image_archive() {
  local name=$1 out=$2
  mkdir -p "$(dirname "$out")"
  rm -f "$out.tmp"
  bah push -q "$name" "docker-archive:$out.tmp:$name" >/dev/null || die "cannot save $name as an archive"
  mv "$out.tmp" "$out"
}
