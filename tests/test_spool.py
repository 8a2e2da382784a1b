"""The agent's on-disk spool with real files, and the shipper over it with a real collector."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import duckdb
import grpc
import pytest

from agent.model import Event
from agent.shipper import Shipper, process_rss
from agent.spool import SUFFIX, Spool, SpoolError, read_batches
from collector.server import serve
from qtrace.api.v1 import events_pb2, services_pb2, services_pb2_grpc, sessions_pb2
from tests.procs import QTRACE, wait_for


def batch(seq: int, n: int = 10, agent: str = "a1", sid: str = "s1") -> events_pb2.EventBatch:
    return events_pb2.EventBatch(
        agent_id=agent,
        node="n",
        session_id=sid,
        seq=seq,
        events=[
            events_pb2.Event(ts_ns=10**18 + i, kind="pread64", pid=7, tid=7, mono_ns=seq * 1000 + i)
            for i in range(n)
        ],
    )


def segments(d: Path) -> list[Path]:
    return sorted(d.glob(f"seg-*{SUFFIX}"))


def test_batches_come_back_in_order_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20, segment_bytes=2048)
    for seq in range(1, 21):
        assert spool.append(batch(seq)) is not None
    assert len(segments(tmp_path)) > 3, "small segments should have rolled"
    spool.close()
    again = Spool(tmp_path, 1 << 20, segment_bytes=2048)
    entries = again.recovered.entries
    assert [e.seq for e in entries] == list(range(1, 21))
    assert [again.read(e) for e in entries] == [batch(s) for s in range(1, 21)]
    assert read_batches(tmp_path) == [batch(s) for s in range(1, 21)]
    again.close()


def test_a_segment_goes_once_all_its_batches_are_acked(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20, segment_bytes=2048)
    entries = [spool.append(batch(seq)) for seq in range(1, 21)]
    first = entries[0]
    assert first is not None
    same_segment = [e for e in entries if e is not None and e.segment is first.segment]
    assert 1 < len(same_segment) < 20
    for e in same_segment[:-1]:
        spool.ack(e)
        assert first.segment.path.exists()
    spool.ack(same_segment[-1])
    assert not first.segment.path.exists()
    for rest in entries[len(same_segment) :]:
        assert rest is not None
        spool.ack(rest)
    assert segments(tmp_path) == [] and spool.used_bytes == 0
    # Appending after everything was acked starts a new segment.
    assert spool.append(batch(21)) is not None and len(segments(tmp_path)) == 1
    spool.close()


def test_a_full_spool_refuses_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, 64 * 1024)
    written = 0
    while spool.append(batch(written + 1, n=50)) is not None:
        written += 1
    assert 0 < written < 100
    assert spool.error is not None and "full" in spool.error
    assert spool.append(batch(written + 2, n=50)) is None
    assert sum(p.stat().st_size for p in segments(tmp_path)) <= 64 * 1024
    assert len([r for r in caplog.records if "full" in r.getMessage()]) == 1, "said once"
    spool.close()


def test_a_torn_tail_is_cut_off_and_earlier_batches_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20, segment_bytes=4096)
    for seq in range(1, 11):
        spool.append(batch(seq))
    spool.close()
    last = segments(tmp_path)[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-7])  # the process died in the middle of writing a record
    again = Spool(tmp_path, 1 << 20, segment_bytes=4096)
    assert [e.seq for e in again.recovered.entries] == list(range(1, 10))
    assert 0 < again.recovered.torn_bytes < len(data)
    # Writing goes on after the last whole record: no garbage is left between them.
    again.append(batch(11))
    again.close()
    assert [b.seq for b in read_batches(tmp_path)] == [*range(1, 10), 11]


def test_a_corrupt_record_keeps_the_batches_before_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    entries = [spool.append(batch(seq)) for seq in range(1, 6)]
    spool.close()
    third = entries[2]
    assert third is not None
    with third.segment.path.open("r+b") as f:
        f.seek(third.offset + 5)
        f.write(b"\xff\xff\xff")  # a flipped payload: the CRC no longer matches
    again = Spool(tmp_path, 1 << 20)
    assert [e.seq for e in again.recovered.entries] == [1, 2]
    again.close()


def test_one_agent_per_directory(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    with pytest.raises(SpoolError, match="in use by another agent"):
        Spool(tmp_path, 1 << 20)
    spool.close()
    Spool(tmp_path, 1 << 20).close()


def test_agent_refuses_an_unusable_spool_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = subprocess.run(
        [QTRACE, "agent", "run", "--collector", "127.0.0.1:1", "--spool-dir", str(blocker / "x")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert "cannot use spool directory" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [QTRACE, "agent", "run", "--spool-dir", str(tmp_path), "--spool-max-bytes", "lots"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "--spool-max-bytes must be a size" in r.stderr


# -- the shipper over the spool, against a real collector ------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, db: Path, port: int) -> None:
        self.db = db
        self.server, self.collector, self.port = serve(f"127.0.0.1:{port}", db)

    def stop(self) -> None:
        self.collector.stop()
        self.server.stop(grace=None).wait()
        self.collector.store.close()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def channel(port: int) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield ch
    ch.close()


def start_session(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        s = services_pb2_grpc.ControlServiceStub(ch).StartSession(
            services_pb2.StartSessionRequest(
                targets=sessions_pb2.Targets(pids=[1]), duration_ns=600 * 10**9
            )
        )
    return str(s.id)


def events(n: int, base: int = 0) -> list[Event]:
    return [
        Event(10**18 + base + i, 1, "pwrite64", 7, 7, "w", 3, None, 0, None, 0, False,
              "storage", 1, base + i)
        for i in range(n)
    ]  # fmt: skip


def stored(db: Path) -> tuple[int, int, int]:
    """(events, distinct (agent, seq, mono_ns), batches) in a stopped collector's file."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        row = con.execute(
            "SELECT count(*), count(DISTINCT (agent_id, seq, mono_ns)) FROM events"
        ).fetchone()
        nb = con.execute("SELECT count(*) FROM batches").fetchone()
    finally:
        con.close()
    assert row is not None and nb is not None
    return int(row[0]), int(row[1]), int(nb[0])


