"""The collector's gRPC services: agents ship and watch, engineers control and read."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from collector.audit import AuditLog, default_path
from collector.auth import Access, AuthInterceptor, Security
from collector.clocks import Aligner
from collector.explain import NotFound, explain
from collector.fetch import DEFAULT_WAIT_S, Fetcher
from collector.outliers import DEFAULT_FACTOR, DEFAULT_MIN_EXCESS_NS, detect
from collector.sessions import SessionError, SessionRegistry, UnknownSession
from collector.store import Store
from qtrace.api.v1 import (
    anomalies_pb2,
    events_pb2,
    services_pb2,
    services_pb2_grpc,
    sessions_pb2,
)
from qtrace.queryid import PROBLEM as QUERY_ID_PROBLEM
from qtrace.queryid import is_valid_query_id

log = logging.getLogger("qtrace.collector")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_BATCH_EVENTS = 50_000
MAX_FIELD_BYTES = 64 * 1024
DEFAULT_QUERY_LIMIT = 100_000
INT64_MAX = 2**63 - 1
# An agent disconnected this long is dropped from `status` (its sessions' rows stay).
FORGET_AGENTS_NS = 3600 * 10**9


@dataclass
class AgentState:
    agent_id: str
    node: str
    connected: bool = True
    connected_ns: int = field(default_factory=time.time_ns)
    disconnected_ns: int = 0
    last_batch_ns: int = 0
    clock_offset_ns: int = 0
    clock_uncertainty_ns: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    # What goes down its Ingest stream besides acks (fetches); None while it is away.
    outbox: queue.Queue[Any] | None = None


class BadBatch(ValueError):
    pass


def validate_batch(b: events_pb2.EventBatch) -> None:
    """Cheap structural checks; anything failing them is the sender's bug, not data."""
    where = f"batch seq={b.seq} from agent {b.agent_id!r}"
    if not b.agent_id:
        raise BadBatch(f"{where}: agent_id is empty")
    if b.seq == 0:
        raise BadBatch(f"{where}: seq must start at 1")
    if not b.session_id:
        raise BadBatch(f"{where}: session_id is empty")
    for i, e in enumerate(b.events):
        if not e.kind or len(e.kind) > 64:
            raise BadBatch(f"{where}: event {i}: kind must be 1-64 characters")
        if e.ts_ns <= 0:
            raise BadBatch(f"{where}: event {i}: ts_ns must be positive")
        if e.dur_ns < 0:
            raise BadBatch(f"{where}: event {i}: dur_ns is negative")
        # Stored on the collector's clock, and ends are summed in SQL: both must fit int64.
        if not 0 < e.ts_ns + b.clock_offset_ns <= INT64_MAX - e.dur_ns:
            raise BadBatch(f"{where}: event {i}: ts_ns + clock_offset_ns + dur_ns out of range")
        if (
            max(len(e.target), len(e.query_id), len(e.detail_json), len(e.request))
            > MAX_FIELD_BYTES
        ):
            raise BadBatch(f"{where}: event {i}: a field exceeds {MAX_FIELD_BYTES} bytes")
        if e.detail_json:
            try:
                if not isinstance(json.loads(e.detail_json), dict):
                    raise ValueError
            except (ValueError, RecursionError) as err:  # deep nesting: not data either
                raise BadBatch(f"{where}: event {i}: detail_json is not a JSON object") from err


def validate_anomaly(a: anomalies_pb2.Anomaly) -> str | None:
    if not is_valid_query_id(a.query_id):
        return f"query_id: {QUERY_ID_PROBLEM}"
    if a.type == anomalies_pb2.ANOMALY_TYPE_UNSPECIFIED:
        return "type must be mismatch, latency or error"
    if len(a.detail_json) > MAX_FIELD_BYTES:
        return f"detail exceeds {MAX_FIELD_BYTES} bytes"
    if a.detail_json:
        try:
            json.loads(a.detail_json)
        except (ValueError, RecursionError):
            return "detail_json is not JSON"
    return None


# Stands for an Ingest message that did not parse. grpcio's own answer to such a message
# (INTERNAL) leaks the call when it is not the stream's first: the server's state grows
# with every one, and shutdown then waits for them forever. Refused by Collector.Ingest.
UNPARSABLE = events_pb2.AgentMessage()


def _agent_message(data: bytes) -> events_pb2.AgentMessage:
    try:
        return events_pb2.AgentMessage.FromString(data)
    except DecodeError:
        return UNPARSABLE


