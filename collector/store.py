"""The collector's event store: one embedded DuckDB file, owned by one process.

Ingest goes through Arrow tables because DuckDB's row-at-a-time paths (executemany) are
about a thousand times slower. The only index is on events.query_id, the one lookup that
must be fast; the other tables stay small (a row per batch, per drop kind, per session),
so they are scanned instead of paying for an index on every insert.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import duckdb
import pyarrow as pa

from qtrace.api.v1 import anomalies_pb2, events_pb2, services_pb2, sessions_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    agent_id VARCHAR NOT NULL,
    node VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    seq UBIGINT NOT NULL,
    n_events UINTEGER NOT NULL,
    received_ns BIGINT NOT NULL,
    clock_offset_ns BIGINT NOT NULL,
    clock_uncertainty_ns BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    node VARCHAR NOT NULL,
    agent_id VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    seq UBIGINT NOT NULL,
    ts_ns BIGINT NOT NULL,
    dur_ns BIGINT NOT NULL,
    kind VARCHAR NOT NULL,
    pid UINTEGER NOT NULL,
    tid UINTEGER NOT NULL,
    comm VARCHAR NOT NULL,
    fd INTEGER NOT NULL,
    target VARCHAR,
    ret BIGINT NOT NULL,
    query_id VARCHAR,
    request_key UBIGINT NOT NULL,
    inferred BOOLEAN NOT NULL,
    grp VARCHAR NOT NULL,
    cgroup_id UBIGINT NOT NULL,
    mono_ns UBIGINT NOT NULL,
    detail VARCHAR
);
CREATE INDEX IF NOT EXISTS events_query_id ON events (query_id);
CREATE TABLE IF NOT EXISTS drops (
    session_id VARCHAR NOT NULL,
    agent_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    produced UBIGINT NOT NULL,
    received UBIGINT NOT NULL,
    lost_ringbuf UBIGINT NOT NULL,
    lost_mapfull UBIGINT NOT NULL,
    filtered UBIGINT NOT NULL,
    lost_agent UBIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id VARCHAR NOT NULL,
    state INTEGER NOT NULL,
    expires_ns BIGINT NOT NULL,
    pb BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS anomalies (
    query_id VARCHAR NOT NULL,
    type INTEGER NOT NULL,
    session_id VARCHAR NOT NULL,
    ts_ns BIGINT NOT NULL,
    source VARCHAR NOT NULL,
    received_ns BIGINT NOT NULL,
    pb BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS fetches (
    fetch_id VARCHAR NOT NULL,
    query_id VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    node VARCHAR NOT NULL,
    agent_id VARCHAR NOT NULL,
    requested_ns BIGINT NOT NULL,
    from_ns BIGINT NOT NULL,
    to_ns BIGINT NOT NULL,
    done_ns BIGINT,
    complete BOOLEAN,
    covered_from_ns BIGINT,
    events UINTEGER,
    error VARCHAR
);
-- Columns added after the first release: a file made by an older collector gains them
-- when it is opened, instead of failing every read that names them.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS final BOOLEAN DEFAULT false;
ALTER TABLE batches ADD COLUMN IF NOT EXISTS error VARCHAR;
ALTER TABLE events ADD COLUMN IF NOT EXISTS request BLOB;
ALTER TABLE drops ADD COLUMN IF NOT EXISTS lost_spool UBIGINT DEFAULT 0;
ALTER TABLE drops ADD COLUMN IF NOT EXISTS shed UBIGINT DEFAULT 0;
ALTER TABLE drops ADD COLUMN IF NOT EXISTS recorded UBIGINT DEFAULT 0;
ALTER TABLE events ADD COLUMN IF NOT EXISTS namespace VARCHAR;
ALTER TABLE events ADD COLUMN IF NOT EXISTS pod VARCHAR;
ALTER TABLE events ADD COLUMN IF NOT EXISTS container VARCHAR;
"""