def no_drops(_sid: str) -> list[events_pb2.DropCounter]:
    return []


def test_unreachable_collector_spills_and_replays_in_order(
    tmp_path: Path, port: int, channel: grpc.Channel
) -> None:
    served = Served(tmp_path / "c.duckdb", port)
    sid = start_session(port)
    served.stop()
    spool = Spool(tmp_path / "spool", 1 << 30)
    shipper = Shipper(channel, "agent-1", "n", no_drops, batch_events=100, spool=spool).start()
    wait_for(lambda: shipper.down, 30, "the shipper to notice the collector is gone")
    for k in range(20):
        shipper.add(sid, events(100, k * 100))
    assert shipper.queued() == (20, 20), "all 20 batches should be on disk only"
    assert len(read_batches(tmp_path / "spool")) == 20
    served = Served(tmp_path / "c.duckdb", port)
    try:
        assert shipper.wait_empty(30)
        assert segments(tmp_path / "spool") == [], "acked segments are deleted"
    finally:
        shipper.close()
        served.stop()
    assert stored(tmp_path / "c.duckdb") == (2000, 2000, 20)


def test_a_dead_agents_spool_is_shipped_once_and_its_session_closed(
    tmp_path: Path, port: int, channel: grpc.Channel
) -> None:
    served = Served(tmp_path / "c.duckdb", port)
    sid = start_session(port)
    # What a killed agent left: 10 batches on disk, the first 4 already stored.
    dead = Spool(tmp_path / "spool", 1 << 30)
    for seq in range(1, 11):
        dead.append(batch(seq, n=50, agent="dead-1", sid=sid))
    dead.close()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = services_pb2_grpc.AgentServiceStub(ch)
        msgs = [events_pb2.AgentMessage(batch=batch(s, 50, "dead-1", sid)) for s in range(1, 5)]
        assert len(list(stub.Ingest(iter(msgs), timeout=30))) == 4
    spool = Spool(tmp_path / "spool", 1 << 30)
    shipper = Shipper(channel, "agent-2", "n", no_drops, spool=spool).start()
    try:
        shipper.add(sid, events(30))
        shipper.flush_all()
        assert shipper.wait_empty(30)
        stats = {a.agent_id: a for a in served.collector.store.session_stats(sid)}
        assert stats["dead-1"].complete and "died while tracing" in stats["dead-1"].error
        assert stats["dead-1"].events_stored == 500
        assert stats["agent-2"].events_stored == 30
    finally:
        shipper.close()
        served.stop()
    assert segments(tmp_path / "spool") == []
    n, distinct, _ = stored(tmp_path / "c.duckdb")
    assert n == distinct == 530


def test_near_the_memory_cap_batches_go_to_disk(
    tmp_path: Path, port: int, channel: grpc.Channel
) -> None:
    served = Served(tmp_path / "c.duckdb", port)
    sid = start_session(port)
    served.stop()  # nothing is acked: whatever the shipper keeps, it must keep somewhere
    spool = Spool(tmp_path / "spool", 1 << 30)
    # A cap this process is already over: the real RSS, read through psutil.
    shipper = Shipper(
        channel, "agent-1", "n", no_drops, batch_events=100, spool=spool,
        memory_cap=process_rss(), spill_bytes=1 << 30,
    ).start()  # fmt: skip
    try:
        wait_for(lambda: shipper.down, 30, "the shipper to notice the collector is gone")
        shipper.flush()
        assert shipper.pressure
        for k in range(10):
            shipper.add(sid, events(100, k * 100))
        assert shipper.queued() == (10, 10)
    finally:
        shipper.close()


def test_spool_full_is_counted_per_session(
    tmp_path: Path, port: int, channel: grpc.Channel
) -> None:
    served = Served(tmp_path / "c.duckdb", port)
    sid = start_session(port)
    served.stop()
    spool = Spool(tmp_path / "spool", 64 * 1024)
    shipper = Shipper(
        channel, "agent-1", "n", no_drops, batch_events=100, spool=spool, spill_bytes=0
    ).start()
    try:
        wait_for(lambda: shipper.down, 30, "the shipper to notice the collector is gone")
        for k in range(50):
            shipper.add(sid, events(100, k * 100))
        total, on_disk = shipper.queued()
        lost = shipper.lost_spool[sid]
        assert total == 50 and 0 < on_disk < 50
        assert lost > 0 and lost + shipper.pending() == 5000 and lost % 100 == 0
    finally:
        shipper.close()
    assert os.path.getsize(segments(tmp_path / "spool")[0]) > 0
