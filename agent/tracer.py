"""The node agent's tracing loop: targets in, attributed events out."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any

from agent import abi, preflight
from agent.clock import WallClock
from agent.decode import Decoder
from agent.extract import QueryIdExtractor
from agent.fdresolve import FdResolver
from agent.model import Event
from agent.probes import ProbeConfig, Probes
from agent.recorder import History, Intervals, Summary
from agent.sink import EventSink
from agent.targets import TargetResolver, TargetSpec, proc_comm
from qtrace.errors import QtraceError
from qtrace.queryid import query_id_from_bytes

# Flight recorder: a request with no event for this long is over; its summary is read.
SUMMARY_IDLE_NS = 1_000_000_000
HARVEST_INTERVAL_S = 0.5
FETCH_CHUNK = 2000
# Summary fields, named as explain names them (collector/explain.py, collector/store.py).
SUMMARY_FIELDS = {
    "net": "network",
    "storage": "storage",
    "block": "block_io",
    "runq": "runqueue",
    "lock": "lock",
    "pfault": "page_fault",
    "offcpu": "offcpu",
    "offcpu_main": "offcpu_main",
    "waits_others": "waits_others",
}


@dataclass(frozen=True)
class Fetched:
    """What the recent history held of a window (wall clock of this node)."""

    events: list[Event]
    complete: bool
    covered_from_ns: int


class Tracer:
    """Loads the probes, keeps the kernel's target maps current, drains and decodes.

    Use as a context manager: probes are detached on exit however it is left (and by the
    kernel if this process dies, since every attachment is one of its file descriptors)."""

    def __init__(
        self,
        spec: TargetSpec,
        sink: EventSink,
        extractor: QueryIdExtractor | None = None,
        probe_config: ProbeConfig | None = None,
        drain_interval: float = 0.01,
        rescan_interval: float = 1.0,
        strict: bool = True,
        capture: tuple[bool, bool] = (False, False),
    ) -> None:
        """``strict``: targets that do not exist are an error (a command line); otherwise
        they are waited for (a session, whose targets may live on other nodes)."""
        self.strict = strict
        self.capture = capture
        self.spec = spec
        self.sink = sink
        self.extractor = extractor or QueryIdExtractor.header()
        self.probe_config = probe_config or ProbeConfig()
        groups = self.probe_config.groups
        # Groups of events kept: "other" (pipes and the like, seen once before the kernel
        # learns to skip them) belongs to no probe group and is kept whatever the session
        # asked for; locks come with storage, and the node group brings both.
        self._keep = groups | {"other"} | ({"lock"} if "storage" in groups else set())
        if "node" in groups:
            self._keep |= {"storage", "lock"}
        if self.probe_config.history_slots and self.extractor.header_name:
            self.probe_config = replace(self.probe_config, qid_header=self.extractor.header_name)
        self.drain_interval = drain_interval
        self.rescan_interval = rescan_interval
        self.stop_event = threading.Event()
        # poll() and target changes may come from different threads (the API's add_pid).
        self._lock = threading.RLock()
        self._target_added = threading.Condition(self._lock)
        self._probes: Probes | None = None
        self._targets: set[int] = set()
        self._cgroups: set[int] = set()
        self._ports: set[int] = set()
        self._last_scan = 0.0
        self._final_counters: dict[str, dict[str, int]] | None = None
        self.events_out = 0
        # Flight recorder: the events that left the kernel (request starts, opens,
        # connections), kept as long as the history may be asked about them.
        self.recorder = self.probe_config.history_slots > 0
        self._history: History | None = None
        self._recent: deque[Event] = deque()
        self._last_harvest = 0.0
        self.summaries_out = 0
        self.fetched_out = 0
        self.fetched_kinds: Counter[str] = Counter()
        self._sent = Intervals()
        self._comms: dict[int, str] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Tracer:
        preflight.check()
        if self.strict:
            self.spec.validate()
        self._resolver_targets = TargetResolver(self.spec, strict=self.strict)
        try:
            self._probes = Probes(self.probe_config)
        except Exception as e:  # BCC reports compile/load failures as bare Exceptions
            raise QtraceError(
                f"the kernel refused qtrace's BPF programs ({e})",
                "check `dmesg`, kernel headers (`make setup`) and that BPF is enabled",
            ) from e
        probes = self._probes
        self._fds = FdResolver(teach=probes.set_fd_type)
        decoder = self._decoder = Decoder(
            self.extractor,
            self._fds,
            WallClock(),
            self.capture,
            capture_limit=self.probe_config.capture_bytes,
        )
        # A cgroup id of -1 (a pid named in a /proc path): the kernel knows which
        # processes it saw in a traced cgroup.
        decoder.is_target = lambda tgid, cgroup_id: (
            tgid in self._targets
            or cgroup_id in self._cgroups
            or (cgroup_id == -1 and probes.in_traced_cgroup(tgid))
        )
        if self.spec.comms or self.spec.cmdlines:
            probes.watch_exec(True)
        if self.capture[0]:
            probes.capture_requests(True)
        probes.limit_rate(self.probe_config.max_event_rate)
        if "flock" in self.probe_config.kinds():
            probes.lock_context(True)
        if "node" in self.probe_config.groups:
            decoder.node_context = True
            decoder.watch_file = self._watch_file
            decoder.unwatch_fd = probes.unwatch_fd
        if self.recorder:
            self._history = probes.open_history()
            self._fds.keep_past = True
            decoder.starts = {}
        self.rescan()
        return self

    def __enter__(self) -> Tracer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach, drain what is left, then free the kernel side."""
        if self._probes is None:
            return
        probes = self._probes
        try:
            probes.detach()
            self.poll()
            if self.recorder:
                self._harvest(idle_ns=0)  # every request left is over: nothing more comes
            self._final_counters = probes.counters()
        finally:
            if self._history is not None:
                self._history.close()
                self._history = None
            probes.close()
            self._fds.close()
            self.sink.close()
            self._probes = None

    def _watch_file(self, path: str) -> None:
        assert self._probes is not None
        try:
            st_dev = os.stat(path).st_dev
        except OSError:
            return  # gone already: nobody can touch it any more
        self._probes.watch_file(path, st_dev)

    # -- targets ---------------------------------------------------------------------------

    def add_pid(self, pid: int) -> None:
        """Trace one more process from now on (no restart)."""
        if not os.path.exists(f"/proc/{pid}"):
            raise QtraceError(f"no process with pid {pid}", f"check it is running (ps -p {pid})")
        self._add_tgid(pid)

    def _add_tgid(self, pid: int) -> None:
        assert self._probes is not None
        with self._lock:
            if pid == os.getpid() or pid in self._targets:
                return  # never trace ourselves: every drain would produce more events
            self._probes.add_tgid(pid)
            self._targets.add(pid)
            if self.recorder:
                self._teach_fds(pid)
            for port in self._fds.listen_ports(pid) - self._ports:
                self._probes.add_port(port)
                self._ports.add(port)
            self._target_added.notify_all()

    def _teach_fds(self, pid: int) -> None:
        """Tell the kernel what the fds a process had before tracing are: in full capture
        it learns as their events come by, but a recorder's events do not come by, and
        its summaries need to know a file from a socket."""
        try:
            fds = [int(name) for name in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            return
        for fd in fds:
            self._fds.lookup(pid, fd, abi.FD_UNKNOWN)

    def wait_for_target(self, pid: int, timeout: float) -> bool:
        """Block until pid is traced (found by name or cgroup on a later scan, say)."""
        with self._lock:
            return self._target_added.wait_for(lambda: pid in self._targets, timeout)

    def rescan(self) -> None:
        with self._lock:
            self._rescan()

    def _rescan(self) -> None:
        assert self._probes is not None
        self._last_scan = time.monotonic()
        live = self._resolver_targets.tgids()
        for pid in live:
            self._add_tgid(pid)
        for pid in self._targets - live:
            if not os.path.exists(f"/proc/{pid}"):
                self._probes.remove_tgid(pid)
                self._fds.forget_process(pid)
                self._targets.discard(pid)
        cgroups = self._resolver_targets.cgroup_ids()
        for cg in cgroups - self._cgroups:
            self._probes.add_cgroup(cg)
        for cg in self._cgroups - cgroups:
            self._probes.remove_cgroup(cg)
        self._cgroups = cgroups

    # -- the loop --------------------------------------------------------------------------

    def poll(self) -> int:
        """One drain cycle; returns how many events went to the sink."""
        with self._lock:
            return self._poll()

    def _poll(self) -> int:
        assert self._probes is not None
        records, control = self._probes.drain()
        for rec in control:
            pid, comm = self._decoder.decode_exec(rec)
            if self._resolver_targets.matches_process(pid, comm or proc_comm(pid) or ""):
                self._add_tgid(pid)
        self._fds.new_cycle()
        keep = self._keep
        events = [
            e for e in map(self._decoder.decode, records) if e is not None and e.group in keep
        ]
        if self.recorder:
            # Nothing ships per event: what left the kernel waits here with the history.
            self._recent.extend(events)
            if time.monotonic() - self._last_harvest >= HARVEST_INTERVAL_S:
                return self._harvest(SUMMARY_IDLE_NS)
            return 0
        self.sink.write(events)
        self.events_out += len(events)
        return len(events)

    # -- flight recorder -------------------------------------------------------------------

    def _harvest(self, idle_ns: int) -> int:
        assert self._probes is not None and self._history is not None
        self._last_harvest = time.monotonic()
        summaries = [self._summary_event(s) for s in self._probes.harvest(idle_ns)]
        self.sink.write(summaries)
        self.summaries_out += len(summaries)
        # What the history cannot be asked about any more need not be kept either.
        covered_from, _ = self._history.coverage()
        while self._recent and self._recent[0].mono_ns + self._recent[0].dur_ns < covered_from:
            self._recent.popleft()
        self._fds.trim(covered_from)
        self._sent.forget_before(covered_from)
        return len(summaries)

    def _summary_event(self, s: Summary) -> Event:
        starts = self._decoder.starts
        start = starts.pop(s.req_key, None) if starts is not None else None
        requests = self._decoder.requests
        if s.qid is not None:
            # Found by the kernel: the request's bytes never came here. Known from now
            # on, for its events read back from the history.
            requests.set(s.req_key, query_id_from_bytes(s.qid))
        comm = start.comm if start else self._comm(s.tgid)
        target = start.target if start else self._fds.known(s.tgid, s.fd)
        detail: dict[str, Any] = {SUMMARY_FIELDS[k]: v for k, v in s.ns.items()}
        detail["events"] = s.events
        return Event(
            ts_ns=self._decoder.clock.to_wall(s.start_ns),
            dur_ns=max(0, s.end_ns - s.start_ns),
            kind="request",
            pid=s.tgid,
            tid=s.tid,
            comm=comm,
            fd=s.fd,
            target=target,
            ret=0,
            query_id=self._decoder.requests.get(s.req_key),
            request_key=s.req_key,
            inferred=False,
            group="summary",
            cgroup_id=start.cgroup_id if start else 0,
            mono_ns=s.start_ns,
            detail=detail,
        )

    def _comm(self, tgid: int) -> str:
        comm = self._comms.get(tgid)
        if comm is None:
            comm = self._comms[tgid] = proc_comm(tgid) or ""
        return comm

    def history_status(self) -> tuple[int, int, int] | None:
        """(bytes, covered_from wall ns, slots written so far), recorder sessions only."""
        with self._lock:
            if self._history is None:
                return None
            covered, written = self._history.coverage()
            size = self._history.slots * self._history.cpus * abi.HSLOT_SIZE
            return size, self._decoder.clock.to_wall(covered), written

    def fetch(self, from_ns: int, to_ns: int) -> Fetched:
        """Everything the recent history holds of [from_ns, to_ns] (this node's wall
        clock), decoded as it would have been live."""
        with self._lock:
            history = self._history
            if history is None:
                raise QtraceError("this session does not record a recent history")
            clock = self._decoder.clock
            lo, hi = from_ns - clock.offset_ns, to_ns - clock.offset_ns
            self._poll()  # what left the kernel up to now, so the window is whole
            sent = self._sent.copy()
        # Read without the lock: draining and harvesting go on meanwhile.
        window = history.window(lo, hi, sent)
        events: list[Event] = []
        records = window.records
        # Decoded a chunk at a time: between chunks the main loop drains the ring buffer
        # (a long window must not make it overflow).
        for at in range(0, len(records), FETCH_CHUNK):
            with self._lock:
                past = self._decoder.decode_past(records[at : at + FETCH_CHUNK], self.fetched_kinds)
            events += [e for e in past if e.group in self._keep]
        with self._lock:
            sent = self._sent
            events += [
                e
                for e in self._recent
                if e.mono_ns <= hi
                and e.mono_ns + e.dur_ns >= lo
                and not sent.holds(e.mono_ns, e.mono_ns + e.dur_ns)
            ]
            requests = self._decoder.requests
            for e in events:
                # Decoded live before the kernel's summary told us the request's id.
                if e.query_id is None and e.request_key:
                    e.query_id = requests.get(e.request_key)
            if window.complete:
                sent.add(lo, hi)
            events.sort(key=lambda e: e.mono_ns)
            self.fetched_out += len(events)
            return Fetched(events, window.complete, clock.to_wall(window.covered_from_ns))

    def run(self, duration: float | None = None) -> None:
        deadline = None if duration is None else time.monotonic() + duration
        while not self.stop_event.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            self.poll()
            if now - self._last_scan >= self.rescan_interval:
                self.rescan()
                self._decoder.clock.maybe_refresh()
            # A recorder's ring buffer carries about one event per request: draining it
            # ten times less often costs nothing and saves the wakeups.
            timeout = self.drain_interval * (10 if self.recorder else 1)
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            self.stop_event.wait(timeout)

    # -- accounting ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        counters = self._final_counters
        if counters is None:
            counters = self._probes.counters() if self._probes else {}
        received: Counter[str] = self._decoder.received
        kinds: dict[str, dict[str, int]] = {}
        for kind in sorted(set(counters) | set(received)):
            row = dict.fromkeys(abi.COUNTERS, 0) | counters.get(kind, {})
            row["received"] = received.get(kind, 0)
            kinds[kind] = row
        lost = sum(r["lost_ringbuf"] + r["lost_mapfull"] for r in kinds.values())
        return {
            "produced": sum(r["produced"] for r in kinds.values()),
            "received": sum(received.values()),
            "lost": lost,
            "shed": sum(r["shed"] for r in kinds.values()),
            "written": self.events_out,
            "summaries": self.summaries_out,
            "fetched": self.fetched_out,
            "recorded": sum(r.get("recorded", 0) for r in kinds.values()),
            "kinds": kinds,
            "targets": sorted(self._targets),
        }