EVENT_SCHEMA = pa.schema(
    [
        ("node", pa.string()),
        ("agent_id", pa.string()),
        ("session_id", pa.string()),
        ("seq", pa.uint64()),
        ("ts_ns", pa.int64()),
        ("dur_ns", pa.int64()),
        ("kind", pa.string()),
        ("pid", pa.uint32()),
        ("tid", pa.uint32()),
        ("comm", pa.string()),
        ("fd", pa.int32()),
        ("target", pa.string()),
        ("ret", pa.int64()),
        ("query_id", pa.string()),
        ("request_key", pa.uint64()),
        ("inferred", pa.bool_()),
        ("grp", pa.string()),
        ("cgroup_id", pa.uint64()),
        ("mono_ns", pa.uint64()),
        ("detail", pa.string()),
        ("request", pa.binary()),
        ("namespace", pa.string()),
        ("pod", pa.string()),
        ("container", pa.string()),
    ]
)

COUNTERS = (
    "produced", "received", "lost_ringbuf", "lost_mapfull", "filtered", "lost_agent", "lost_spool",
    "shed", "recorded",
)  # fmt: skip
LOSSES = ("lost_ringbuf", "lost_mapfull", "lost_agent", "lost_spool")

DROP_SCHEMA = pa.schema(
    [("session_id", pa.string()), ("agent_id", pa.string()), ("kind", pa.string())]
    + [(c, pa.uint64()) for c in COUNTERS]
)

# Counters are cumulative, so a batch delayed behind a later one must not move them back.
MERGE_DROPS = f"""
MERGE INTO drops USING (
    SELECT session_id, agent_id, kind, {", ".join(f"max({c}) AS {c}" for c in COUNTERS)}
    FROM new_drops GROUP BY ALL
) AS n
ON drops.session_id = n.session_id AND drops.agent_id = n.agent_id AND drops.kind = n.kind
WHEN MATCHED THEN UPDATE SET {", ".join(f"{c} = greatest(drops.{c}, n.{c})" for c in COUNTERS)}
WHEN NOT MATCHED THEN INSERT BY NAME
"""

INSERT_NEW_EVENTS = """
INSERT INTO events BY NAME SELECT * FROM new_events n
WHERE n.grp = 'summary' OR NOT EXISTS (
  SELECT 1 FROM events e
  WHERE e.session_id = n.session_id AND e.node = n.node AND e.mono_ns = n.mono_ns
    AND e.tid = n.tid AND e.kind = n.kind AND e.grp <> 'summary'
)
"""

QUERY_COLUMNS = (
    "node, agent_id, session_id, ts_ns, dur_ns, kind, pid, tid, comm, fd, target, ret, "
    "query_id, request_key, inferred, grp, cgroup_id, mono_ns, detail, namespace, pod, container"
)

# Written straight, as WHERE ... ORDER BY ... LIMIT, DuckDB pushes the top-n bound into the
# scan as a second filter and then never uses the index: every row group is read (6 ms at
# 5M events, growing with the file). The materialized CTE keeps the lookup on its own.
QUERY_EVENTS = f"""
WITH q AS MATERIALIZED (SELECT {QUERY_COLUMNS} FROM events WHERE query_id = $query_id)
SELECT * FROM q WHERE grp <> 'summary' ORDER BY ts_ns, mono_ns LIMIT $limit
"""


