"""What to trace outside Kubernetes: pids, process names, cgroup v2 paths."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from qtrace.errors import QtraceError

COMM_LEN = 15  # the kernel keeps 15 bytes of a task name


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted (its ids are what BPF sees)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[sep + 1] == "cgroup2":
                return Path(parts[4])
    raise QtraceError("no cgroup v2 hierarchy is mounted", "mount -t cgroup2 none /sys/fs/cgroup")


def proc_comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


@dataclass
class TargetSpec:
    pids: list[int] = field(default_factory=list)
    comms: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    cmdlines: list[str] = field(default_factory=list)  # regexes over /proc/PID/cmdline
    # Only processes inside this cgroup v2 subtree are this agent's (several agents on one
    # machine stand in for several nodes that way).
    scope: str | None = None
    # Kubernetes: the cgroup ids of the session's pods on this node, asked on every rescan
    # (pods come and go; see agent/k8s.py).
    pod_cgroups: Callable[[], set[int]] | None = None

    def __post_init__(self) -> None:
        if not (self.pids or self.comms or self.cgroups or self.cmdlines or self.pod_cgroups):
            raise QtraceError(
                "nothing to trace", "give at least one --pid, --comm, --cmdline or --cgroup"
            )
        self.comms = [c[:COMM_LEN] for c in self.comms]
        for rx in self.cmdlines:
            try:
                re.compile(rx)
            except re.error as e:
                raise QtraceError(f"invalid --cmdline regex {rx!r} ({e})") from e

    def validate(self) -> None:
        """Fail on targets that cannot exist, before anything is loaded into the kernel."""
        for pid in self.pids:
            if pid <= 0 or not psutil.pid_exists(pid):
                raise QtraceError(
                    f"no process with pid {pid}", f"check it is running (ps -p {pid})"
                )
        for path in self.cgroups:
            self.cgroup_dir(path)

    @staticmethod
    def cgroup_dir(path: str) -> Path:
        root = cgroup2_root()
        p = Path(path)
        candidates = [p] if p.is_absolute() else [root / p]
        if p.is_absolute() and not str(p).startswith(str(root)):
            candidates.append(root / str(p).lstrip("/"))
        for c in candidates:
            if (c / "cgroup.procs").exists():
                return c
        raise QtraceError(
            f"no cgroup v2 directory {path!r}",
            f"give a path under {root} (or relative to it), e.g. from /proc/PID/cgroup",
        )


class TargetResolver:
    """Turns a spec into kernel targets, now and as processes and cgroups come and go."""

    def __init__(self, spec: TargetSpec, strict: bool = True) -> None:
        self.spec = spec
        self._comms = set(spec.comms)
        self._cmdlines = [re.compile(rx) for rx in spec.cmdlines]
        self._scope = spec.cgroup_dir(spec.scope) if spec.scope else None
        self._scope_rel = "/" + str(self._scope.relative_to(cgroup2_root())) if self._scope else ""
        # A session names cgroups cluster-wide; on one node some of them do not exist.
        self._cgroup_dirs = []
        for p in spec.cgroups:
            try:
                self._cgroup_dirs.append(spec.cgroup_dir(p))
            except QtraceError:
                if strict:
                    raise

    def matches_process(self, pid: int, comm: str) -> bool:
        if not self.in_scope(pid):
            return False
        if comm[:COMM_LEN] in self._comms:
            return True
        return bool(self._cmdlines) and self._cmdline_match(pid)

    def _cmdline_match(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            return False
        return any(rx.search(cmd) for rx in self._cmdlines)

    def in_scope(self, pid: int) -> bool:
        if self._scope is None:
            return True
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                for line in f:
                    if line.startswith("0::"):
                        path = line[3:].strip()
                        return path == self._scope_rel or path.startswith(self._scope_rel + "/")
        except OSError:
            pass
        return False

    def tgids(self) -> set[int]:
        found = {p for p in self.spec.pids if psutil.pid_exists(p) and self.in_scope(p)}
        if self._comms or self._cmdlines:
            for pid in psutil.pids():
                comm = proc_comm(pid)
                if comm is not None and self.matches_process(pid, comm):
                    found.add(pid)
        return found

    def cgroup_ids(self) -> set[int]:
        ids: set[int] = set()
        for wanted in self._cgroup_dirs:
            top = wanted
            if self._scope is not None and not (
                top == self._scope or self._scope in top.parents or top in self._scope.parents
            ):
                continue
            if self._scope is not None and top in self._scope.parents:
                top = self._scope  # only the part of a wider cgroup that is this node's
            for dirpath, _dirs, _files in os.walk(top):
                try:
                    ids.add(os.stat(dirpath).st_ino)
                except OSError:
                    continue
        if self.spec.pod_cgroups is not None:
            ids |= self.spec.pod_cgroups()
        return ids
