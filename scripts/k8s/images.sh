#!/usr/bin/env bash
# Builds qtrace-agent:dev, qtrace-collector:dev and qtrace-searchsvc:dev without a registry
# and imports them into each running node's containerd (when the cluster is up).
#   base:   debootstrap of images/base/packages from the machine's own Debian mirror, cached
#           in $CACHE (rebuilt only when that list changes)
#   python: base + a venv with qtrace installed from wheels built on this machine from the repo
#   agent / collector / searchsvc: thin layers on top (entrypoints)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/lib.sh"
need_root

for p in debootstrap buildah; do
  dpkg -s "$p" >/dev/null 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null \
      || die "apt-get install $p failed"
  }
done
[[ -x $repo/.venv/bin/python ]] || die "no .venv in $repo: run scripts/setup.sh first"
start=$(date +%s)
imgdir=$CACHE/images
mkdir -p "$imgdir"

# --- base: debootstrap, cached by the hash of the package list ------------------------------
pkglist=$(grep -v '^#' "$repo/images/base/packages" | grep . | paste -sd, -)
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
base_key=$(echo "$codename $pkglist" | sha256sum | cut -c1-12)
base_tar=$imgdir/base-$base_key.tar
if [[ ! -s $base_tar ]]; then
  # The mirror is whatever this machine's apt uses for its own release.
  mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Created-By: Packages' \
    | awk -v r="$codename" '$2 == r && $3 == "main" {print $1; exit}')
  [[ -n $mirror ]] || die "no '$codename main' entry in the machine's apt sources to debootstrap from"
  say "debootstrapping the image base ($codename: $pkglist)"
  root=$(mktemp -d "$imgdir/rootfs.XXXX")
  debootstrap --variant=minbase --include="$pkglist" "$codename" "$root" "$mirror" >"$imgdir/debootstrap.log" 2>&1 \
    || { rm -rf "$root"; die "debootstrap failed: see $imgdir/debootstrap.log"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man
  tar -C "$root" --numeric-owner -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
  rm -rf "$root"
  bah rmi -f qtrace-base:dev >/dev/null 2>&1 || true
fi
if ! bah inspect --type image qtrace-base:dev >/dev/null 2>&1 \
  || [[ $(bah inspect --type image -f '{{index .ImageAnnotations "qtrace.base"}}' qtrace-base:dev) != "$base_key" ]]; then
  c=$(bah from scratch)
  bah add "$c" "$base_tar" / >/dev/null
  bah config --annotation "qtrace.base=$base_key" --env LANG=C.UTF-8 "$c"
  bah commit -q "$c" qtrace-base:dev >/dev/null || die "buildah commit of qtrace-base:dev failed"
  bah rm "$c" >/dev/null
fi

# --- qtrace from the working tree (uncommitted changes included) -----------------------------
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
src=$ctx/src
mkdir -p "$src" "$ctx/wheels"
tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=./build --exclude=./out -cf - . | tar -C "$src" -xf -
"$repo/.venv/bin/python" -m pip wheel -q --wheel-dir "$ctx/wheels" "$src" >"$imgdir/wheels.log" 2>&1 \
  || die "pip wheel of the repo failed: see $imgdir/wheels.log"
cp "$repo/images/qtrace/Containerfile" "$ctx/"
bud() {  # bud NAME FOLDER: build images/FOLDER/Containerfile as NAME with FOLDER as context
  bah bud -q --isolation chroot --network host --layers=false -t "$1" -f "$2/Containerfile" "$2" >/dev/null \
    || die "buildah bud of $1 failed (rerun: buildah bud -f $2/Containerfile)"
}
bud qtrace-python:dev "$ctx"
for i in agent collector searchsvc; do
  bud "qtrace-$i:dev" "$repo/images/$i"
  image_archive "qtrace-$i:dev" "$ctx/qtrace-$i.tar"
done
"$here/merge-archives.py" "$imgdir/qtrace-images.tar.tmp" "$ctx"/qtrace-{agent,collector,searchsvc}.tar \
  || die "cannot merge the image archives"
mv "$imgdir/qtrace-images.tar.tmp" "$imgdir/qtrace-images.tar"
# Rebuilt tags leave their previous images dangling; drop them so the cache does not grow.
bah rmi --prune >/dev/null 2>&1 || true
say "images built in $(( $(date +%s) - start ))s"

# --- import into every node's containerd that runs -------------------------------------------
imported=0
for n in "${NODES[@]}"; do
  sock=$RUN/$n-containerd.sock
  [[ -S $sock ]] || continue
  ctr --address "$sock" -n k8s.io images import "$imgdir/qtrace-images.tar" >/dev/null \
    || die "cannot import the qtrace images into $n's containerd"
  imported=1
done
if ((imported)); then
  say "qtrace-agent:dev qtrace-collector:dev qtrace-searchsvc:dev imported into ${NODES[*]} in $(( $(date +%s) - start ))s total"
else
  say "no cluster is up: images built and saved in $imgdir, not imported"
fi