class Store:
    """Batches, events, drop counters and sessions in one DuckDB file.

    Open one Store per file: DuckDB makes opening a file another process holds fail
    (duckdb.IOException), and the duplicate check relies on there being one writer.
    Every method takes the store's lock, as a DuckDB connection must not be used by two
    threads at once.
    """

    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._con = duckdb.connect(str(path))
        try:
            self._con.execute(SCHEMA)
        except BaseException:
            self._con.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ingest(
        self, batch: events_pb2.EventBatch, received_ns: int, dedupe: bool = False
    ) -> tuple[int, bool]:
        """Stores the batch, its events and its drop counters in one transaction.

        Returns (events stored, duplicate). A batch whose (agent_id, seq) is already in
        the file stores nothing: agents resend batches whose ack they did not see.
        """
        with self._lock:
            self._con.begin()
            try:
                duplicate = self._is_stored(batch.agent_id, batch.seq)
                if not duplicate:
                    stored = self._insert_events(batch, dedupe)
                    self._insert_batch_row(batch, received_ns, stored)
                    self._merge_drops(batch)
                self._con.commit()
            except BaseException:
                self._con.rollback()
                raise
        return (0, True) if duplicate else (stored, False)

    def _is_stored(self, agent_id: str, seq: int) -> bool:
        # No key constraint backs this: a primary key would be a second index. The check is
        # enough because it runs in the inserting transaction, under the lock, and only one
        # Store (one process) writes the file.
        row = self._con.execute(
            "SELECT 1 FROM batches WHERE agent_id = ? AND seq = ?", [agent_id, seq]
        ).fetchone()
        return row is not None

    def _insert_batch_row(
        self, batch: events_pb2.EventBatch, received_ns: int, stored: int
    ) -> None:
        self._con.execute(
            "INSERT INTO batches (agent_id, node, session_id, seq, n_events, received_ns,"
            " clock_offset_ns, clock_uncertainty_ns, final, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                batch.agent_id,
                batch.node,
                batch.session_id,
                batch.seq,
                stored,
                received_ns,
                batch.clock_offset_ns,
                batch.clock_uncertainty_ns,
                batch.final,
                batch.error or None,
            ],
        )

    def _insert_events(self, batch: events_pb2.EventBatch, dedupe: bool = False) -> int:
        """Returns how many were stored: all of them, but with ``dedupe`` those stored
        before. Flight recorder: two fetches whose windows overlap both carry the events
        of the overlap; an event is one (node, thread, kind, kernel start), kept once."""
        if not batch.events:
            return 0
        sql = INSERT_NEW_EVENTS if dedupe else "INSERT INTO events BY NAME SELECT * FROM new_events"
        return self._run_on("new_events", events_table(batch), sql)

    def _merge_drops(self, batch: events_pb2.EventBatch) -> None:
        if batch.drops:
            self._run_on("new_drops", drops_table(batch), MERGE_DROPS)

    def _run_on(self, name: str, data: pa.Table, sql: str) -> int:
        """Runs sql with the Arrow table visible under name; returns the rows it changed."""
        self._con.register(name, data)
        try:
            row = self._con.execute(sql).fetchone()
        finally:
            self._con.unregister(name)
        return int(row[0]) if row else 0

    def query_events(self, query_id: str, limit: int) -> tuple[list[services_pb2.NodeEvent], bool]:
        """The query's events on every node in time order, at most `limit` of them, and
        whether more were left out."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._lock:
            rows = self._con.execute(
                QUERY_EVENTS, {"query_id": query_id, "limit": limit + 1}
            ).fetchall()
        return [node_event(r) for r in rows[:limit]], len(rows) > limit

    def save_session(self, s: sessions_pb2.Session) -> None:
        with self._lock:
            self._con.begin()
            try:
                self._con.execute("DELETE FROM sessions WHERE id = ?", [s.id])
                self._con.execute(
                    "INSERT INTO sessions (id, state, expires_ns, pb) VALUES (?, ?, ?, ?)",
                    [s.id, s.state, s.expires_ns, s.SerializeToString()],
                )
                self._con.commit()
            except BaseException:
                self._con.rollback()
                raise

    # -- explain: hops, baselines and context ----------------------------------------------

    def hops(
        self,
        session_id: str | None,
        node: str | None,
        comm: str | None,
        query_ids: Sequence[str] | None = None,
        limit: int = 5000,
    ) -> list[dict[str, Any]]:
        """Per (query, node, pid): the hop's span and where its time went.

        A hop starts when its first event (the read that received the request) ends: on a
        keep-alive connection that read began long before, while the thread idled."""
        conds: list[str] = []
        params: list[Any] = []
        for col, val in (("session_id", session_id), ("node", node), ("comm", comm)):
            if val is not None:
                conds.append(f"{col} = ?")
                params.append(val)
        if query_ids is not None:
            conds.append("query_id IN (SELECT unnest(?))")
            params.append(list(query_ids))
        else:
            conds.append("query_id IS NOT NULL")
        where = " AND ".join(conds)
        # A hop runs from the end of the read that received the request to the end of the
        # last write on that same connection (the response); work its threads did after
        # answering (a late sub-request, say) is not the hop's.
        sql = f"""
            WITH ev AS (
              SELECT query_id, node, pid, tid, comm, ts_ns, dur_ns, kind, grp, target
              FROM events WHERE {where} AND grp <> 'summary'
            ),
            first AS (
              -- the request read: the hop's first network event (a CPU wait or a pipe read
              -- of its thread may come before it)
              SELECT query_id, node, pid,
                coalesce(arg_min(tid, ts_ns) FILTER (WHERE grp = 'net'), arg_min(tid, ts_ns))
                  AS tid,
                arg_min(comm, ts_ns) AS comm,
                coalesce(arg_min(ts_ns + dur_ns, ts_ns) FILTER (WHERE grp = 'net'),
                  arg_min(ts_ns + dur_ns, ts_ns)) AS start_ns,
                arg_min(target, ts_ns) FILTER (WHERE grp = 'net') AS conn,
                max(ts_ns + dur_ns) AS last_end
              FROM ev GROUP BY ALL
            ),
            spans AS (
              SELECT f.query_id, f.node, f.pid, f.tid, f.comm, f.start_ns, f.conn,
                coalesce(max(e.ts_ns + e.dur_ns) FILTER (WHERE e.target = f.conn
                  AND e.kind IN ('sendto', 'write', 'writev', 'sendmsg', 'sendfile64')),
                  f.last_end) AS end_ns
              FROM first f JOIN ev e USING (query_id, node, pid)
              GROUP BY f.query_id, f.node, f.pid, f.tid, f.comm, f.start_ns, f.conn, f.last_end
            ),
            early AS (
              -- a CPU wait that began before the request was read and ended inside the hop
              SELECT s.query_id, s.node, s.pid,
                sum(least(r.ts_ns + r.dur_ns, s.end_ns) - s.start_ns) AS early_ns
              FROM spans s JOIN ev r ON r.kind = 'runq' AND r.query_id = s.query_id
                AND r.node = s.node AND r.pid = s.pid AND r.ts_ns < s.start_ns
                AND r.ts_ns + r.dur_ns > s.start_ns
              GROUP BY ALL
            )
            -- time inside the hop only: a wait that outlived the answer counts up to it
            SELECT s.query_id, s.node, s.pid, s.tid, s.comm, s.start_ns, s.end_ns,
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.grp = 'net'), 0),
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.grp = 'storage' AND e.kind <> 'block_rq'), 0),
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.kind = 'block_rq'), 0),
              count(e.ts_ns), s.conn,
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.kind = 'runq'), 0)
              + coalesce(max(x.early_ns), 0),
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.grp = 'lock' OR e.kind = 'mmap_lock'), 0),
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.kind = 'page_fault'), 0),
              -- asleep outside traced syscalls, or in a pipe's (the kernel stops tracing a
              -- pipe once the agent has told it what the fd is)
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.kind = 'offcpu' OR e.grp = 'other'), 0),
              -- the request thread asleep while its own helper threads waited on something
              -- (a fan-out joining its sub-requests) is not a cause of its own
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE (e.kind = 'offcpu' OR e.grp = 'other') AND e.tid = s.tid), 0),
              coalesce(sum(least(e.ev_end, s.end_ns) - e.ts_ns)
                FILTER (WHERE e.tid <> s.tid AND e.kind <> 'block_rq' AND e.kind <> 'offcpu'
                  AND e.grp IN ('net', 'storage', 'lock', 'sched', 'memory')), 0)
            FROM spans s LEFT JOIN (
              SELECT *, ts_ns + dur_ns AS ev_end FROM ev
            ) e ON e.query_id = s.query_id AND e.node = s.node
              AND e.pid = s.pid AND e.ts_ns >= s.start_ns AND e.ts_ns < s.end_ns
            LEFT JOIN early x ON x.query_id = s.query_id AND x.node = s.node AND x.pid = s.pid
            GROUP BY ALL
            UNION ALL
            -- flight recorder: a hop whose detail was not fetched is its kernel summary
            SELECT query_id, node, pid, tid, comm, ts_ns, ts_ns + dur_ns,
              {summary_cols("network, storage, block_io")},
              CAST(detail->>'events' AS BIGINT), target,
              {summary_cols("runqueue, lock, page_fault, offcpu, offcpu_main, waits_others")}
            FROM events sm WHERE {where} AND grp = 'summary' AND NOT EXISTS (
              SELECT 1 FROM ev d WHERE d.query_id = sm.query_id AND d.node = sm.node
                AND d.pid = sm.pid)
            ORDER BY 7 DESC LIMIT {int(limit)}"""
        with self._lock:
            rows = self._con.execute(sql, params + params).fetchall()
        keys = ("query_id", "node", "pid", "tid", "comm", "start_ns", "end_ns", "network",
                "storage", "block_io", "events", "conn", "runqueue", "lock", "page_fault",
                "offcpu", "offcpu_main", "waits_others")  # fmt: skip
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def targets_seen(
        self, session_id: str, node: str, comm: str, exclude: Sequence[str], limit: int = 2000
    ) -> set[str]:
        """Files and peers that normal queries of this kind of hop touched (a sample)."""
        with self._lock:
            rows = self._con.execute(
                "SELECT DISTINCT target FROM (SELECT target FROM events WHERE session_id = ?"
                " AND node = ? AND comm = ? AND query_id IS NOT NULL AND target IS NOT NULL"
                " AND NOT list_contains(?, query_id) ORDER BY ts_ns DESC LIMIT ?)",
                [session_id, node, comm, list(exclude), limit * 50],
            ).fetchall()
        return {r[0] for r in rows}

    def window_events(
        self,
        node: str,
        start_ns: int,
        end_ns: int,
        targets: Sequence[str],
        exclude_query: str,
        limit: int = 500,
    ) -> list[services_pb2.NodeEvent]:
        """Events of other threads and processes on the same node, in the window, on the
        same files or connections: who else used the resource."""
        if not targets:
            return []
        with self._lock:
            rows = self._con.execute(
                f"SELECT {QUERY_COLUMNS} FROM events WHERE node = ? AND ts_ns <= ?"
                " AND ts_ns + dur_ns >= ? AND list_contains(?, target)"
                " AND (query_id IS NULL OR query_id <> ?) ORDER BY ts_ns LIMIT ?",
                [node, end_ns, start_ns, list(targets), exclude_query, limit],
            ).fetchall()
        return [node_event(r) for r in rows]

    def kind_in_window(
        self, node: str, start_ns: int, end_ns: int, kind: str, limit: int = 2000
    ) -> list[services_pb2.NodeEvent]:
        """Every event of one kind on a node that overlaps a window (any query)."""
        with self._lock:
            rows = self._con.execute(
                f"SELECT {QUERY_COLUMNS} FROM events WHERE node = ? AND kind = ?"
                " AND ts_ns <= ? AND ts_ns + dur_ns >= ? ORDER BY ts_ns LIMIT ?",
                [node, kind, end_ns, start_ns, limit],
            ).fetchall()
        return [node_event(r) for r in rows]

    def happens_before(self, session_id: str, sample: int = 200_000) -> list[tuple[str, str, int]]:
        """(writer node X, reader node Y, bound): the shift of Y's clock minus X's must
        exceed ``bound``, since bytes written on a connection on X (first write's start)
        arrive before the read that receives them on Y ends. From the session's latest
        cross-node exchanges of the same query on the same connection."""
        with self._lock:
            rows = self._con.execute(
                """
                WITH net AS (
                  SELECT query_id, node, target, kind, ts_ns, ts_ns + dur_ns AS te FROM events
                  WHERE session_id = ? AND query_id IS NOT NULL AND grp = 'net'
                    AND contains(target, '->') AND kind IN ('write', 'writev', 'sendto',
                      'sendmsg', 'read', 'readv', 'recvfrom', 'recvmsg')
                  ORDER BY ts_ns DESC LIMIT ?
                ),
                w AS (
                  SELECT query_id, node, target, min(ts_ns) AS t FROM net
                  WHERE kind IN ('write', 'writev', 'sendto', 'sendmsg') GROUP BY ALL
                ),
                r AS (
                  SELECT query_id, node, target, min(te) AS t FROM net
                  WHERE kind IN ('read', 'readv', 'recvfrom', 'recvmsg') GROUP BY ALL
                )
                SELECT w.node, r.node, max(w.t - r.t) FROM w JOIN r
                  ON w.query_id = r.query_id AND w.node <> r.node
                  AND r.target = split_part(w.target, '->', 2) || '->'
                    || split_part(w.target, '->', 1)
                GROUP BY ALL
                """,
                [session_id, sample],
            ).fetchall()
        return [(str(a), str(b), int(bound)) for a, b, bound in rows]

    def clock_uncertainty(self, session_id: str) -> int:
        with self._lock:
            row = self._con.execute(
                "SELECT coalesce(max(clock_uncertainty_ns), 0) FROM batches WHERE session_id = ?",
                [session_id],
            ).fetchone()
        return int(row[0]) if row else 0

    def list_requests(self, session_id: str) -> list[services_pb2.CapturedRequest]:
        with self._lock:
            rows = self._con.execute(
                "SELECT node, pid, comm, ts_ns, coalesce(query_id, ''), request,"
                " coalesce(target, '') FROM events"
                " WHERE session_id = ? AND request IS NOT NULL ORDER BY ts_ns, mono_ns",
                [session_id],
            ).fetchall()
        return [
            services_pb2.CapturedRequest(
                node=r[0], pid=r[1], comm=r[2], ts_ns=r[3], query_id=r[4], request=r[5], target=r[6]
            )
            for r in rows
        ]

    def add_anomalies(self, anomalies: Sequence[anomalies_pb2.Anomaly], received_ns: int) -> int:
        """Anomalies are few (one per bad query): plain rows, one transaction."""
        rows = [
            (
                a.query_id,
                a.type,
                a.session_id,
                a.ts_ns,
                a.source,
                received_ns,
                a.SerializeToString(),
            )
            for a in anomalies
        ]
        with self._lock:
            self._con.begin()
            try:
                self._con.executemany("INSERT INTO anomalies VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._con.commit()
            except BaseException:
                self._con.rollback()
                raise
        return len(rows)

    def list_anomalies(
        self, session_id: str | None = None, query_id: str | None = None
    ) -> list[anomalies_pb2.Anomaly]:
        where, params = _filter(session_id=session_id, query_id=query_id)
        with self._lock:
            rows = self._con.execute(
                f"SELECT pb FROM anomalies {where} ORDER BY ts_ns, received_ns", params
            ).fetchall()
        return [anomalies_pb2.Anomaly.FromString(r[0]) for r in rows]

    def query_sessions(self, query_ids: list[str]) -> dict[str, set[str]]:
        """The sessions whose events carry each of these query ids."""
        found: dict[str, set[str]] = {}
        with self._lock:
            for q in dict.fromkeys(query_ids):  # one point lookup each: the query_id index
                rows = self._con.execute(
                    "SELECT DISTINCT session_id FROM events WHERE query_id = ?", [q]
                ).fetchall()
                found[q] = {str(sid) for (sid,) in rows}
        return found

    def load_sessions(self) -> list[sessions_pb2.Session]:
        with self._lock:
            rows = self._con.execute("SELECT pb FROM sessions ORDER BY id").fetchall()
        return [sessions_pb2.Session.FromString(pb) for (pb,) in rows]

    def session_stats(self, session_id: str | None = None) -> list[services_pb2.SessionAgentStats]:
        """Per (session, agent): what was stored and what was lost on the way.

        `duplicates` stays 0: resent batches leave no trace in the file.
        """
        where, params = _filter(session_id=session_id)
        with self._lock:
            totals = self._con.execute(
                "SELECT session_id, agent_id, arg_max(node, seq), sum(n_events), count(*),"
                " bool_or(final), arg_max(coalesce(error, ''), seq)"
                f" FROM batches {where} GROUP BY ALL ORDER BY session_id, agent_id",
                params,
            ).fetchall()
            drops = self._con.execute(
                f"SELECT session_id, agent_id, kind, {', '.join(COUNTERS)} FROM drops {where}"
                " ORDER BY kind",
                params,
            ).fetchall()
        by_agent: dict[tuple[str, str], list[events_pb2.DropCounter]] = {}
        for sid, aid, kind, *counts in drops:
            counter = events_pb2.DropCounter(kind=kind, **dict(zip(COUNTERS, counts, strict=True)))
            by_agent.setdefault((sid, aid), []).append(counter)
        stats = []
        for sid, aid, node, n_events, n_batches, final, error in totals:
            agent_drops = by_agent.get((sid, aid), [])
            stats.append(
                services_pb2.SessionAgentStats(
                    session_id=sid,
                    agent_id=aid,
                    node=node,
                    events_stored=n_events,
                    batches=n_batches,
                    drops=agent_drops,
                    dropped=sum(getattr(d, c) for d in agent_drops for c in LOSSES),
                    shed=sum(d.shed for d in agent_drops),
                    complete=final,
                    error=error,
                )
            )
        return stats

    # -- flight recorder: request summaries and fetches ------------------------------------

    def summaries(self, query_id: str) -> list[tuple[str, str, str, int, int]]:
        """(session_id, node, agent_id, start_ns, end_ns) of the query's request summaries,
        on the collector's clock."""
        with self._lock:
            rows = self._con.execute(
                "WITH q AS MATERIALIZED (SELECT session_id, node, agent_id, ts_ns, dur_ns, grp"
                " FROM events WHERE query_id = ?)"
                " SELECT session_id, node, agent_id, ts_ns, ts_ns + dur_ns FROM q"
                " WHERE grp = 'summary' ORDER BY ts_ns",
                [query_id],
            ).fetchall()
        return [(str(a), str(b), str(c), int(d), int(e)) for a, b, c, d, e in rows]

    def add_fetch(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        with self._lock:
            self._con.execute(
                f"INSERT INTO fetches ({cols}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )

    def finish_fetch(self, result: events_pb2.FetchResult, done_ns: int, offset_ns: int) -> None:
        with self._lock:
            self._con.execute(
                "UPDATE fetches SET done_ns = ?, complete = ?, covered_from_ns = ?, events = ?,"
                " error = ? WHERE fetch_id = ?",
                [
                    done_ns,
                    result.complete and not result.error,
                    result.covered_from_ns + offset_ns if result.covered_from_ns else None,
                    result.events,
                    result.error or None,
                    result.fetch_id,
                ],
            )

    def fetches(self, query_id: str) -> list[dict[str, Any]]:
        """Every fetch made for the query, oldest first."""
        keys = ("fetch_id", "session_id", "node", "agent_id", "requested_ns", "from_ns", "to_ns",
                "done_ns", "complete", "covered_from_ns", "events", "error")  # fmt: skip
        with self._lock:
            rows = self._con.execute(
                f"SELECT {', '.join(keys)} FROM fetches WHERE query_id = ? ORDER BY requested_ns",
                [query_id],
            ).fetchall()
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def events_stored(self) -> int:
        return self.count_events()

    def count_events(self, session_id: str | None = None, kind: str | None = None) -> int:
        where, params = _filter(session_id=session_id, kind=kind)
        with self._lock:
            row = self._con.execute(f"SELECT count(*) FROM events {where}", params).fetchone()
        assert row is not None
        return int(row[0])


def summary_cols(names: str) -> str:
    return ", ".join(f"CAST(detail->>'{n.strip()}' AS BIGINT)" for n in names.split(","))


def events_table(batch: events_pb2.EventBatch) -> pa.Table:
    """The batch's events as columns, in the events table's layout."""
    # A plain list: each pass over the protobuf container itself costs about as much as
    # the attribute reads, and there are twenty passes.
    evs = list(batch.events)
    n = len(evs)
    columns: list[Sequence[Any]] = [
        [batch.node] * n,
        [batch.agent_id] * n,
        [batch.session_id] * n,
        [batch.seq] * n,
        # On the collector's clock: the agent measured its offset on this stream.
        [e.ts_ns + batch.clock_offset_ns for e in evs],
        [e.dur_ns for e in evs],
        [e.kind for e in evs],
        [e.pid for e in evs],
        [e.tid for e in evs],
        [e.comm for e in evs],
        [e.fd for e in evs],
        [e.target if e.has_target else None for e in evs],
        [e.ret for e in evs],
        [e.query_id if e.has_query_id else None for e in evs],
        [e.request_key for e in evs],
        [e.inferred for e in evs],
        [e.group for e in evs],
        [e.cgroup_id for e in evs],
        [e.mono_ns for e in evs],
        [e.detail_json or None for e in evs],
        [e.request or None for e in evs],
        [e.namespace or None for e in evs],
        [e.pod or None for e in evs],
        [e.container or None for e in evs],
    ]
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, EVENT_SCHEMA, strict=True)],
        schema=EVENT_SCHEMA,
    )


