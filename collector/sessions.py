"""Trace sessions: created by engineers, watched by agents, always expiring."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable

from agent.groups import parse_groups
from agent.labels import SelectorError, parse_selector
from agent.recorder import DEFAULT_HISTORY_BYTES, MAX_HISTORY_BYTES, MIN_HISTORY_BYTES
from qtrace.api.v1 import services_pb2, sessions_pb2
from qtrace.redact import RedactionError, Redactor

MAX_DURATION_NS = 24 * 3600 * 10**9
DEFAULT_DURATION_NS = 10 * 60 * 10**9
# Events/s per node that may leave the kernel unless a session says otherwise: well under
# what an agent's consumer sustains (~0.7M/s on one core), far over a traced search node's
# normal rate. Past it events are shed (counted) and sampled, never waited for.
DEFAULT_MAX_EVENT_RATE = 200_000
MAX_EVENT_RATE = 5_000_000
# Kubernetes names: a namespace is a DNS label, a pod a DNS subdomain.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class SessionError(ValueError):
    """A request that cannot make a valid session (maps to INVALID_ARGUMENT)."""


class UnknownSession(KeyError):
    """No session with that id (maps to NOT_FOUND)."""

    def __str__(self) -> str:
        return f"no session {self.args[0]!r}: `qtrace session list` shows the known ones"


def validate_start(req: services_pb2.StartSessionRequest) -> list[str]:
    t = req.targets
    if t.label_selector and not t.namespaces:
        raise SessionError("--selector needs --namespace")
    if not (t.pids or t.comms or t.cmdline_regexes or t.cgroups or t.namespaces or t.pods):
        raise SessionError(
            "a session needs a target: --namespace, --pod, --pid, --comm, --cmdline or --cgroup"
        )
    _validate_pod_targets(t)
    for rx in t.cmdline_regexes:
        try:
            re.compile(rx)
        except re.error as e:
            raise SessionError(f"invalid cmdline regex {rx!r}: {e}") from e
    try:
        probes = parse_groups(list(req.probes))
    except ValueError as e:
        raise SessionError(str(e)) from None
    if req.max_event_rate > MAX_EVENT_RATE:
        raise SessionError(f"max event rate must be at most {MAX_EVENT_RATE} events/s per node")
    if req.history_bytes and not (MIN_HISTORY_BYTES <= req.history_bytes <= MAX_HISTORY_BYTES):
        raise SessionError(
            f"history size must be from {MIN_HISTORY_BYTES >> 20} MiB to "
            f"{MAX_HISTORY_BYTES >> 30} GiB per node"
        )
    if req.duration_ns < 0 or req.duration_ns > MAX_DURATION_NS:
        raise SessionError("duration must be between 1 s and 24 h")
    cap = req.capture
    if cap.bodies and not cap.requests:
        raise SessionError("capturing bodies needs capturing requests (--capture-requests)")
    if cap.max_bytes and (not 16 <= cap.max_bytes <= 4096 or cap.max_bytes & (cap.max_bytes - 1)):
        raise SessionError("capture bytes must be a power of two from 16 to 4096")
    try:
        redactor = Redactor.from_pb(cap.redact)
    except RedactionError as e:
        raise SessionError(str(e)) from e
    if redactor and not cap.requests:
        raise SessionError("redaction rules apply to captured requests: add --capture-requests")
    ex = req.extractor
    if ex.WhichOneof("how") == "regex":
        try:
            if re.compile(ex.regex).groups < 1:
                raise SessionError(f"query-id regex {ex.regex!r} has no group")
        except re.error as e:
            raise SessionError(f"invalid query-id regex {ex.regex!r}: {e}") from e
    return sorted(probes)


def _validate_pod_targets(t: sessions_pb2.Targets) -> None:
    for ns in t.namespaces:
        if not _DNS_LABEL.fullmatch(ns):
            raise SessionError(
                f"invalid namespace {ns!r}: lower-case letters, digits and '-', at most 63"
            )
    for pod in t.pods:
        ns, _, name = pod.rpartition("/")
        if (ns and not _DNS_LABEL.fullmatch(ns)) or not _DNS_SUBDOMAIN.fullmatch(name):
            raise SessionError(f"invalid pod {pod!r}: give NAME or NAMESPACE/NAME")
    try:
        parse_selector(t.label_selector)
    except SelectorError as e:
        raise SessionError(str(e)) from None


class SessionRegistry:
    """In memory, persisted through ``save``; watchers are woken on every change,
    including a session expiring."""

    def __init__(
        self,
        saved: list[sessions_pb2.Session],
        save: Callable[[sessions_pb2.Session], None],
    ) -> None:
        self._save = save
        self._sessions = {s.id: s for s in saved}
        self._cv = threading.Condition()
        self.version = 0
        self._timer: threading.Timer | None = None
        self.expire_due()

    def start(self, req: services_pb2.StartSessionRequest) -> sessions_pb2.Session:
        probes = validate_start(req)
        now = time.time_ns()
        s = sessions_pb2.Session(
            id=uuid.uuid4().hex[:12],
            targets=req.targets,
            probes=probes,
            extractor=req.extractor,
            created_ns=now,
            expires_ns=now + (req.duration_ns or DEFAULT_DURATION_NS),
            started_by=req.started_by or "unknown",
            state=sessions_pb2.SESSION_STATE_ACTIVE,
            capture=req.capture,
            max_event_rate=req.max_event_rate or DEFAULT_MAX_EVENT_RATE,
            detail=req.detail,
            history_bytes=(req.history_bytes or DEFAULT_HISTORY_BYTES)
            if req.detail == sessions_pb2.DETAIL_MODE_RECORDER
            else 0,
        )
        with self._cv:
            self._sessions[s.id] = s
            self._save(s)
            self._changed()
        return s

    def stop(self, session_id: str) -> sessions_pb2.Session:
        with self._cv:
            s = self.get(session_id)
            if s.state == sessions_pb2.SESSION_STATE_ACTIVE:
                s.state = sessions_pb2.SESSION_STATE_STOPPED
                s.stopped_ns = time.time_ns()
                self._save(s)
                self._changed()
            return s

    def get(self, session_id: str) -> sessions_pb2.Session:
        with self._cv:
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(session_id)
            return s

    def all(self, include_ended: bool = True) -> list[sessions_pb2.Session]:
        with self._cv:
            out = sorted(self._sessions.values(), key=lambda s: s.created_ns)
        if not include_ended:
            out = [s for s in out if s.state == sessions_pb2.SESSION_STATE_ACTIVE]
        return out

    def active(self) -> list[sessions_pb2.Session]:
        return self.all(include_ended=False)

    def expire_due(self) -> None:
        now = time.time_ns()
        with self._cv:
            changed = False
            for s in self._sessions.values():
                if s.state == sessions_pb2.SESSION_STATE_ACTIVE and s.expires_ns <= now:
                    s.state = sessions_pb2.SESSION_STATE_EXPIRED
                    s.stopped_ns = s.expires_ns
                    self._save(s)
                    changed = True
            if changed:
                self._changed()
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        due = [
            s.expires_ns
            for s in self._sessions.values()
            if s.state == sessions_pb2.SESSION_STATE_ACTIVE
        ]
        if due:
            delay = max(0.0, (min(due) - time.time_ns()) / 1e9)
            self._timer = threading.Timer(delay + 0.001, self.expire_due)
            self._timer.daemon = True
            self._timer.start()

    def _changed(self) -> None:
        self.version += 1
        self._cv.notify_all()
        self._arm_timer()

    def wait_change(self, seen: int, timeout: float) -> int:
        with self._cv:
            self._cv.wait_for(lambda: self.version != seen, timeout)
            return self.version

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
