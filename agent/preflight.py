"""Checks that run before anything touches the kernel, each failing with one clear line."""

from __future__ import annotations

import os
from pathlib import Path

from qtrace.errors import QtraceError

_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def kernel_headers_dir() -> Path:
    # BCC honours BCC_KERNEL_SOURCE; otherwise it looks where `make setup` links headers.
    env = os.environ.get("BCC_KERNEL_SOURCE")
    return Path(env) if env else Path(f"/lib/modules/{os.uname().release}/build")


def check() -> None:
    caps = _effective_caps()
    needed = (_CAP_BPF, _CAP_PERFMON, _CAP_SYS_ADMIN)
    if os.geteuid() != 0 and not all(caps >> c & 1 for c in needed):
        raise QtraceError(
            "qtrace needs root to load eBPF programs",
            "run it with sudo (or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)",
        )
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        raise QtraceError(
            "BCC is not importable (Debian's python3-bpfcc)", "run `make setup`"
        ) from e
    headers = kernel_headers_dir()
    if not (headers / "include").is_dir() and not (headers / "Makefile").exists():
        raise QtraceError(
            f"kernel headers not found at {headers}",
            "run `make setup` (installs linux-headers-amd64 and links them)",
        )
    if not Path("/sys/kernel/tracing/events/syscalls").is_dir():
        raise QtraceError(
            "tracefs is not mounted at /sys/kernel/tracing",
            "mount -t tracefs tracefs /sys/kernel/tracing (or run `make setup`)",
        )
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise QtraceError(
            "the kernel exposes no BTF (/sys/kernel/btf/vmlinux)",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