def drops_table(batch: events_pb2.EventBatch) -> pa.Table:
    ds = batch.drops
    data: dict[str, list[Any]] = {
        "session_id": [batch.session_id] * len(ds),
        "agent_id": [batch.agent_id] * len(ds),
        "kind": [d.kind for d in ds],
    }
    for c in COUNTERS:
        data[c] = [getattr(d, c) for d in ds]
    return pa.table(data, schema=DROP_SCHEMA)


def node_event(row: tuple[Any, ...]) -> services_pb2.NodeEvent:
    """A row of QUERY_COLUMNS back in its wire form."""
    (node, agent_id, session_id, ts_ns, dur_ns, kind, pid, tid, comm, fd, target, ret,
     query_id, request_key, inferred, grp, cgroup_id, mono_ns, detail, namespace, pod,
     container) = row  # fmt: skip
    event = events_pb2.Event(
        ts_ns=ts_ns,
        dur_ns=dur_ns,
        kind=kind,
        pid=pid,
        tid=tid,
        comm=comm,
        fd=fd,
        target=target or "",
        has_target=target is not None,
        ret=ret,
        query_id=query_id or "",
        has_query_id=query_id is not None,
        request_key=request_key,
        inferred=inferred,
        group=grp,
        cgroup_id=cgroup_id,
        mono_ns=mono_ns,
        detail_json=detail or "",
        namespace=namespace or "",
        pod=pod or "",
        container=container or "",
    )
    return services_pb2.NodeEvent(node=node, agent_id=agent_id, session_id=session_id, event=event)


def _filter(**conditions: str | None) -> tuple[str, list[str]]:
    """A WHERE clause matching every condition that is not None."""
    given = {col: v for col, v in conditions.items() if v is not None}
    if not given:
        return "", []
    return "WHERE " + " AND ".join(f"{col} = ?" for col in given), list(given.values())
