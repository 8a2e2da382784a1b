"""The agent's event: what `qtrace agent trace` writes and what later ships over gRPC."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(slots=True)
class Event:
    ts_ns: int  # wall-clock start (ns since the epoch)
    dur_ns: int
    kind: str
    pid: int
    tid: int
    comm: str
    fd: int
    target: str | None  # file path, "ip:port->ip:port", or a device
    ret: int
    query_id: str | None
    request_key: int  # kernel-assigned request key, 0 = none
    inferred: bool  # attributed through a thread the request thread created
    group: str  # "net", "storage", "sched" or "other" (pipes, eventfds, ttys)
    cgroup_id: int
    mono_ns: int  # the kernel's CLOCK_MONOTONIC start, for ordering within a node
    detail: dict[str, Any] | None = None
    # First bytes of the request this read started; only in sessions that capture.
    request: bytes | None = None
    # The Kubernetes container whose cgroup the event came from (None outside pods).
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELD_NAMES}


#: The JSON form leaves out captured request bytes (they are not text, and stay private).
FIELD_NAMES = tuple(f.name for f in fields(Event) if f.name != "request")
