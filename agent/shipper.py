"""Ships event batches to the collector: ordered, acknowledged, resent after any failure.

Batches are cut per session (at most ``batch_events`` events or every ``flush_s``), get
a sequence number once, and stay queued until the collector acknowledges that it has
committed them. A reconnect resends everything unacknowledged, in order; the collector
stores each (agent id, seq) once.

The queue lives in memory while the collector keeps up. It moves to the on-disk spool
(agent/spool.py) when the collector is unreachable, when the batches in memory pass
``spill_bytes``, or when the process nears its memory cap; from then on new batches go to
disk too until the backlog is acknowledged. What neither memory nor the spool can hold is
dropped and counted per session (``lost_spool`` when the spool refused it, ``lost_agent``
for batches the collector rejected or, without a spool, a full queue): never silently.
A batch whose events are dropped still goes out, empty, so its seq, its "final" mark and
the loss counters reach the collector."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import psutil

from agent.clock import MAX_SLEW_NS, slew, wall_ns
from agent.model import Event
from agent.spool import Entry, Spool
from qtrace.api.v1 import events_pb2, services_pb2_grpc
from qtrace.wire import event_to_pb

log = logging.getLogger("qtrace.agent")

WINDOW = 16  # batches in flight on one stream

# For the agent's channel to the collector. A partition (no reset, just silence) would
# otherwise leave the connection "ready" for as long as TCP retries, many minutes, and
# its retries back off to a minute apart: pings find it dead within ~20 s, and reconnects
# stay a few seconds apart, so the agent is back soon after the network is.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 3_000),
]


# How far off the applied collector offset may provably be before it steps, not slews:
# below this, cross-node order is within what explain tolerates; above it, leaf hops
# would fall outside their root hop.
WRONG_NS = 1_000_000


class ClockEstimate:
    """Offset of the collector's clock from ours, NTP-style, from the tightest recent
    round trip (batch sent -> ack received).

    The offset applied to batches slews towards that estimate, at most 50 µs per second:
    as samples come and go the estimate moves by up to half a round trip, and a step would
    shift this node's later events against its earlier ones (a sleep seeming to start
    before the read that preceded it). It steps only for the first estimate, and when the
    applied offset is provably more than WRONG_NS off: the true offset lies within half
    the best round trip of the estimate, so a first ack that waited behind a loaded CPU
    (a round trip of several ms) is corrected as soon as a tighter one arrives, instead
    of slewing for a minute."""

    def __init__(self, keep: int = 32) -> None:
        self._samples: deque[tuple[int, int]] = deque(maxlen=keep)  # (rtt, offset)
        self.offset_ns = 0
        self.uncertainty_ns = 0
        self._at = 0  # our wall clock at the last update; 0: no estimate yet

    def add(self, ack: events_pb2.BatchAck, received_ns: int) -> None:
        t0, t1, t2, t3 = ack.batch_sent_ns, ack.received_ns, ack.sent_ns, received_ns
        if not (t0 and t1 and t2):
            return
        rtt = (t3 - t0) - (t2 - t1)
        self._samples.append((max(rtt, 0), ((t1 - t0) + (t2 - t3)) // 2))
        rtt_best, target = min(self._samples)
        if not self._at or abs(target - self.offset_ns) > rtt_best // 2 + WRONG_NS:
            self.offset_ns = target
        else:
            room = max(0, received_ns - self._at) * MAX_SLEW_NS // 1_000_000_000
            self.offset_ns = slew(self.offset_ns, target, room)
        self._at = received_ns
        self.uncertainty_ns = rtt_best // 2 + 1 + abs(target - self.offset_ns)


def process_rss() -> int:
    return int(psutil.Process().memory_info().rss)


@dataclass(eq=False)
class Queued:
    """One unacknowledged batch: in memory, on disk, or both (until memory lets go)."""

    seq: int
    session_id: str
    n_events: int
    batch: events_pb2.EventBatch | None  # None: only on disk
    entry: Entry | None = None  # where the spool has it
    size: int = 0  # bytes it holds in memory


class StreamOutOfStep(Exception):
    """An ack that is not for the oldest batch in flight: start the stream over."""


class Shipper:
    def __init__(
        self,
        channel: grpc.Channel,
        agent_id: str,
        node: str,
        drops: Callable[[str], list[events_pb2.DropCounter]],
        batch_events: int = 5000,
        flush_s: float = 0.1,
        spool: Spool | None = None,
        spill_bytes: int = 32 * 1024 * 1024,
        max_queued_bytes: int = 256 * 1024 * 1024,
        memory_cap: int = 0,
        ack_timeout: float = 15.0,
        rss: Callable[[], int] = process_rss,
    ) -> None:
        self._stub = services_pb2_grpc.AgentServiceStub(channel)
        self.agent_id = agent_id
        self.node = node
        self._drops = drops
        self.batch_events = batch_events
        self.flush_s = flush_s
        self.spool = spool
        self.spill_bytes = spill_bytes
        self.max_queued_bytes = max_queued_bytes
        self.memory_cap = memory_cap
        self.ack_timeout = ack_timeout
        self._rss = rss
        self._rss_checked = 0.0
        self.pressure = False  # RSS near the cap: keep nothing in memory that disk can hold
        self.clock = ClockEstimate()
        self._cv = threading.Condition()
        self._open: dict[str, list[events_pb2.Event]] = {}  # session -> events not cut yet
        self._opened_at: dict[str, float] = {}
        self._queue: deque[Queued] = deque()  # cut, not acknowledged, in shipping order
        self._mem_bytes = 0
        self._on_disk = 0  # queued batches that are only on disk
        self._sent = 0  # how many of _queue went out on the current stream
        self._progress = time.monotonic()  # last ack, or first send after a quiet spell
        self._call: grpc.RpcContext | None = None
        self._seq = 0
        self.down = False  # the last stream failed and no ack has come since
        self.lost: dict[str, int] = {}
        self.lost_spool: dict[str, int] = {}
        self.acked_events = 0
        self.connected = False
        self.rejected = 0
        self._shed_warned = False
        # Flight recorder: what the collector asks of the recent history, and what the
        # history holds now (carried by every batch of a recorder session).
        self.on_fetch: Callable[[events_pb2.FetchRequest], None] = lambda f: None
        self.history: Callable[[str], events_pb2.HistoryStatus | None] = lambda sid: None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qtrace-ship", daemon=True)
        if spool is not None:
            self._replay(spool)

    def start(self) -> Shipper:
        self._thread.start()
        return self

    # -- what an earlier agent process left in the spool -----------------------------------

    def _replay(self, spool: Spool) -> None:
        """Queue the spooled batches first, under their own agent ids and seqs, then close
        the sessions a dead process left open: it will never send their final batch."""
        entries = spool.recovered.entries
        if not entries:
            return
        last_seq: dict[str, int] = {}
        open_sessions: dict[tuple[str, str], str] = {}  # (agent, session) -> node
        for e in entries:
            self._queue.append(Queued(e.seq, e.session_id, e.n_events, None, e))
            self._on_disk += 1
            last_seq[e.agent_id] = max(last_seq.get(e.agent_id, 0), e.seq)
            if e.final:
                open_sessions.pop((e.agent_id, e.session_id), None)
            else:
                open_sessions[e.agent_id, e.session_id] = e.node
        with self._cv:
            for (agent_id, sid), node in open_sessions.items():
                # In spool mode every batch an agent cuts goes to disk, so the highest seq
                # on disk is its last: the next one was never used.
                last_seq[agent_id] += 1
                self._enqueue(
                    events_pb2.EventBatch(
                        agent_id=agent_id,
                        node=node,
                        session_id=sid,
                        seq=last_seq[agent_id],
                        final=True,
                        error=f"agent process {agent_id} died while tracing; its spooled "
                        f"batches were shipped by {self.agent_id}",
                    )
                )
        log.warning(
            "spool: shipping %d batches (%d events) left by earlier agent processes",
            len(entries), sum(e.n_events for e in entries),
        )  # fmt: skip

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
        self._check_memory()
        self._check_stalled()
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

    def answer(self, session_id: str, result: events_pb2.FetchResult) -> None:
        """Cut what is open for the session (the fetched events are in it or before it)
        in a batch that says the fetch is done."""
        with self._cv:
            buf = self._open.get(session_id) or []
            self._cut(session_id, list(buf), fetched=result)
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
        fetched: events_pb2.FetchResult | None = None,
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
            fetched=fetched,
            history=self.history(session_id),
        )
        self._enqueue(batch)

    def _enqueue(self, batch: events_pb2.EventBatch) -> None:
        q = Queued(batch.seq, batch.session_id, len(batch.events), batch)
        self._queue.append(q)
        if self.spool is not None and self._spilling():
            self._spill()
        if self.spool is None or q.entry is None:
            q.size = batch.ByteSize()
            self._mem_bytes += q.size
            self._shed()
        self._cv.notify_all()

    def _spilling(self) -> bool:
        # Once something is on disk, newer batches follow it there until it is acknowledged:
        # a crash then loses no batch older than one that survived.
        return self.down or self.pressure or self._on_disk > 0 or self._mem_bytes > self.spill_bytes

    def _spill(self) -> None:
        """Write every batch that is only in memory to the spool, oldest first."""
        assert self.spool is not None
        for q in self._queue:
            if q.entry is not None or q.batch is None:
                continue
            entry = self.spool.append(q.batch)
            if entry is None:
                return  # full or unwritable (it said so once): they stay in memory, bounded
            q.entry, q.batch = entry, None
            self._mem_bytes -= q.size
            q.size = 0
            self._on_disk += 1

    def _shed(self) -> None:
        """Over the memory bound with nowhere else to put it: drop the events of the oldest
        batches in memory, count them, and keep the batches' frames."""
        # With a spool, memory holds spill_bytes at most: the rest goes to disk or is lost.
        limit = 0 if self.pressure else self.spill_bytes if self.spool else self.max_queued_bytes
        for q in self._queue:
            if self._mem_bytes <= limit:
                return
            if q.batch is None or not q.batch.events:
                continue
            counter = self.lost_spool if self.spool is not None else self.lost
            counter[q.session_id] = counter.get(q.session_id, 0) + q.n_events
            # The spool said once why it refuses; without one, say it once per backlog.
            if self.spool is None and not self._shed_warned:
                log.warning("in-memory queue full: dropping batches (counted as lost_agent)")
                self._shed_warned = True
            log.info("dropped the %d events of batch %d", q.n_events, q.seq)
            del q.batch.events[:]
            q.n_events = 0
            if q.batch.agent_id == self.agent_id:  # the counters now include this loss
                del q.batch.drops[:]
                q.batch.drops.extend(self._drops(q.session_id))
            self._mem_bytes -= q.size
            q.size = q.batch.ByteSize()
            self._mem_bytes += q.size

    def _check_stalled(self) -> None:
        """A link that dies without a reset (a partition) leaves the stream waiting for acks
        that cannot come, for as long as TCP keeps retrying (many minutes). Watched from
        the producer's side: the stream's own threads are the ones blocked."""
        with self._cv:
            stalled = self._sent and time.monotonic() - self._progress > self.ack_timeout
            call, self._call = (self._call, None) if stalled else (None, self._call)
        if call is not None:
            log.warning("no ack from the collector for %.0fs: reconnecting", self.ack_timeout)
            call.cancel()

    def _check_memory(self) -> None:
        """Under the memory cap, the queue spills to disk before the process grows past it
        (psutil's RSS, looked at a few times a second: it costs a /proc read)."""
        if not self.memory_cap:
            return
        now = time.monotonic()
        if now - self._rss_checked < 0.25:
            return
        self._rss_checked = now
        rss = self._rss()
        with self._cv:
            was = self.pressure
            # Hysteresis: spill from 80% of the cap, keep spilling until back under 70%.
            self.pressure = rss > self.memory_cap * (0.7 if was else 0.8)
            if self.pressure and not was:
                log.warning(
                    "agent memory %d MiB is near its cap of %d MiB: spilling to the spool",
                    rss >> 20, self.memory_cap >> 20,
                )  # fmt: skip
            if self.pressure:
                if self.spool is not None:
                    self._spill()
                self._shed()

    def pending(self) -> int:
        with self._cv:
            return sum(q.n_events for q in self._queue) + sum(len(b) for b in self._open.values())

    def queued(self) -> tuple[int, int]:
        """(batches queued, of them only on disk)."""
        with self._cv:
            return len(self._queue), self._on_disk

    def wait_empty(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue, timeout)

    # -- the stream ------------------------------------------------------------------------

    def _next(self, alive: threading.Event) -> Queued | None:
        """The next batch to send on this stream; None when the stream should end."""
        with self._cv:
            while True:
                if self._stop.is_set() or not alive.is_set():
                    return None
                if self._sent < len(self._queue) and self._sent < WINDOW:
                    q = self._queue[self._sent]
                    if self._sent == 0:
                        self._progress = time.monotonic()
                    self._sent += 1
                    return q
                self._cv.wait(timeout=1.0)

    def _requests(self, alive: threading.Event) -> Iterator[events_pb2.AgentMessage]:
        yield events_pb2.AgentMessage(
            hello=events_pb2.Hello(agent_id=self.agent_id, node=self.node, version="0.1.0")
        )
        while (q := self._next(alive)) is not None:
            batch = q.batch
            if batch is None:
                assert self.spool is not None and q.entry is not None
                batch = self.spool.read(q.entry)  # outside the lock: a disk read
                if batch is None:
                    batch = self._unreadable(q)
            batch.sent_ns = wall_ns()
            batch.clock_offset_ns = self.clock.offset_ns
            batch.clock_uncertainty_ns = self.clock.uncertainty_ns
            yield events_pb2.AgentMessage(batch=batch)

    def _unreadable(self, q: Queued) -> events_pb2.EventBatch:
        """A spooled batch that cannot be read back: its events are lost (counted); an empty
        batch with its seq and marks goes instead."""
        assert q.entry is not None
        e = q.entry
        with self._cv:
            self.lost_spool[q.session_id] = self.lost_spool.get(q.session_id, 0) + q.n_events
            q.n_events = 0
            own = e.agent_id == self.agent_id
            q.batch = events_pb2.EventBatch(
                agent_id=e.agent_id, node=e.node, session_id=e.session_id, seq=e.seq,
                final=e.final, drops=self._drops(e.session_id) if own else [],
            )  # fmt: skip
            q.size = q.batch.ByteSize()
            self._mem_bytes += q.size
            self._on_disk -= 1
            return q.batch

    def _on_ack(self, ack: events_pb2.BatchAck) -> None:
        self.clock.add(ack, wall_ns())
        with self._cv:
            # The collector answers each batch in the order it came: one ack, the head.
            # (Seqs alone do not order the queue: it can hold a dead agent's batches.)
            if not self._queue or self._queue[0].seq != ack.seq:
                raise StreamOutOfStep(f"ack for seq {ack.seq} out of step")
            done = self._queue.popleft()
            self._release(done)
            self.acked_events += done.n_events
            self._progress = time.monotonic()
            self.down = False
            self._shed_warned = False
            self._cv.notify_all()

    def _release(self, q: Queued) -> None:
        self._sent = max(0, self._sent - 1)
        self._mem_bytes -= q.size
        if q.entry is not None:
            if q.batch is None:
                self._on_disk -= 1
            assert self.spool is not None
            self.spool.ack(q.entry)

    def _reject_head(self, err: grpc.RpcError) -> None:
        """The collector refused the oldest unacknowledged batch as malformed: resending
        it would fail forever, so it is dropped and counted."""
        with self._cv:
            if self._queue:
                bad = self._queue.popleft()
                self._release(bad)
                self.lost[bad.session_id] = self.lost.get(bad.session_id, 0) + bad.n_events
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
                self._call = call = self._stub.Ingest(self._requests(alive))
                for msg in call:
                    self.connected = True
                    backoff = 0.05
                    if msg.WhichOneof("msg") == "fetch":
                        self.on_fetch(msg.fetch)
                        continue
                    self._on_ack(msg.ack)
            except StreamOutOfStep as e:
                log.error("%s: restarting the stream", e)
                call.cancel()
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
                with self._cv:
                    # Unreachable: what is queued goes to disk now, so a restart keeps it.
                    self.down = True
                    if self.spool is not None:
                        self._spill()
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
        """Flush and ship what is left (up to ``timeout``, less when the collector is away);
        True if nothing was left. With a spool, what is left stays on disk for the next
        agent process."""
        self.flush_all()
        empty = self.wait_empty(min(timeout, 1.0) if self.down else timeout)
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=2.0)
        if self.spool is not None:
            with self._cv:
                self._spill()
                self.spool.close()
        return empty
