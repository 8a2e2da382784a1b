"""`qtrace agent run`: watch the collector's sessions, trace them locally, ship events.

Each active session gets its own Tracer (its own probes, targets and extractor). Sessions
expire on a local deadline computed when they were received, so tracing stops on time
even when the collector is unreachable."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agent.extract import QueryIdExtractor
from agent.k8s import ContainerRef, PodTargets, PodWatcher
from agent.labels import SelectorError
from agent.model import Event
from agent.probes import ProbeConfig, history_slots
from agent.shipper import KEEPALIVE_OPTIONS, Shipper
from agent.spool import Spool, SpoolError
from agent.targets import TargetSpec, cgroup2_root
from agent.tracer import Tracer
from qtrace.api.v1 import events_pb2, services_pb2_grpc, sessions_pb2
from qtrace.channel import Credentials, describe, open_channel
from qtrace.errors import QtraceError
from qtrace.redact import Redactor

log = logging.getLogger("qtrace.agent")


class SessionSink:
    def __init__(
        self,
        session_id: str,
        shipper: Shipper,
        redactor: Redactor | None = None,
        containers: Callable[[], dict[int, ContainerRef]] | None = None,
    ) -> None:
        self.session_id = session_id
        self._shipper = shipper
        self._redactor = redactor or None
        self._containers = containers

    def write(self, events: Sequence[Event]) -> None:
        if self._containers is not None and events:
            by_cgroup = self._containers()
            for e in events:
                if c := by_cgroup.get(e.cgroup_id):
                    e.namespace, e.pod, e.container = c.namespace, c.pod, c.container
        if self._redactor is not None:
            # The last stop on the node: captured bytes are masked before they are queued.
            for e in events:
                if e.request:
                    e.request = self._redactor.request(e.request)
        self._shipper.add(self.session_id, events)

    def close(self) -> None:
        self._shipper.flush(self.session_id)


@dataclass
class Running:
    session: sessions_pb2.Session
    tracer: Tracer
    deadline: float  # time.monotonic()
    pods: PodTargets = field(default_factory=PodTargets)
    said: str = ""  # what the collector was last told keeps the session from tracing here


def pod_targets(s: sessions_pb2.Session) -> PodTargets:
    t = s.targets
    try:
        return PodTargets.of(t.namespaces, t.label_selector, t.pods)
    except SelectorError as e:
        raise QtraceError(str(e)) from None


def spec_for(
    s: sessions_pb2.Session, scope: str | None, pod_cgroups: Callable[[], set[int]] | None = None
) -> TargetSpec:
    t = s.targets
    return TargetSpec(
        pids=list(t.pids),
        comms=list(t.comms),
        cgroups=list(t.cgroups),
        cmdlines=list(t.cmdline_regexes),
        scope=scope,
        pod_cgroups=pod_cgroups,
    )


def probe_config_for(s: sessions_pb2.Session, ring_pages: int) -> ProbeConfig:
    groups = frozenset(s.probes) or ProbeConfig().groups
    cap = (s.capture.max_bytes or 1024) if s.capture.requests else ProbeConfig().capture_bytes
    return ProbeConfig(
        ring_pages=ring_pages,
        capture_bytes=cap,
        groups=groups,
        max_event_rate=s.max_event_rate,
        history_slots=history_slots(s.history_bytes)
        if s.detail == sessions_pb2.DETAIL_MODE_RECORDER
        else 0,
    )


def extractor_for(s: sessions_pb2.Session) -> QueryIdExtractor:
    ex = s.extractor
    if ex.WhichOneof("how") == "regex":
        return QueryIdExtractor.regex(ex.regex)
    return QueryIdExtractor.header(ex.header or "X-Query-Id")


class AgentRuntime:
    def __init__(
        self,
        collector: str,
        node: str,
        scope: str | None = None,
        drain_interval: float = 0.01,
        ring_pages: int = ProbeConfig().ring_pages,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 1 << 30,
        max_memory: int = 512 << 20,
        credentials: Credentials | None = None,
        kubeconfig: str | None = None,
    ) -> None:
        self.ring_pages = ring_pages
        self.kubeconfig = kubeconfig
        self.pod_watcher: PodWatcher | None = None  # started by the first pod session
        self.heartbeat = time.monotonic()  # the main loop's last turn (health endpoint)
        self.connected = threading.Event()  # the session watch reached the collector once
        self.collector = collector
        self.node = node
        self.scope = scope
        self.agent_id = f"{node}-{uuid.uuid4().hex[:8]}"
        self.drain_interval = drain_interval
        self.stop_event = threading.Event()
        # Fetches are served on their own thread: the stream that brought them keeps
        # reading acks meanwhile.
        self._fetches: queue.Queue[events_pb2.FetchRequest] = queue.Queue()
        self.credentials = credentials or Credentials()
        self._channel = open_channel(collector, self.credentials, options=KEEPALIVE_OPTIONS)
        self.shipper = Shipper(
            self._channel,
            self.agent_id,
            node,
            self._drops,
            spool=open_spool(spool_dir, spool_max_bytes),
            # The queue in memory gets a sixteenth of the cap; past it, batches go to disk.
            spill_bytes=max(1 << 20, max_memory // 16),
            memory_cap=max_memory,
        )
        self.shipper.on_fetch = self._fetches.put
        self.shipper.history = self._history
        self.running: dict[str, Running] = {}
        self._rates: dict[str, tuple[float, int, int]] = {}  # sid -> (when, written, rate)
        self._histories: dict[str, events_pb2.HistoryStatus] = {}
        self._ended: set[str] = set()  # expired or stopped here: never restarted
        self._desired: dict[str, tuple[sessions_pb2.Session, float]] | None = None
        self._lock = threading.Lock()
        self._last_scan = 0.0

    # -- loss accounting shipped with every batch ----------------------------------------

    def _drops(self, session_id: str) -> list[events_pb2.DropCounter]:
        run = self.running.get(session_id)
        rows: list[events_pb2.DropCounter] = []
        kinds = run.tracer.stats()["kinds"] if run else {}
        for kind, r in kinds.items():
            rows.append(
                events_pb2.DropCounter(
                    kind=kind,
                    produced=r["produced"],
                    received=r["received"],
                    lost_ringbuf=r["lost_ringbuf"],
                    lost_mapfull=r["lost_mapfull"],
                    filtered=r["filtered"],
                    shed=r["shed"],
                    recorded=r.get("recorded", 0),
                )
            )
        lost = self.shipper.lost.get(session_id, 0)
        lost_spool = self.shipper.lost_spool.get(session_id, 0)
        if lost or lost_spool:
            rows.append(events_pb2.DropCounter(kind="*", lost_agent=lost, lost_spool=lost_spool))
        return rows

    # -- flight recorder -------------------------------------------------------------------

    def _history(self, session_id: str) -> events_pb2.HistoryStatus | None:
        # Called by the shipper under its lock: only what the main loop measured, never
        # the tracer's lock (a fetch holds that one while it hands events to the shipper).
        return self._histories.get(session_id)

    def _measure_histories(self) -> None:
        now = time.monotonic()
        for sid, run in list(self.running.items()):
            status = run.tracer.history_status()
            if status is None:
                continue
            size, covered_from, written = status
            when, before, rate = self._rates.get(sid, (now, written, 0))
            if now - when >= 1.0:
                rate = int((written - before) / (now - when))
                when, before = now, written
            self._rates[sid] = (when, before, rate)
            self._histories[sid] = events_pb2.HistoryStatus(
                bytes=size, covered_from_ns=covered_from, events_per_s=rate
            )

    def _serve_fetches(self) -> None:
        while not self.stop_event.is_set():
            try:
                f = self._fetches.get(timeout=0.5)
            except queue.Empty:
                continue
            result = events_pb2.FetchResult(fetch_id=f.fetch_id)
            run = self.running.get(f.session_id)
            try:
                if run is None:
                    raise QtraceError(f"session {f.session_id} is not running on {self.node}")
                got = run.tracer.fetch(f.from_ns, f.to_ns)
            except QtraceError as e:
                result.error = str(e)
            except (ValueError, BufferError) as e:  # the session ended under the fetch
                result.error = f"session {f.session_id} ended on {self.node} during the fetch ({e})"
            else:
                run.tracer.sink.write(got.events)
                result.complete = got.complete
                result.covered_from_ns = got.covered_from_ns
                result.events = len(got.events)
                log.info(
                    "fetch %s (query %s): %d events%s", f.fetch_id, f.query_id,
                    len(got.events), "" if got.complete else ", window partly overwritten",
                )  # fmt: skip
            self.shipper.answer(f.session_id, result)

    # -- sessions from the collector -----------------------------------------------------

    def _watch(self) -> None:
        stub = services_pb2_grpc.AgentServiceStub(self._channel)
        backoff = 0.05
        said = ""
        req = sessions_pb2.WatchSessionsRequest(agent_id=self.agent_id, node=self.node)
        while not self.stop_event.is_set():
            try:
                for update in stub.WatchSessions(req):
                    backoff, said = 0.05, ""
                    self.connected.set()
                    now = time.monotonic()
                    desired = {
                        s.id: (s, now + max(0.0, (s.expires_ns - update.collector_ns) / 1e9))
                        for s in update.sessions
                    }
                    with self._lock:
                        self._desired = desired
                    if self.stop_event.is_set():
                        return
            except grpc.RpcError as e:
                if self.stop_event.is_set():
                    return  # the channel closed under us at shutdown: nothing to report
                # Once per distinct problem: a refused certificate would otherwise fill the log.
                problem = str(describe(e, self.collector, self.credentials))
                if problem != said:
                    log.warning("%s; retrying", problem)
                    said = problem
            # While the collector is away, the sessions we have keep running until their
            # own deadlines.
            self.stop_event.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _apply(self) -> None:
        with self._lock:
            desired, self._desired = self._desired, None
        now = time.monotonic()
        for sid, run in list(self.running.items()):
            if now >= run.deadline:
                log.info("session %s expired", sid)
                self._end(sid)
            elif desired is not None and sid not in desired:
                log.info("session %s ended by the collector", sid)
                self._end(sid)
        if desired is None:
            return
        for sid, (s, deadline) in desired.items():
            if sid in self.running or sid in self._ended or now >= deadline:
                continue
            try:
                pods = pod_targets(s)
                watcher = self._watch_pods() if pods else self.pod_watcher
                pod_cgroups = None
                if pods and watcher is not None:
                    root = cgroup2_root()
                    pod_cgroups = lambda w=watcher, p=pods, r=root: w.cgroups_of(p, r)  # noqa: E731
                tracer = Tracer(
                    spec_for(s, self.scope, pod_cgroups),
                    SessionSink(
                        sid,
                        self.shipper,
                        Redactor.from_pb(s.capture.redact),
                        self._containers if watcher is not None else None,
                    ),
                    extractor_for(s),
                    probe_config_for(s, self.ring_pages),
                    strict=False,
                    capture=(s.capture.requests, s.capture.requests and s.capture.bodies),
                ).start()
            except QtraceError as e:
                # Said to the collector too: `session status` shows it, nothing is silent.
                log.error("session %s cannot run here: %s", sid, e)
                self._ended.add(sid)
                self.shipper.mark(sid, final=True, error=str(e))
                continue
            self.running[sid] = Running(s, tracer, deadline, pods)
            self.shipper.mark(sid, final=False)
            log.info("session %s tracing %s", sid, tracer.stats()["targets"])

    # -- Kubernetes ----------------------------------------------------------------------

    def _watch_pods(self) -> PodWatcher:
        if self.pod_watcher is None:
            self.pod_watcher = PodWatcher(self.node, self.kubeconfig).start()
            # The first list decides whether the first rescan finds the session's pods.
            self.pod_watcher.synced.wait(5.0)
        return self.pod_watcher

    def _containers(self) -> dict[int, ContainerRef]:
        assert self.pod_watcher is not None
        return self.pod_watcher.containers(cgroup2_root())

    def _report_pods(self) -> None:
        """Says in the session's status why it traces nothing here (no pod matches, no
        such namespace, RBAC), and when that stops being so."""
        if self.pod_watcher is None:
            return
        for sid, run in self.running.items():
            if not run.pods:
                continue
            problem = self.pod_watcher.problem_with(run.pods, cgroup2_root())
            if problem != run.said:
                if problem:
                    log.warning("session %s: %s", sid, problem)
                run.said = problem
                self.shipper.mark(sid, final=False, error=problem)

    def _end(self, sid: str) -> None:
        run = self.running[sid]
        self._ended.add(sid)
        try:
            run.tracer.close()  # detaches, then drains the rest into the shipper
        finally:
            # The last batch still carries the final counters, and says it is the last.
            self.shipper.mark(sid, final=True)
            del self.running[sid]

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> None:
        self.shipper.start()
        watcher = threading.Thread(target=self._watch, name="qtrace-watch", daemon=True)
        watcher.start()
        threading.Thread(target=self._serve_fetches, name="qtrace-fetch", daemon=True).start()
        try:
            while not self.stop_event.is_set():
                self._apply()
                now = time.monotonic()
                rescan = now - self._last_scan >= 1.0
                for run in list(self.running.values()):
                    run.tracer.poll()
                    if rescan:
                        run.tracer.rescan()
                if rescan:
                    self._last_scan = now
                    self._report_pods()
                    self._measure_histories()
                self.heartbeat = now
                self.shipper.flush()
                recording = self.running and all(r.tracer.recorder for r in self.running.values())
                self.stop_event.wait(self.drain_interval * (10 if recording else 1))
        finally:
            for sid in list(self.running):
                self._end(sid)
            if not self.shipper.close(timeout=10.0):
                where = "left in the spool for the next start" if self.shipper.spool else "lost"
                log.warning("%d events not shipped at exit: %s", self.shipper.pending(), where)
            self._channel.close()
            if self.pod_watcher is not None:
                self.pod_watcher.close()


def open_spool(directory: Path | None, max_bytes: int) -> Spool | None:
    if directory is None:
        return None
    try:
        return Spool(directory, max_bytes)
    except SpoolError as e:
        raise QtraceError(
            str(e), "pass --spool-dir a writable directory only this agent uses"
        ) from None


def default_node() -> str:
    return os.environ.get("NODE_NAME") or os.uname().nodename
