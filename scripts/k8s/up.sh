#!/usr/bin/env bash
# Brings up a two-node Kubernetes cluster on this machine: etcd, kube-apiserver (RBAC on),
# controller-manager, scheduler, one kube-proxy (iptables mode), and two kubelets (node-a,
# node-b), each with its own containerd + runc and CNI bridge. Everything lives in $STATE;
# scripts/k8s/down.sh removes all of it. Prints the admin kubeconfig path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/lib.sh"
need_root

if [[ -d $STATE ]]; then
  die "a cluster (or its leftovers) is already in $STATE: run scripts/k8s/down.sh first"
fi
bin=$(k8s_bin_dir) || die "no Kubernetes $K8S_VERSION_WANT build in $CACHE: run scripts/k8s/build.sh first"

pkgs=(etcd-server containerd runc containernetworking-plugins iptables conntrack openssl iproute2 gcc libc6-dev buildah)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed: check the machine's apt sources"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi
for port in $ETCD_CLIENT_PORT $ETCD_PEER_PORT $APISERVER_PORT; do
  if ss -Hltn "sport = :$port" | grep -q .; then die "port $port is already in use"; fi
done
ip link show "$BRIDGE" >/dev/null 2>&1 && die "interface $BRIDGE already exists: run scripts/k8s/down.sh first"

start=$(date +%s)
mkdir -p "$STATE" "$RUN" "$LOGS" "$STATE/pki"
trap '[[ $? -eq 0 ]] || echo "qtrace k8s: up.sh failed half-way: scripts/k8s/down.sh removes what it started" >&2' EXIT
# down.sh reads this list to know what to undo, in reverse order.
record() { echo "$*" >>"$STATE/undo"; }

# Start a daemon in the background with its log, remembering its pid for down.sh.
spawn() {
  local name=$1; shift
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}
alive() { kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
wait_for() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    alive "$name" || die "$name exited: see $LOGS/$name.log"
    (( $(date +%s) < deadline )) || die "$name not ready after ${secs}s: see $LOGS/$name.log"
    sleep 0.3
  done
}

# --- kernel settings (originals saved so down.sh restores them) ------------------------------
# kubelet and kube-proxy set some of these themselves; all of them are saved up front.
sysctls=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.ipv4.conf.all.route_localnet
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
for s in "${sysctls[@]}"; do
  v=$(sysctl -n "$s" 2>/dev/null) && echo "$s=$v" >>"$STATE/sysctl.orig"
done
sysctl -qw net.ipv4.ip_forward=1
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null \
  || die "net.bridge.bridge-nf-call-iptables missing: modprobe br_netfilter"
for d in /var/log/pods /var/log/containers /run/containerd /var/lib/cni /etc/cni /opt/cni /run/netns; do
  [[ -e $d ]] || record "rmdir-if-created $d"
done
ls -d /run/netns/cni-* >"$STATE/netns.before" 2>/dev/null || true

# --- network: a host bridge holding one address per node (kubelet refuses loopback) -----------
ip link add "$BRIDGE" type bridge
record "link $BRIDGE"
ip addr add "$HOST_IP/24" dev "$BRIDGE"
for n in "${NODES[@]}"; do ip addr add "${NODE_IP[$n]}/24" dev "$BRIDGE"; done
ip link set "$BRIDGE" up

# --- certificates -------------------------------------------------------------------------
pki=$STATE/pki
ossl() { openssl "$@" >/dev/null 2>&1 || die "openssl $1 failed"; }
ossl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=qtrace-k8s-ca"
# cert NAME SUBJECT [SANS]
cert() {
  local name=$1 subj=$2 sans=${3:-} ext
  ext=$(mktemp)
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [[ -n $sans ]] && echo "subjectAltName=$sans"
  } >"$ext"
  ossl req -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -out "$pki/$name.csr" -subj "$subj"
  ossl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$ext" -out "$pki/$name.crt"
  rm -f "$ext" "$pki/$name.csr"
}
cert apiserver "/CN=kube-apiserver" \
  "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$HOST_IP,IP:$KUBERNETES_SVC_IP"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert admin "/O=system:masters/CN=qtrace-admin"
