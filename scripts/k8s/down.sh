#!/usr/bin/env bash
# Tears down what scripts/k8s/up.sh started and leaves nothing behind except the build and
# image caches in $CACHE: processes, containers, mounts, network namespaces, links, cgroups,
# iptables chains, sysctls and the state dir. Safe to run twice or after a failed up.sh.
# No `set -e`: every step is best effort, so one failure does not leave the rest behind.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
need_root

if [[ ! -d $STATE ]] && ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  say "nothing to tear down ($STATE does not exist)"
  exit 0
fi

# stop NAME: SIGTERM, then SIGKILL after a deadline; the pid file is ours, never a name match.
stop() {
  local f=$RUN/$1.pid pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    local deadline=$(( $(date +%s) + 15 ))
    while kill -0 "$pid" 2>/dev/null && (( $(date +%s) < deadline )); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$1 ignored SIGTERM for 15s: killed"
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$f"
}

# Kubelets first so that nothing restarts containers while they are removed.
for n in "${NODES[@]}"; do stop "kubelet-$n"; done
stop kube-proxy

# Containers: kill every task in each node's containerd, then containerd itself and its shims.
for n in "${NODES[@]}"; do
  sock=$RUN/$n-containerd.sock
  if [[ -S $sock ]] && ctr --address "$sock" version >/dev/null 2>&1; then
    for t in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1
    done
    for t in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io tasks rm -f "$t" >/dev/null 2>&1
    done
    for c in $(ctr --address "$sock" -n k8s.io containers ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io containers rm "$c" >/dev/null 2>&1
    done
  fi
  stop "containerd-$n"
  # Shims outlive containerd by design; ours name our socket on their command line.
  for p in $(pgrep -f -- "-address $sock" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
done
for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done

# Anything still alive inside the nodes' cgroups (containers whose shim was killed) goes now;
# then the cgroup trees are removed bottom-up.
for n in "${NODES[@]}"; do
  for d in /sys/fs/cgroup/*/qtrace-"$n"; do
    [[ -d $d ]] || continue
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
  done
done
for n in "${NODES[@]}"; do
  for d in /sys/fs/cgroup/*/qtrace-"$n"; do
    [[ -d $d ]] || continue
    deadline=$(( $(date +%s) + 10 ))
    until find "$d" -depth -type d -exec rmdir {} + 2>/dev/null; [[ ! -d $d ]]; do
      (( $(date +%s) < deadline )) || { say "cannot remove cgroup $d (processes left?)"; break; }
      sleep 0.2
    done
  done
done

# Mounts under the state dir (pod volumes, container rootfs, sandbox shm), deepest first.
if [[ -d $STATE ]]; then
  findmnt -rn -o TARGET | grep -E "^$STATE(/|$)" | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
fi
# Pod network namespaces created by our containerds (names recorded as new by up.sh are cni-*).
if [[ -f $STATE/netns.before ]]; then
  for ns in /run/netns/cni-*; do
    [[ -e $ns ]] || continue
    grep -qx "$ns" "$STATE/netns.before" && continue
    umount -l "$ns" 2>/dev/null; rm -f "$ns"
  done
fi

# iptables: every KUBE-* / CNI-* chain and every rule jumping to one (added by kube-proxy,
# kubelet and the CNI bridge plugin); other chains are left alone.
for ipt in iptables ip6tables; do
  command -v $ipt >/dev/null || continue
  for table in filter nat mangle; do
    $ipt -t $table -S 2>/dev/null | grep -E -- '^-A .*-j (KUBE-|CNI-)' | grep -Ev '^-A (KUBE-|CNI-)' \
      | while read -r rule; do
        # shellcheck disable=SC2086
        eval "$ipt -t $table ${rule/-A/-D}" 2>/dev/null
      done
    chains=$($ipt -t $table -S 2>/dev/null | sed -nE 's/^-N ((KUBE-|CNI-)[^ ]*)/\1/p')
    for c in $chains; do $ipt -t $table -F "$c" 2>/dev/null; done
    for c in $chains; do $ipt -t $table -X "$c" 2>/dev/null; done
  done
done

for l in "$BRIDGE" "${NODES[@]/#/qk8s-}"; do
  ip link del "$l" 2>/dev/null
done

if [[ -f $STATE/sysctl.orig ]]; then
  while IFS= read -r kv; do sysctl -qw "$kv" 2>/dev/null; done <"$STATE/sysctl.orig"
fi
if [[ -f $STATE/undo ]]; then
  sed -n 's/^rmdir-if-created //p' "$STATE/undo" | while read -r d; do rm -rf "$d"; done
fi
rm -rf "$STATE"
[[ -e $STATE ]] && die "could not remove $STATE (busy mounts?): see findmnt | grep $STATE"
say "cluster down; build cache kept in $CACHE"
