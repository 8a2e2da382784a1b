"""Flight recorder, collector side: ask the agents of every node a query touched for the
recorded detail of its window, once the query turns out to matter.

A fetch goes down the agent's own Ingest stream; the answer comes back up it as ordinary
batches (stored exactly once, like any other) closed by one that carries the result. A
window the agent's history no longer holds whole is recorded as such, and explain says so.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from collector.explain import WRITER_LOOKBACK_NS
from collector.store import Store
from qtrace.api.v1 import events_pb2

# Around the query's hops: what explain looks at before them (who rewrote a file it read,
# a CPU wait that began before the request was read) and the neighbours just after.
BEFORE_NS = WRITER_LOOKBACK_NS
AFTER_NS = 100_000_000
DEFAULT_WAIT_S = 10.0
WANT_FOR_S = 30.0
RETRY_S = 1.0


class Fetcher:
    def __init__(
        self,
        store: Store,
        store_lock: threading.Lock,
        agent: Callable[[str], Any],
    ) -> None:
        """``agent(agent_id)``: the connected agent's state (its ``outbox`` and clock
        offset), or None."""
        self._store = store
        self._store_lock = store_lock
        self._agent = agent
        self._cv = threading.Condition()
        self._pending: dict[str, str] = {}  # fetch_id -> query_id
        # Queries reported before their summaries arrived (an agent reads a request's
        # summary once it has been idle a second): retried until this deadline.
        self._wanted: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._retry, name="qtrace-fetch", daemon=True)
        self._thread.start()

    def want(self, query_ids: list[str]) -> None:
        """Fetch these queries' detail as soon as their summaries are in (anomalies)."""
        deadline = time.monotonic() + WANT_FOR_S
        with self._cv:
            for q in query_ids:
                self._wanted[q] = deadline
            self._cv.notify_all()

    def _retry(self) -> None:
        while not self._stop.wait(RETRY_S):
            now = time.monotonic()
            with self._cv:
                wanted = [q for q, d in self._wanted.items() if d > now]
                self._wanted = {q: self._wanted[q] for q in wanted}
            for q in wanted:
                if self.request(q):
                    with self._cv:
                        self._wanted.pop(q, None)

    def close(self) -> None:
        self._stop.set()

    def request(self, query_id: str, wait_s: float = 0.0) -> bool:
        """Fetch the query's detail from every node whose summary names it, unless it was
        fetched (or is being fetched) already; with ``wait_s``, until the answers are in.
        False when no summary names it (yet)."""
        with self._store_lock:
            summaries = self._store.summaries(query_id)
            if not summaries:
                return False
            asked = {
                (f["session_id"], f["agent_id"])
                for f in self._store.fetches(query_id)
                if not f["error"]
            }
        windows: dict[tuple[str, str, str], tuple[int, int]] = {}
        for sid, node, agent_id, start, end in summaries:
            lo, hi = windows.get((sid, node, agent_id), (start, end))
            windows[(sid, node, agent_id)] = (min(lo, start), max(hi, end))
        for (sid, node, agent_id), (lo, hi) in windows.items():
            if (sid, agent_id) in asked:
                continue
            state = self._agent(agent_id)
            fetch_id = uuid.uuid4().hex[:16]
            row: dict[str, Any] = {
                "fetch_id": fetch_id,
                "query_id": query_id,
                "session_id": sid,
                "node": node,
                "agent_id": agent_id,
                "requested_ns": time.time_ns(),
                "from_ns": lo - BEFORE_NS,
                "to_ns": hi + AFTER_NS,
            }
            if state is None or not state.connected or state.outbox is None:
                row |= {
                    "done_ns": time.time_ns(),
                    "complete": False,
                    "error": f"the agent on {node} ({agent_id}) is not connected",
                }
                with self._store_lock:
                    self._store.add_fetch(row)
                continue
            with self._store_lock:
                self._store.add_fetch(row)
            with self._cv:
                self._pending[fetch_id] = query_id
            offset = state.clock_offset_ns  # the agent's events were moved by it on ingest
            state.outbox.put(
                events_pb2.CollectorMessage(
                    fetch=events_pb2.FetchRequest(
                        fetch_id=fetch_id,
                        session_id=sid,
                        query_id=query_id,
                        from_ns=row["from_ns"] - offset,
                        to_ns=row["to_ns"] - offset,
                    )
                )
            )
        if wait_s:
            # Also for fetches already under way (an anomaly report asked a moment ago).
            with self._cv:
                self._cv.wait_for(lambda: query_id not in self._pending.values(), wait_s)
        return True

    def answered(self, batch: events_pb2.EventBatch, offset_ns: int) -> None:
        """The batch closing a fetch was stored (call with the store lock held)."""
        self._store.finish_fetch(batch.fetched, time.time_ns(), offset_ns)
        with self._cv:
            self._pending.pop(batch.fetched.fetch_id, None)
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)