def add_agent_service(collector: Collector, server: grpc.Server) -> None:
    """The generated registration, but with Ingest's messages parsed by the servicer's
    rules (see UNPARSABLE)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Ingest": grpc.stream_stream_rpc_method_handler(
            collector.Ingest,
            request_deserializer=_agent_message,
            response_serializer=events_pb2.CollectorMessage.SerializeToString,
        ),
        "WatchSessions": grpc.unary_stream_rpc_method_handler(
            collector.WatchSessions,
            request_deserializer=sessions_pb2.WatchSessionsRequest.FromString,
            response_serializer=sessions_pb2.SessionSet.SerializeToString,
        ),
    }
    name = "qtrace.api.v1.AgentService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class Collector(services_pb2_grpc.AgentServiceServicer, services_pb2_grpc.ControlServiceServicer):
    def __init__(self, store: Store, access: Access | None = None) -> None:
        self.store = store
        self.access = access or Access()
        self.sessions = SessionRegistry(store.load_sessions(), self._save_session)
        self.agents: dict[str, AgentState] = {}
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()
        self.aligner = Aligner(store)
        self._stopping = threading.Event()
        self.latency_factor = DEFAULT_FACTOR
        self.forget_agents_ns = FORGET_AGENTS_NS
        self.latency_min_excess_ns = DEFAULT_MIN_EXCESS_NS
        self.fetcher = Fetcher(store, self._store_lock, self._agent)
        # Flight recorder sessions: each agent's history, as its latest batch said.
        self._history: dict[tuple[str, str], tuple[events_pb2.HistoryStatus, int]] = {}
        self.fetch_wait_s = DEFAULT_WAIT_S

    def _agent(self, agent_id: str) -> AgentState | None:
        with self._lock:
            return self.agents.get(agent_id)

    # -- AgentService ----------------------------------------------------------------------

    def Ingest(
        self,
        request_iterator: Iterator[events_pb2.AgentMessage],
        context: grpc.ServicerContext,
    ) -> Iterator[events_pb2.CollectorMessage]:
        # Acks answer batches, but fetches go down whenever a query turns out to matter:
        # batches are read on their own thread and both wait in one queue.
        out: queue.Queue[Any] = queue.Queue()
        done = object()
        holder: list[AgentState] = []

        def read() -> None:
            try:
                for msg in request_iterator:
                    if msg is UNPARSABLE:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not an AgentMessage")
                    which = msg.WhichOneof("msg")
                    if which == "hello":
                        holder[:] = [self._hello(msg.hello, out)]
                        continue
                    if which != "batch":
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty AgentMessage")
                    received = time.time_ns()
                    out.put(
                        events_pb2.CollectorMessage(ack=self._ingest(msg.batch, received, context))
                    )
                    if holder:
                        agent = holder[0]
                        agent.last_batch_ns = received
                        agent.clock_offset_ns = msg.batch.clock_offset_ns
                        agent.clock_uncertainty_ns = msg.batch.clock_uncertainty_ns
            except BaseException as e:  # an abort, or the stream breaking: the handler's
                out.put(e)
            finally:
                out.put(done)

        reader = threading.Thread(target=read, name="qtrace-ingest", daemon=True)
        reader.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if holder:
                holder[0].connected = False
                holder[0].disconnected_ns = time.time_ns()
                holder[0].outbox = None

    def _hello(self, hello: events_pb2.Hello, outbox: queue.Queue[Any]) -> AgentState:
        with self._lock:
            # Every agent start is a new id (a DaemonSet rolls, a node reboots): forget the
            # ones long gone, or `status` and this table grow for as long as we run.
            now = time.time_ns()
            for gone in [
                a.agent_id
                for a in self.agents.values()
                if not a.connected and now - a.disconnected_ns > self.forget_agents_ns
            ]:
                del self.agents[gone]
            state = self.agents.get(hello.agent_id)
            if state is None:
                state = self.agents[hello.agent_id] = AgentState(hello.agent_id, hello.node)
            state.connected = True
            state.outbox = outbox
            state.connected_ns = time.time_ns()
            return state

    def _ingest(
        self, b: events_pb2.EventBatch, received: int, context: grpc.ServicerContext
    ) -> events_pb2.BatchAck:
        if len(b.events) > MAX_BATCH_EVENTS:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch seq={b.seq} has {len(b.events)} events; the limit is "
                f"{MAX_BATCH_EVENTS}: send smaller batches",
            )
        try:
            validate_batch(b)
            session = self.sessions.get(b.session_id)
        except BadBatch as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except UnknownSession as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if not session.capture.requests:
            # Request bytes are stored only for sessions that asked for them, whatever an
            # agent sends.
            for ev in b.events:
                ev.ClearField("request")
        recorder = session.detail == sessions_pb2.DETAIL_MODE_RECORDER
        with self._store_lock:
            stored, duplicate = self.store.ingest(b, received, dedupe=recorder)
            if b.HasField("fetched") and not duplicate:
                self.fetcher.answered(b, b.clock_offset_ns)
        if b.HasField("history"):
            with self._lock:
                self._history[(b.session_id, b.agent_id)] = (b.history, b.clock_offset_ns)
        if duplicate:
            with self._lock:
                st = self.agents.get(b.agent_id)
                if st is not None:
                    st.duplicates[b.session_id] = st.duplicates.get(b.session_id, 0) + 1
        return events_pb2.BatchAck(
            seq=b.seq,
            stored=stored,
            duplicate=duplicate,
            received_ns=received,
            sent_ns=time.time_ns(),
            batch_sent_ns=b.sent_ns,
        )

    def WatchSessions(
        self, request: sessions_pb2.WatchSessionsRequest, context: grpc.ServicerContext
    ) -> Iterator[sessions_pb2.SessionSet]:
        seen = -1
        while context.is_active() and not self._stopping.is_set():
            version = self.sessions.version
            if version != seen:
                seen = version
                yield sessions_pb2.SessionSet(
                    sessions=self.sessions.active(), collector_ns=time.time_ns()
                )
            # Bounded so a vanished watcher and a stopping server are noticed.
            self.sessions.wait_change(seen, timeout=1.0)

    # -- ControlService --------------------------------------------------------------------

    def StartSession(
        self, request: services_pb2.StartSessionRequest, context: grpc.ServicerContext
    ) -> sessions_pb2.Session:
        request = self.access.authorize_start(request, context)
        try:
            s = self.sessions.start(request)
        except SessionError as e:
            self._audit("session.start", "invalid", None, context, reason=str(e))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not self._audit("session.start", "ok", s, context):
            self.sessions.stop(s.id)  # nothing runs that the audit log does not show
            context.abort(
                grpc.StatusCode.INTERNAL, "the audit log cannot be written: see the collector's log"
            )
        log.info("session %s started by %s", s.id, s.started_by)
        return s

    def StopSession(
        self, request: services_pb2.SessionRequest, context: grpc.ServicerContext
    ) -> sessions_pb2.Session:
        try:
            s = self.sessions.get(request.session_id)
        except UnknownSession as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        self.access.authorize_stop(s, context)
        was_active = s.state == sessions_pb2.SESSION_STATE_ACTIVE
        s = self.sessions.stop(s.id)
        if was_active:
            self._audit("session.stop", "ok", s, context)
        return s

    def _save_session(self, s: sessions_pb2.Session) -> None:
        self.store.save_session(s)
        if s.state == sessions_pb2.SESSION_STATE_EXPIRED:
            self._audit("session.expire", "ok", s, None)

    def _audit(
        self,
        event: str,
        outcome: str,
        s: sessions_pb2.Session | None,
        context: grpc.ServicerContext | None,
        **more: str,
    ) -> bool:
        try:
            self.access.record(event, outcome, s, context, **more)
        except OSError as e:
            log.error("audit log: %s", e)
            return False
        return True

    def GetSession(
        self, request: services_pb2.SessionRequest, context: grpc.ServicerContext
    ) -> services_pb2.SessionStatus:
        try:
            s = self.sessions.get(request.session_id)
        except UnknownSession as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        self._may_read(context, [s.id])
        return services_pb2.SessionStatus(session=s, agents=self._stats(s.id))

    def ListSessions(
        self, request: services_pb2.ListSessionsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListSessionsResponse:
        readable = self._readable(context)
        return services_pb2.ListSessionsResponse(
            sessions=[
                s for s in self.sessions.all(include_ended=request.include_ended) if readable(s.id)
            ]
        )

    def _read_refusals(self, context: grpc.ServicerContext) -> Callable[[str], str | None] | None:
        """Why the caller may not read what a session (by id) recorded, or None for a
        caller who reads everything (then nothing needs looking up)."""
        who = self.access.identify(context)  # once per call, not once per session
        if who.unrestricted:
            return None

        def refusal(sid: str) -> str | None:
            try:
                s = self.sessions.get(sid)
            except UnknownSession:
                return f"session {sid} is not known to this collector: only an admin may read it"
            return self.access.read_refusal(who, s)

        return refusal

    def _readable(self, context: grpc.ServicerContext) -> Callable[[str], bool]:
        """Whether the caller may read what a session (by id) recorded."""
        refusal = self._read_refusals(context)
        return lambda sid: refusal is None or refusal(sid) is None

    def _may_read(self, context: grpc.ServicerContext, session_ids: Iterable[str]) -> None:
        """Abort with PERMISSION_DENIED unless the caller may read every one of them."""
        refusal = self._read_refusals(context)
        if refusal is not None:
            _deny_unreadable(context, refusal, session_ids)

    def _may_read_query(self, context: grpc.ServicerContext, query_id: str) -> None:
        refusal = self._read_refusals(context)
        if refusal is None:
            return  # reads everything: the query's sessions need no lookup
        with self._store_lock:
            sids = self.store.query_sessions([query_id])[query_id]
        _deny_unreadable(context, refusal, sids)

    def _stats(self, session_id: str | None) -> list[services_pb2.SessionAgentStats]:
        with self._store_lock:
            rows = self.store.session_stats(session_id)
        with self._lock:
            for r in rows:
                st = self.agents.get(r.agent_id)
                if st is not None:
                    r.duplicates = st.duplicates.get(r.session_id, 0)
                r.disconnected = not r.complete and (st is None or not st.connected)
                hist = self._history.get((r.session_id, r.agent_id))
                if hist is not None:
                    r.history.CopyFrom(hist[0])
                    r.history.covered_from_ns += hist[1]  # onto the collector's clock
        return rows

    def Status(
        self, request: services_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> services_pb2.StatusResponse:
        with self._lock:
            agents = [
                services_pb2.AgentStatus(
                    agent_id=a.agent_id,
                    node=a.node,
                    connected=a.connected,
                    connected_ns=a.connected_ns,
                    last_batch_ns=a.last_batch_ns,
                    clock_offset_ns=a.clock_offset_ns,
                    clock_uncertainty_ns=a.clock_uncertainty_ns,
                )
                for a in self.agents.values()
            ]
        with self._store_lock:
            total = self.store.events_stored()
        readable = self._readable(context)
        return services_pb2.StatusResponse(
            agents=agents,
            sessions=[r for r in self._stats(None) if readable(r.session_id)],
            events_stored=total,
        )

    def QueryEvents(
        self, request: services_pb2.QueryEventsRequest, context: grpc.ServicerContext
    ) -> services_pb2.QueryEventsResponse:
        if not request.query_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query_id is empty")
        limit = request.limit or DEFAULT_QUERY_LIMIT
        self._may_read_query(context, request.query_id)
        self.fetcher.request(request.query_id, wait_s=self.fetch_wait_s)
        self._may_read_query(context, request.query_id)  # and what the fetch brought
        with self._store_lock:
            events, truncated, _ = self.aligner.events(request.query_id, limit)
        return services_pb2.QueryEventsResponse(
            query_id=request.query_id, events=events, truncated=truncated
        )

    def Explain(
        self, request: services_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> services_pb2.ExplainResponse:
        if not request.query_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query_id is empty")
        self._may_read_query(context, request.query_id)
        self.fetcher.request(request.query_id, wait_s=self.fetch_wait_s)
        self._may_read_query(context, request.query_id)
        with self._store_lock:
            anomalies = self.store.list_anomalies(query_id=request.query_id)
            try:
                result = explain(self.store, request.query_id, anomalies, self.aligner)
            except NotFound as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return services_pb2.ExplainResponse(json=json.dumps(result))

    def ListRequests(
        self, request: services_pb2.ListRequestsRequest, context: grpc.ServicerContext
    ) -> Iterator[services_pb2.CapturedRequest]:
        try:
            s = self.sessions.get(request.session_id)
        except UnknownSession as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        self._may_read(context, [s.id])
        if not s.capture.requests:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {s.id} did not capture requests: start one with --capture-requests",
            )
        with self._store_lock:
            found = self.store.list_requests(s.id)
        yield from found

    def ReportAnomalies(
        self, request: anomalies_pb2.ReportAnomaliesRequest, context: grpc.ServicerContext
    ) -> anomalies_pb2.ReportAnomaliesResponse:
        if len(request.anomalies) > MAX_BATCH_EVENTS:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(request.anomalies)} anomalies in one request; the limit is "
                f"{MAX_BATCH_EVENTS}",
            )
        for i, a in enumerate(request.anomalies):
            problem = validate_anomaly(a)
            if problem is None and a.session_id:
                try:
                    self.sessions.get(a.session_id)
                except UnknownSession as e:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"anomaly {i}: {e}")
            if problem is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"anomaly {i}: {problem}")
        self._may_read(context, [a.session_id for a in request.anomalies if a.session_id])
        now = time.time_ns()
        stamped = []
        for a in request.anomalies:
            b = anomalies_pb2.Anomaly()
            b.CopyFrom(a)
            b.ts_ns = b.ts_ns or now
            b.source = b.source or "grpc"
            stamped.append(b)
        with self._store_lock:
            n = self.store.add_anomalies(stamped, now)
        # Flight recorder sessions: their detail is fetched now, while the history has it.
        self.fetcher.want(self._recorded([(a.query_id, a.session_id) for a in stamped]))
        return anomalies_pb2.ReportAnomaliesResponse(accepted=n)

    def _recorded(self, anomalies: list[tuple[str, str]]) -> list[str]:
        """The queries that a flight recorder session may hold the detail of (an anomaly
        without a session may belong to any of them)."""
        recorders = {
            s.id for s in self.sessions.all() if s.detail == sessions_pb2.DETAIL_MODE_RECORDER
        }
        if not recorders:
            return []
        return [q for q, sid in anomalies if not sid or sid in recorders]

    def ListAnomalies(
        self, request: anomalies_pb2.ListAnomaliesRequest, context: grpc.ServicerContext
    ) -> anomalies_pb2.ListAnomaliesResponse:
        if request.session_id:
            self._may_read(context, [request.session_id])
        with self._store_lock:
            found = self.store.list_anomalies(request.session_id or None)
        refusal = self._read_refusals(context)
        if refusal is not None:
            # An anomaly reported without a session is shown to those who may read every
            # session that traced its query (none traced it: nothing to hide).
            unbound = [a.query_id for a in found if not a.session_id]
            with self._store_lock:
                traced_by = self.store.query_sessions(unbound)
            found = [
                a
                for a in found
                if not any(map(refusal, [a.session_id] if a.session_id else traced_by[a.query_id]))
            ]
        return anomalies_pb2.ListAnomaliesResponse(anomalies=found)

    def watch_latency(self, interval: float = 5.0) -> None:
        """Flag latency outliers of sessions that received events since the last look."""
        seen: dict[str, int] = {}
        while not self._stopping.wait(interval):
            self.detect_latency_all(seen)

    def detect_latency_all(self, seen: dict[str, int]) -> int:
        found = 0
        for s in self.sessions.all():
            with self._store_lock:
                n = self.store.count_events(session_id=s.id)
                if n == seen.get(s.id) or n == 0:
                    continue
                seen[s.id] = n
                new = detect(self.store, s.id, self.latency_factor, self.latency_min_excess_ns)
                if new:
                    self.store.add_anomalies(new, time.time_ns())
                    found += len(new)
            if new and s.detail == sessions_pb2.DETAIL_MODE_RECORDER:
                self.fetcher.want([a.query_id for a in new])
        return found

    def stop(self) -> None:
        self._stopping.set()
        self.fetcher.close()
        self.sessions.close()


def _deny_unreadable(
    context: grpc.ServicerContext, refusal: Callable[[str], str | None], session_ids: Iterable[str]
) -> None:
    for sid in sorted(set(session_ids)):
        why = refusal(sid)
        if why is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)


def serve(
    listen: str, db: Path, security: Security | None = None
) -> tuple[grpc.Server, Collector, int]:
    """Start serving; returns the server, the servicer and the bound port."""
    security = security or Security()
    security.check(listen)
    audit = AuditLog(security.audit_log or default_path(db))
    access = Access(security.config, audit, security.insecure)
    store = Store(db)
    collector = Collector(store, access)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="qtrace-rpc"),
        interceptors=[AuthInterceptor(access)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Agents ping every 10 s to notice a partition; without these, a quiet stream
            # (no acks to send) makes those pings "abuse" and the server hangs up.
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    add_agent_service(collector, server)
    services_pb2_grpc.add_ControlServiceServicer_to_server(collector, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        services_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        services_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, server)
    if security.tls is not None:
        port = server.add_secure_port(listen, security.tls.credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        store.close()
        audit.close()
        raise OSError(f"cannot listen on {listen}")
    server.start()
    threading.Thread(target=collector.watch_latency, name="qtrace-latency", daemon=True).start()
    for name in ["", *names[:2]]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, collector, port
