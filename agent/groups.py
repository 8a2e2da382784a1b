"""Probe groups: which kernel events a session's `--probes net,storage` asks for."""

from __future__ import annotations

# Which syscalls and tracepoints each probe group needs. read/write/close serve both:
# whether an fd is a socket or a file is only known per call.
_SHARED = frozenset({"read", "readv", "write", "writev", "close"})
PROBE_GROUPS: dict[str, frozenset[str]] = {
    "net": _SHARED
    | {
        "accept",
        "accept4",
        "connect",
        "recvfrom",
        "recvmsg",
        "sendto",
        "sendmsg",
        "sendfile64",
        "splice",
        "inet_sock_set_state",
        "tcp_retransmit_skb",
        "poll",
        "ppoll",
        "epoll_wait",
        "epoll_pwait",
        "select",
        "pselect6",
    },
    "storage": _SHARED
    | {
        "openat",
        "pread64",
        "preadv",
        "pwrite64",
        "pwritev",
        "fsync",
        "fdatasync",
        "rename",
        "renameat2",
        "ftruncate",
        "unlink",
        "unlinkat",
        "block_rq",
        "flock",
        "fcntl",
    },
    # Request threads waiting for a CPU (and what ran instead), or asleep outside any
    # traced syscall.
    "sched": frozenset({"runq", "offcpu"}),
    # Page faults that put a request thread to sleep, and waits for its mmap_lock.
    "memory": frozenset({"page_fault", "mmap_lock"}),
}
# Node-wide context: the storage kinds, seen for every process of the node when they touch
# the targets' files, /proc entries or disks (a compile-time mode of the same programs).
PROBE_GROUPS["node"] = PROBE_GROUPS["storage"]
#: What a session traces unless told otherwise; `all` adds the node-wide context.
DEFAULT_GROUPS = ("net", "storage", "sched", "memory")

#: Kinds that are always network events (read/write/close depend on the fd).
NET_KINDS = PROBE_GROUPS["net"] - _SHARED


def parse_groups(names: list[str]) -> frozenset[str]:
    """Probe group names as a user gives them: none means the default, ``all`` every one.
    Raises ValueError naming what is unknown."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        return frozenset(DEFAULT_GROUPS)
    if "all" in names:
        return frozenset(PROBE_GROUPS)
    unknown = [n for n in names if n not in PROBE_GROUPS]
    if unknown:
        raise ValueError(
            f"unknown probe group {unknown[0]!r}; known: {', '.join(PROBE_GROUPS)}, all"
        )
    return frozenset(names)
