#!/usr/bin/env bash
# Builds Kubernetes once from Debian's `kubernetes` source package with Debian's Go and the
# vendored dependencies, into $CACHE/<version>/bin. A second run finds the cache and exits.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
need_root

CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

if bin=$(k8s_bin_dir); then
  ok=1
  for c in "${CMDS[@]}"; do [[ -x $bin/$c ]] || ok=0; done
  if ((ok)); then echo "$bin"; exit 0; fi
fi

# Source lists come from the machine's own apt configuration: every enabled `deb` entry is
# repeated as `deb-src` in a file of our own (deb822 stanzas and one-line lists alike).
src_sources=/etc/apt/sources.list.d/qtrace-k8s-src.sources
src_list=/etc/apt/sources.list.d/qtrace-k8s-src.list
derive_deb_src() {
  local f tmp_sources tmp_list
  tmp_sources=$(mktemp) tmp_list=$(mktemp)
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f && $f != "$src_sources" ]] || continue
    # Only stanzas whose Types has `deb` but not yet `deb-src`, and that are not disabled.
    awk 'BEGIN{RS=""; ORS="\n\n"}
      /(^|\n)Enabled: *no/ {next}
      /(^|\n)Types:[^\n]*deb-src/ {next}
      /(^|\n)Types:[^\n]*(^|[ \t])deb([ \t]|$|\n)/ {
        sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f" >>"$tmp_sources"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f && $f != "$src_list" ]] || continue
    sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' "$f" >>"$tmp_list"
  done
  [[ -s $tmp_sources || -s $tmp_list ]] || die "no enabled deb entries in /etc/apt/sources.list(.d) to derive deb-src from"
  if [[ -s $tmp_sources ]]; then install -m 644 "$tmp_sources" "$src_sources"; fi
  if [[ -s $tmp_list ]]; then install -m 644 "$tmp_list" "$src_list"; fi
  rm -f "$tmp_sources" "$tmp_list"
}

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  derive_deb_src
  apt-get update -qq >/dev/null || die "apt-get update failed after adding deb-src entries ($src_sources)"
fi
apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes' \
  || die "apt has no source package 'kubernetes' (needs a Debian release that ships it)"
for p in golang-go dpkg-dev make rsync; do
  dpkg -s "$p" >/dev/null 2>&1 || apt-get install -y -qq "$p" >/dev/null || die "apt-get install $p failed"
done

work=$CACHE/src
rm -rf "$work" && mkdir -p "$work"
(cd "$work" && apt-get source -qq --download-only kubernetes >/dev/null) || die "apt-get source kubernetes failed"
(cd "$work" && dpkg-source -x --no-check ./*.dsc tree >/dev/null) || die "dpkg-source could not unpack kubernetes"
# Debian versions like 1.20.5+really1.20.2-1.1 carry the real upstream after "really".
version=$(cd "$work" && ls ./*.dsc | sed -E 's|.*/kubernetes_||; s|\.dsc$||; s|.*really||; s|-[^-]*$||; s|\+.*||')
[[ $version == "$K8S_VERSION_WANT".* ]] || die "Debian's kubernetes is $version, wanted $K8S_VERSION_WANT.x"
out=$CACHE/$version/bin
mkdir -p "$out"

say "building Kubernetes $version with $(go version | cut -d' ' -f3) (once; cached in $out)"
start=$(date +%s)
# Built the way Debian's own rules build it: `make WHAT=...` in GOPATH mode from the vendored
# tree (it first generates the OpenAPI definitions the apiserver needs, which the tarball
# lacks); with modules on, Go >= 1.17 rejects its go.mod.
cd "$work/tree"
mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
export GOPATH=$work/tree/.go GO111MODULE=off GOFLAGS= CGO_ENABLED=0 HOME=$work
make WHAT="${CMDS[*]/#/cmd/}" KUBE_GIT_VERSION="v$version" GOLDFLAGS="-s -w" >"$CACHE/build.log" 2>&1 \
  || { tail -20 "$CACHE/build.log" >&2; die "make WHAT=... failed: see $CACHE/build.log"; }
for c in "${CMDS[@]}"; do
  install -m 755 "_output/bin/$c" "$out/$c" || die "make did not produce _output/bin/$c"
done
secs=$(( $(date +%s) - start ))
echo "$secs" >"$CACHE/$version/build-seconds"
rm -rf "$work"
say "built ${CMDS[*]} in ${secs}s"
echo "$out"
