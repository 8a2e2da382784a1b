"""`qtrace agent run`: watch the collector's sessions, trace them locally, ship events.

Each active session gets its own Tracer (its own probes, targets and extractor). Sessions
expire on a local deadline computed when they were received, so tracing stops on time
even when the collector is unreachable."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent.extract import QueryIdExtractor
from agent.model import Event
from agent.probes import ProbeConfig
from agent.shipper import KEEPALIVE_OPTIONS, Shipper
from agent.spool import Spool, SpoolError
from agent.targets import TargetSpec
from agent.tracer import Tracer
from qtrace.api.v1 import events_pb2, services_pb2_grpc, sessions_pb2
from qtrace.channel import Credentials, describe, open_channel
from qtrace.errors import QtraceError
from qtrace.redact import Redactor

log = logging.getLogger("qtrace.agent")


class SessionSink:
    def __init__(self, session_id: str, shipper: Shipper, redactor: Redactor | None = None) -> None:
        self.session_id = session_id
        self._shipper = shipper
        self._redactor = redactor or None

    def write(self, events: Sequence[Event]) -> None:
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


def spec_for(s: sessions_pb2.Session, scope: str | None) -> TargetSpec:
    t = s.targets
    return TargetSpec(
        pids=list(t.pids),
        comms=list(t.comms),
        cgroups=list(t.cgroups),
        cmdlines=list(t.cmdline_regexes),
        scope=scope,
    )


def probe_config_for(s: sessions_pb2.Session, ring_pages: int) -> ProbeConfig:
    groups = frozenset(s.probes) or ProbeConfig().groups
    cap = (s.capture.max_bytes or 1024) if s.capture.requests else ProbeConfig().capture_bytes
    return ProbeConfig(
        ring_pages=ring_pages,
        capture_bytes=cap,
        groups=groups,
        max_event_rate=s.max_event_rate,
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
    ) -> None:
        self.ring_pages = ring_pages
        self.collector = collector
        self.node = node
        self.scope = scope
        self.agent_id = f"{node}-{uuid.uuid4().hex[:8]}"
        self.drain_interval = drain_interval
        self.stop_event = threading.Event()
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
        self.running: dict[str, Running] = {}
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
                )
            )
        lost = self.shipper.lost.get(session_id, 0)
        lost_spool = self.shipper.lost_spool.get(session_id, 0)
        if lost or lost_spool:
            rows.append(events_pb2.DropCounter(kind="*", lost_agent=lost, lost_spool=lost_spool))
        return rows

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
                tracer = Tracer(
                    spec_for(s, self.scope),
                    SessionSink(sid, self.shipper, Redactor.from_pb(s.capture.redact)),
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
            self.running[sid] = Running(s, tracer, deadline)
            self.shipper.mark(sid, final=False)
            log.info("session %s tracing %s", sid, tracer.stats()["targets"])

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
                self.shipper.flush()
                self.stop_event.wait(self.drain_interval)
        finally:
            for sid in list(self.running):
                self._end(sid)
            if not self.shipper.close(timeout=10.0):
                where = "left in the spool for the next start" if self.shipper.spool else "lost"
                log.warning("%d events not shipped at exit: %s", self.shipper.pending(), where)
            self._channel.close()


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
