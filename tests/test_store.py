"""The collector's store, on real DuckDB files."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from collector.store import QUERY_EVENTS, Store
from qtrace.api.v1 import events_pb2, sessions_pb2

REPO = Path(__file__).resolve().parent.parent


OFFSET = -250


def event(**fields: Any) -> events_pb2.Event:
    defaults: dict[str, Any] = {
        "ts_ns": 1_700_000_000_000_000_000,
        "dur_ns": 1500,
        "kind": "pread64",
        "pid": 42,
        "tid": 43,
        "comm": "searchd",
        "fd": 7,
        "target": "/data/seg-1.idx",
        "has_target": True,
        "ret": 4096,
        "query_id": "q1",
        "has_query_id": True,
        "request_key": 9,
        "inferred": False,
        "group": "storage",
        "cgroup_id": 4242,
        "mono_ns": 1000,
    }
    return events_pb2.Event(**(defaults | fields))


def batch(
    seq: int,
    events: list[events_pb2.Event],
    agent_id: str = "agent-a",
    node: str = "node-a",
    session_id: str = "s1",
    drops: list[events_pb2.DropCounter] | None = None,
) -> events_pb2.EventBatch:
    return events_pb2.EventBatch(
        agent_id=agent_id,
        node=node,
        session_id=session_id,
        seq=seq,
        events=events,
        drops=drops or [],
        clock_offset_ns=OFFSET,
        clock_uncertainty_ns=30,
        sent_ns=5,
    )


def on_collector_clock(events: list[events_pb2.Event]) -> list[events_pb2.Event]:
    out = []
    for e in events:
        c = events_pb2.Event()
        c.CopyFrom(e)
        c.ts_ns += OFFSET
        out.append(c)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "qtrace.duckdb") as s:
        yield s


def test_events_round_trip_in_time_order(store: Store) -> None:
    t = 1_700_000_000_000_000_000
    # Every field set, at the edges of its type, and out of order on the wire.
    late = event(
        ts_ns=t + 20,
        dur_ns=-1,
        kind="sendto",
        pid=2**32 - 1,
        tid=2**32 - 2,
        comm="worker-7",
        fd=-1,
        target="",
        has_target=False,
        ret=-11,
        request_key=2**64 - 1,
        inferred=True,
        group="net",
        cgroup_id=2**63 + 5,
        mono_ns=2**64 - 2,
        detail_json='{"bytes": 512, "flags": ["MSG_NOSIGNAL"]}',
    )
    tie_second = event(ts_ns=t + 10, mono_ns=600, target="", has_target=True)
    tie_first = event(ts_ns=t + 10, mono_ns=500, detail_json="{}")
    earliest = event(ts_ns=t)
    other_query = event(query_id="q2")
    no_query = event(query_id="", has_query_id=False)
    assert store.ingest(batch(1, [late, tie_second, other_query, no_query]), 99) == (4, False)
    assert store.ingest(batch(1, [tie_first], agent_id="agent-b", node="node-b"), 99) == (
        1,
        False,
    )
    assert store.ingest(batch(2, [earliest]), 99) == (1, False)

    got, truncated = store.query_events("q1", 100)

    assert not truncated
    # Stored on the collector's clock: each batch carries its agent's offset (-250).
    assert [e.event for e in got] == on_collector_clock([earliest, tie_first, tie_second, late])
    assert [(e.node, e.agent_id, e.session_id) for e in got] == [
        ("node-a", "agent-a", "s1"),
        ("node-b", "agent-b", "s1"),
        ("node-a", "agent-a", "s1"),
        ("node-a", "agent-a", "s1"),
    ]
    assert store.events_stored() == 6
    assert store.count_events(kind="sendto") == 1
    assert store.count_events(session_id="s1", kind="pread64") == 5
    assert store.count_events(session_id="other") == 0


def test_limit_and_truncated(store: Store) -> None:
    events = [event(ts_ns=i, mono_ns=i) for i in range(5)]
    store.ingest(batch(1, events), 0)

    expected = on_collector_clock(events)
    got, truncated = store.query_events("q1", 5)
    assert ([e.event for e in got], truncated) == (expected, False)
    got, truncated = store.query_events("q1", 4)
    assert ([e.event for e in got], truncated) == (expected[:4], True)
    assert store.query_events("q1", 0) == ([], True)
    assert store.query_events("unknown", 10) == ([], False)


def test_query_events_uses_the_index(tmp_path: Path) -> None:
    path = tmp_path / "qtrace.duckdb"
    with Store(path) as store:
        for seq in range(1, 11):
            events = [event(query_id=f"q{seq}-{i % 100}", ts_ns=i) for i in range(1000)]
            store.ingest(batch(seq, events), 0)

    # DuckDB picks an index scan at run time: only EXPLAIN ANALYZE shows it.
    with duckdb.connect(str(path), read_only=True) as con:
        explain = "EXPLAIN ANALYZE " + QUERY_EVENTS
        [(_, plan)] = con.execute(explain, {"query_id": "q3-7", "limit": 11}).fetchall()
    assert "Index Scan" in plan


def test_duplicate_batch_stores_nothing_even_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "qtrace.duckdb"
    with Store(path) as store:
        assert store.ingest(batch(1, [event(), event()]), 1) == (2, False)
        # Same (agent_id, seq), different content: still the batch already stored.
        assert store.ingest(batch(1, [event()] * 3), 2) == (0, True)
        assert store.events_stored() == 2
        # Sequence numbers are per agent.
        assert store.ingest(batch(1, [event()], agent_id="agent-b"), 3) == (1, False)

    with Store(path) as store:
        assert store.ingest(batch(1, [event(), event()]), 4) == (0, True)
        assert store.events_stored() == 3
        [a, b] = store.session_stats()
        assert (a.agent_id, a.batches, a.events_stored) == ("agent-a", 1, 2)
        assert (b.agent_id, b.batches, b.events_stored) == ("agent-b", 1, 1)


def test_drops_keep_the_latest_cumulative_values(store: Store) -> None:
    def drop(kind: str, n: int) -> events_pb2.DropCounter:
        return events_pb2.DropCounter(
            kind=kind,
            produced=10 * n,
            received=9 * n,
            lost_ringbuf=n,
            lost_mapfull=2 * n,
            filtered=3 * n,
            lost_agent=4 * n,
        )

    store.ingest(batch(1, [event()], drops=[drop("pread64", 1)]), 0)
    store.ingest(batch(3, [event()], drops=[drop("pread64", 5), drop("sendto", 2)]), 0)
    # Seq 2 arrives last (a resend after a reconnect): its older totals must not win.
    store.ingest(batch(2, [event()] * 2, drops=[drop("pread64", 3), drop("sendto", 1)]), 0)
    store.ingest(batch(1, [event()], agent_id="agent-b", node="node-b", session_id="s2"), 0)

    [stats] = store.session_stats("s1")

    assert (stats.session_id, stats.agent_id, stats.node) == ("s1", "agent-a", "node-a")
    assert (stats.events_stored, stats.batches, stats.duplicates) == (4, 3, 0)
    assert list(stats.drops) == [drop("pread64", 5), drop("sendto", 2)]
    assert stats.dropped == (1 + 2 + 4) * (5 + 2)
    [s1, s2] = store.session_stats()
    assert s1 == stats
    assert (s2.session_id, s2.node, s2.events_stored, list(s2.drops), s2.dropped) == (
        "s2",
        "node-b",
        1,
        [],
        0,
    )


def test_sessions_save_replace_and_load(tmp_path: Path) -> None:
    path = tmp_path / "qtrace.duckdb"
    first = sessions_pb2.Session(
        id="s1",
        targets=sessions_pb2.Targets(pids=[1, 2], comms=["searchd"], label_selector="app=x"),
        probes=["net", "storage"],
        extractor=sessions_pb2.Extractor(header="X-Query-Id", capture_bytes=256),
        created_ns=10,
        expires_ns=20,
        started_by="alice",
        state=sessions_pb2.SESSION_STATE_ACTIVE,
    )
    second = sessions_pb2.Session(id="s2", extractor=sessions_pb2.Extractor(regex="q=(\\w+)"))
    with Store(path) as store:
        assert store.load_sessions() == []
        store.save_session(first)
        store.save_session(second)
        first.state = sessions_pb2.SESSION_STATE_STOPPED
        first.stopped_ns = 15
        store.save_session(first)
        assert store.load_sessions() == [first, second]

    with Store(path) as store:
        assert store.load_sessions() == [first, second]


class FailingStore(Store):
    """Fails after the batch row and the events are in, before the commit."""

    fail = True

    def _insert_events(self, b: events_pb2.EventBatch, dedupe: bool = False) -> int:
        n = super()._insert_events(b, dedupe)
        if self.fail:
            raise RuntimeError("disk on fire")
        return n


def test_failed_ingest_leaves_nothing_behind(tmp_path: Path) -> None:
    drops = [events_pb2.DropCounter(kind="pread64", produced=3, lost_ringbuf=1)]
    b = batch(1, [event(), event()], drops=drops)
    with FailingStore(tmp_path / "qtrace.duckdb") as store:
        with pytest.raises(RuntimeError, match="disk on fire"):
            store.ingest(b, 0)

        assert store.events_stored() == 0
        assert store.session_stats() == []

        store.fail = False
        assert store.ingest(b, 0) == (2, False)
        assert store.events_stored() == 2
        [stats] = store.session_stats()
        assert (stats.batches, list(stats.drops)) == (1, drops)


def test_concurrent_ingest_from_threads(store: Store) -> None:
    def ship(agent: str) -> None:
        for seq in range(1, 21):
            store.ingest(batch(seq, [event()] * 10, agent_id=agent), 0)

    threads = [threading.Thread(target=ship, args=(f"agent-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert store.events_stored() == 4 * 20 * 10
    assert [s.batches for s in store.session_stats()] == [20] * 4


CRASHING_INGESTER = """
import sys
from collector.store import QUERY_EVENTS, Store
from qtrace.api.v1 import events_pb2

