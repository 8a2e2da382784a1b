"""What to trace outside Kubernetes: pids, process names, cgroup v2 paths."""

from __future__ import annotations

import os
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

    def __post_init__(self) -> None:
        if not (self.pids or self.comms or self.cgroups):
            raise QtraceError("nothing to trace", "give at least one --pid, --comm or --cgroup")
        self.comms = [c[:COMM_LEN] for c in self.comms]

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

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self._comms = set(spec.comms)
        self._cgroup_dirs = [spec.cgroup_dir(p) for p in spec.cgroups]

    def matches_comm(self, comm: str) -> bool:
        return comm[:COMM_LEN] in self._comms

    def tgids(self) -> set[int]:
        found = {p for p in self.spec.pids if psutil.pid_exists(p)}
        if self._comms:
            for pid in psutil.pids():
                comm = proc_comm(pid)
                if comm is not None and comm in self._comms:
                    found.add(pid)
        return found

    def cgroup_ids(self) -> set[int]:
        ids: set[int] = set()
        for top in self._cgroup_dirs:
            for dirpath, _dirs, _files in os.walk(top):
                try:
                    ids.add(os.stat(dirpath).st_ino)
                except OSError:
                    continue
        return ids
