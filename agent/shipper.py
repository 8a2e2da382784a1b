"""Ships event batches to the collector: ordered, acknowledged, resent after any failure.

Batches are cut per session (at most ``batch_events`` events or every ``flush_s``), get
a sequence number once, and stay queued until the collector acknowledges that it has
committed them. A reconnect resends everything unacknowledged, in order; the collector
stores each (agent id, seq) once. The queue is bounded: what overflows it is counted per
session as ``lost_agent``, never dropped silently."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import grpc

from agent.clock import wall_ns
from agent.model import Event
from qtrace.api.v1 import events_pb2, services_pb2_grpc
from qtrace.wire import event_to_pb

log = logging.getLogger("qtrace.agent")

WINDOW = 16  # batches in flight on one stream


class ClockEstimate:
    """Offset of the collector's clock from ours, NTP-style, from the tightest recent
    round trip (batch sent -> ack received)."""

    def __init__(self, keep: int = 32) -> None:
        self._samples: deque[tuple[int, int]] = deque(maxlen=keep)  # (rtt, offset)
        self.offset_ns = 0
        self.uncertainty_ns = 0

    def add(self, ack: events_pb2.BatchAck, received_ns: int) -> None:
        t0, t1, t2, t3 = ack.batch_sent_ns, ack.received_ns, ack.sent_ns, received_ns
        if not (t0 and t1 and t2):
            return
        rtt = (t3 - t0) - (t2 - t1)
        self._samples.append((max(rtt, 0), ((t1 - t0) + (t2 - t3)) // 2))
        rtt_best, self.offset_ns = min(self._samples)
        self.uncertainty_ns = rtt_best // 2 + 1


class Shipper:
    def __init__(
        self,
        channel: grpc.Channel,
        agent_id: str,
        node: str,
        drops: Callable[[str], list[events_pb2.DropCounter]],
        batch_events: int = 5000,
        flush_s: float = 0.1,
        max_queued_events: int = 2_000_000,
    ) -> None:
        self._stub = services_pb2_grpc.AgentServiceStub(channel)
        self.agent_id = agent_id
        self.node = node
        self._drops = drops
        self.batch_events = batch_events
        self.flush_s = flush_s
        self.max_queued_events = max_queued_events
        self.clock = ClockEstimate()
        self._cv = threading.Condition()
        self._open: dict[str, list[events_pb2.Event]] = {}  # session -> events not cut yet
        self._opened_at: dict[str, float] = {}
        self._queue: deque[events_pb2.EventBatch] = deque()  # cut, not acknowledged
        self._queued_events = 0
        self._sent = 0  # how many of _queue went out on the current stream
        self._seq = 0
        self.lost: dict[str, int] = {}
        self.acked_events = 0
        self.connected = False
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qtrace-ship", daemon=True)

    def start(self) -> Shipper:
        self._thread.start()
        return self

    # -- producer side ---------------------------------------------------------------------

    def add(self, session_id: str, events: Sequence[Event]) -> None:
        if not events:
            return
        pbs = [event_to_pb(e) for e in events]
        with self._cv:
            buf = self._open.setdefault(session_id, [])
            if not buf:
                self._opened_at[session_id] = time.monotonic()
            buf.extend(pbs)
            while len(buf) >= self.batch_events:
                self._cut(session_id, buf[: self.batch_events])
                del buf[: self.batch_events]

    def flush(self, session_id: str | None = None) -> None:
        """Cut open batches: all of them, or those of one session, or those due."""
        now = time.monotonic()
        with self._cv:
            for sid, buf in self._open.items():
                due = now - self._opened_at.get(sid, now) >= self.flush_s
                if buf and (session_id == sid or (session_id is None and due)):
                    self._cut(sid, list(buf))
                    buf.clear()

    def mark(self, session_id: str, final: bool, error: str = "") -> None:
        """An empty batch that says the session started here, or (``final``) cuts what is
        open and says nothing more will come for it."""
        with self._cv:
            buf = self._open.get(session_id) or []
            self._cut(session_id, list(buf), final=final, error=error)
            buf.clear()

    def flush_all(self) -> None:
        with self._cv:
            for sid, buf in self._open.items():
                if buf:
                    self._cut(sid, list(buf))
                    buf.clear()

    def _cut(
        self,
        session_id: str,
        events: list[events_pb2.Event],
        final: bool = False,
        error: str = "",
    ) -> None:
        self._seq += 1
        batch = events_pb2.EventBatch(
            agent_id=self.agent_id,
            node=self.node,
            session_id=session_id,
            seq=self._seq,
            events=events,
            drops=self._drops(session_id),
            final=final,
            error=error,
        )
        self._queue.append(batch)
        self._queued_events += len(events)
        while self._queued_events > self.max_queued_events and len(self._queue) > 1:
            old = self._queue.popleft()
            self._sent = max(0, self._sent - 1)
            self._queued_events -= len(old.events)
            self.lost[old.session_id] = self.lost.get(old.session_id, 0) + len(old.events)
            log.warning("spool full: dropped batch %d (%d events)", old.seq, len(old.events))
        self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return self._queued_events + sum(len(b) for b in self._open.values())

    def wait_empty(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue, timeout)

    # -- the stream ------------------------------------------------------------------------

    def _requests(self, alive: threading.Event) -> Iterator[events_pb2.AgentMessage]:
        yield events_pb2.AgentMessage(
            hello=events_pb2.Hello(agent_id=self.agent_id, node=self.node, version="0.1.0")
        )
        while True:
            with self._cv:
                self._cv.wait_for(
                    lambda: (
                        self._stop.is_set()
                        or not alive.is_set()
                        or (self._sent < len(self._queue) and self._sent < WINDOW)
                    ),
                    timeout=1.0,
                )
                if self._stop.is_set() or not alive.is_set():
                    return
                if not (self._sent < len(self._queue) and self._sent < WINDOW):
                    continue
                batch = self._queue[self._sent]
                self._sent += 1
                batch.sent_ns = wall_ns()
                batch.clock_offset_ns = self.clock.offset_ns
                batch.clock_uncertainty_ns = self.clock.uncertainty_ns
            yield events_pb2.AgentMessage(batch=batch)

    def _on_ack(self, ack: events_pb2.BatchAck) -> None:
        self.clock.add(ack, wall_ns())
        with self._cv:
            while self._queue and self._queue[0].seq <= ack.seq:
                done = self._queue.popleft()
                self._sent = max(0, self._sent - 1)
                self._queued_events -= len(done.events)
                self.acked_events += len(done.events)
            self._cv.notify_all()

    def _reject_head(self, err: grpc.RpcError) -> None:
        """The collector refused the oldest unacknowledged batch as malformed: resending
        it would fail forever, so it is dropped and counted."""
        with self._cv:
            if self._queue:
                bad = self._queue.popleft()
                self._queued_events -= len(bad.events)
                self.lost[bad.session_id] = self.lost.get(bad.session_id, 0) + len(bad.events)
                self.rejected += 1
            self._cv.notify_all()
        log.error("collector rejected a batch: %s", err.details())

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            alive = threading.Event()
            alive.set()
            with self._cv:
                self._sent = 0  # a new stream starts from the oldest unacknowledged batch
            try:
                for msg in self._stub.Ingest(self._requests(alive)):
                    self.connected = True
                    backoff = 0.05
                    self._on_ack(msg.ack)
            except grpc.RpcError as err:
                code = err.code()
                if code in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.NOT_FOUND,
                ):
                    self._reject_head(err)
                    continue
                log.info("collector unreachable (%s); retrying in %.2fs", code, backoff)
            finally:
                alive.clear()
                self.connected = False
                with self._cv:
                    self._cv.notify_all()
            if self._stop.is_set():
                break
            # Exponential backoff with jitter, so a restarted collector is not stampeded.
            self._stop.wait(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    def close(self, timeout: float = 10.0) -> bool:
        """Flush and ship what is left (up to ``timeout``); True if nothing was left."""
        self.flush_all()
        empty = self.wait_empty(timeout)
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=2.0)
        return empty