store = Store(sys.argv[1])
for seq in range(1, 10_000):
    # Sizes vary so that a torn batch could not pass for a whole one.
    n = 2000 + seq * 37 % 1000
    events = [
        events_pb2.Event(ts_ns=i, kind="pread64", query_id=f"q{i % 50}", has_query_id=True)
        for i in range(n)
    ]
    store.ingest(events_pb2.EventBatch(agent_id="a", seq=seq, events=events), seq)
    print("ok", flush=True)
"""


def test_batches_survive_sigkill_whole(tmp_path: Path) -> None:
    path = tmp_path / "qtrace.duckdb"
    acked = 5
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_INGESTER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for _ in range(acked):
            assert proc.stdout.readline() == "ok\n"
        # The writer holds the file: a second process must not open it.
        with pytest.raises(duckdb.IOException):
            Store(path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with Store(path) as store:
        [stats] = store.session_stats()
        assert stats.batches >= acked
        assert store.events_stored() == stats.events_stored
        assert store.ingest(events_pb2.EventBatch(agent_id="a", seq=1), 0) == (0, True)
    # Whole batch by batch, not just in total.
    with duckdb.connect(str(path), read_only=True) as con:
        torn = con.execute(
            "SELECT b.seq FROM batches b LEFT JOIN events e USING (agent_id, seq)"
            " GROUP BY b.seq, b.n_events HAVING count(e.seq) <> b.n_events"
        ).fetchall()
    assert torn == []


def test_a_file_from_an_older_collector_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    # The first release's batches and events, before final/error/request existed.
    con.execute(
        "CREATE TABLE batches (agent_id VARCHAR NOT NULL, node VARCHAR NOT NULL,"
        " session_id VARCHAR NOT NULL, seq UBIGINT NOT NULL, n_events UINTEGER NOT NULL,"
        " received_ns BIGINT NOT NULL, clock_offset_ns BIGINT NOT NULL,"
        " clock_uncertainty_ns BIGINT NOT NULL)"
    )
    con.execute("INSERT INTO batches VALUES ('a0', 'n', 's1', 1, 0, 1, 0, 0)")
    con.close()
    with Store(path) as s:
        assert s.ingest(batch(2, [event(ts_ns=5)], agent_id="a0"), 9) == (1, False)
        (stats,) = s.session_stats("s1")
        assert (stats.batches, stats.events_stored, stats.complete, stats.error) == (
            2, 1, False, ""
        )  # fmt: skip