cert controller-manager "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
cert kube-proxy "/CN=system:kube-proxy"
for n in "${NODES[@]}"; do
  cert "kubelet-$n" "/O=system:nodes/CN=system:node:$n" "DNS:$n,IP:${NODE_IP[$n]}"
done
ossl genrsa -out "$pki/sa.key" 2048
ossl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

# kubeconfig FILE CERTNAME
kubeconfig() {
  local file=$1 name=$2
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: qtrace
  cluster:
    server: https://$HOST_IP:$APISERVER_PORT
    certificate-authority: $pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $pki/$name.crt
    client-key: $pki/$name.key
contexts:
- name: qtrace
  context: {cluster: qtrace, user: $name}
current-context: qtrace
EOF
}
kubeconfig "$KUBECONFIG_PATH" admin
for c in controller-manager scheduler kube-proxy; do kubeconfig "$STATE/$c.kubeconfig" "$c"; done
kctl() { "$bin/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# --- etcd ---------------------------------------------------------------------------------
spawn etcd etcd --name qtrace --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "qtrace=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
  --quota-backend-bytes 1073741824
wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

# --- control plane ------------------------------------------------------------------------
spawn kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --bind-address 0.0.0.0 --secure-port "$APISERVER_PORT" --insecure-port 0 --advertise-address "$HOST_IP" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
  --enable-admission-plugins NodeRestriction --allow-privileged=true \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP --profiling=false
wait_for kube-apiserver 90 kctl get --raw /readyz

spawn kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$STATE/controller-manager.kubeconfig" --leader-elect=false \
  --port 0 --bind-address 127.0.0.1 --secure-port 10257 \
  --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials=true \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  --cluster-cidr "$CLUSTER_CIDR" --service-cluster-ip-range "$SERVICE_CIDR"
spawn kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig "$STATE/scheduler.kubeconfig" --leader-elect=false \
  --port 0 --bind-address 127.0.0.1 --secure-port 10259 \
  --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
  --authorization-kubeconfig "$STATE/scheduler.kubeconfig"

# --- the pause image (built locally: no registry pulls) -------------------------------------
pause_tar=$CACHE/images/pause.tar
if [[ ! -s $pause_tar || $repo/images/pause/pause.c -nt $pause_tar ]]; then
  tmp=$(mktemp -d)
  gcc -static -O2 -o "$tmp/pause" "$repo/images/pause/pause.c" || die "cannot compile images/pause/pause.c"
  c=$(bah from scratch)
  bah copy "$c" "$tmp/pause" /pause >/dev/null
  bah config --entrypoint '["/pause"]' "$c"
  bah commit -q "$c" qtrace-pause:dev >/dev/null || die "buildah commit of the pause image failed"
  bah rm "$c" >/dev/null
  image_archive qtrace-pause:dev "$pause_tar"
  rm -rf "$tmp"
fi

# --- nodes: containerd + CNI + kubelet each -------------------------------------------------
# Containers get explicit rlimits: without them they inherit containerd's, which is not safe
# to rely on here.
base_spec=$STATE/base-spec.json
ctr oci spec | python3 -c '
import json, sys
spec = json.load(sys.stdin)
spec["process"]["rlimits"] = [
    {"type": "RLIMIT_NOFILE", "hard": 16384, "soft": 16384},
    {"type": "RLIMIT_NPROC", "hard": 8192, "soft": 8192},
]
json.dump(spec, sys.stdout, indent=1)' >"$base_spec"

# The v1 hierarchies that exist here (the machine mixes v1 controllers and a v2 "unified").
cgroup_dirs=()
for d in /sys/fs/cgroup/*/; do
  d=${d%/}
  [[ $(stat -fc %T "$d") == cgroup* ]] && cgroup_dirs+=("$d")
done

i=0
for n in "${NODES[@]}"; do
  i=$((i + 1))
  nd=$STATE/nodes/$n
  mkdir -p "$nd/cni" "$nd/cni-ipam" "$nd/kubelet" "$nd/containerd"
  sock=$RUN/$n-containerd.sock
  # A private cgroup root per node, so that two kubelets never manage the same kubepods tree.
  for d in "${cgroup_dirs[@]}"; do
    mkdir -p "$d/qtrace-$n"
    if [[ -f $d/cpuset.cpus ]]; then
      cat "$d/cpuset.cpus" >"$d/qtrace-$n/cpuset.cpus"
      cat "$d/cpuset.mems" >"$d/qtrace-$n/cpuset.mems"
    fi
  done
  record "cgroup qtrace-$n"
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$RUN/$n-containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri.v1alpha2", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/qtrace-pause:dev"
  restrict_oom_score_adj = true
  # Pod network namespaces under our state dir, not /run/netns: down.sh finds them all there.
  netns_mounts_under_state_dir = true
  stream_server_address = "${NODE_IP[$n]}"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      base_runtime_spec = "$base_spec"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni"
EOF
  cat >"$nd/cni/10-qtrace.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "qtrace-$n",
  "plugins": [
    {"type": "bridge", "bridge": "qk8s-$n", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$nd/cni-ipam", "ranges": [[{"subnet": "${POD_CIDR[$n]}"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  record "link qk8s-$n"
  spawn "containerd-$n" containerd --config "$nd/containerd.toml"
  wait_for "containerd-$n" 30 ctr --address "$sock" version
  ctr --address "$sock" -n k8s.io images import --all-platforms "$pause_tar" >/dev/null \
    || die "cannot import the pause image into $n's containerd"

  kubeconfig "$nd/kubelet.kubeconfig" "kubelet-$n"
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: ${NODE_IP[$n]}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $((10347 + i))
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /qtrace-$n
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
podCIDR: ${POD_CIDR[$n]}
resolvConf: /etc/resolv.conf
# The :dev images cannot be pulled again, so image GC must never remove them, and a shared
# machine's disk and memory use must not evict test pods.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%}
serializeImagePulls: false
EOF
  spawn "kubelet-$n" "$bin/kubelet" --config "$nd/kubelet.yaml" \
    --kubeconfig "$nd/kubelet.kubeconfig" --hostname-override "$n" --node-ip "${NODE_IP[$n]}" \
    --container-runtime remote --container-runtime-endpoint "unix://$sock" \
    --root-dir "$nd/kubelet" --cert-dir "$nd/kubelet/pki" --v 1
done

# --- kube-proxy: one for the machine (all nodes share the host's iptables) ---------------------
cat >"$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_CIDR
hostnameOverride: ${NODES[0]}
bindAddress: $HOST_IP
healthzBindAddress: 127.0.0.1:10356
metricsBindAddress: 127.0.0.1:10349
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
spawn kube-proxy "$bin/kube-proxy" --config "$STATE/kube-proxy.yaml"

# --- wait for both nodes -------------------------------------------------------------------
nodes_ready() {
  local ready
  ready=$(kctl get nodes -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')
  for n in "${NODES[@]}"; do grep -qx "$n=True" <<<"$ready" || return 1; done
}
deadline=$(( $(date +%s) + 180 ))
until nodes_ready; do
  for p in "$RUN"/*.pid; do
    p=$(basename "$p" .pid); alive "$p" || die "$p exited: see $LOGS/$p.log"
  done
  (( $(date +%s) < deadline )) || die "nodes not Ready after 180s: see $LOGS/kubelet-*.log"
  sleep 1
done
secs=$(( $(date +%s) - start ))
echo "$secs" >"$STATE/up-seconds"
say "cluster up in ${secs}s: nodes ${NODES[*]} Ready; kubectl is $bin/kubectl"
echo "$KUBECONFIG_PATH"
