"""Ingest throughput over gRPC: several agent connections into one collector's store.

Starts `qtrace collector run` as its own process (as deployed), then N sender processes,
each one agent connection streaming pre-built batches of realistic events and reading
acks. Prints events/s stored, end to end, from the moment all senders start at once."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from qtrace.api.v1 import events_pb2, services_pb2, services_pb2_grpc, sessions_pb2

QTRACE = str(Path(sys.executable).parent / "qtrace")


def make_batch(agent: str, sid: str, seq: int, n: int) -> events_pb2.EventBatch:
    base = time.time_ns()
    events = []
    for i in range(n):
        k = seq * n + i
        events.append(
            events_pb2.Event(
                ts_ns=base + i * 1000,
                dur_ns=2500,
                kind="pread64",
                pid=4242,
                tid=4250 + i % 8,
                comm="qt-leaf",
                fd=7,
                target="/srv/index/shard-2.idx",
                has_target=True,
                ret=512,
                query_id=f"{agent}-q{k // 40:09d}",
                has_query_id=True,
                request_key=k,
                group="storage",
                cgroup_id=1234,
                mono_ns=base + i,
            )
        )
    return events_pb2.EventBatch(agent_id=agent, node=agent, session_id=sid, seq=seq, events=events)


def sender(addr: str, agent: str, sid: str, batches: int, size: int, out: Any, go: Any) -> None:
    prebuilt = [make_batch(agent, sid, s + 1, size) for s in range(batches)]
    channel = grpc.insecure_channel(addr)
    stub = services_pb2_grpc.AgentServiceStub(channel)

    def msgs() -> Iterator[events_pb2.AgentMessage]:
        yield events_pb2.AgentMessage(hello=events_pb2.Hello(agent_id=agent, node=agent))
        for b in prebuilt:
            yield events_pb2.AgentMessage(batch=b)

    go.wait()  # all senders start streaming at once, their batches already built
    stored = 0
    for m in stub.Ingest(msgs()):
        stored += m.ack.stored
    out.put(stored)
    channel.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--batches", type=int, default=60, help="per agent")
    ap.add_argument("--batch-events", type=int, default=5000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cmd = [QTRACE, "collector", "run", "--db", f"{d}/b.duckdb", "--listen", "127.0.0.1:0"]
        col = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        assert col.stderr is not None
        m = re.search(r":(\d+),", col.stderr.readline())
        assert m, "collector did not start"
        addr = f"127.0.0.1:{m.group(1)}"
        try:
            ctl = services_pb2_grpc.ControlServiceStub(grpc.insecure_channel(addr))
            targets = sessions_pb2.Targets(pids=[1])
            sid = ctl.StartSession(services_pb2.StartSessionRequest(targets=targets)).id
            q: Any = mp.Queue()
            go: Any = mp.Barrier(a.agents + 1)
            procs = [
                mp.Process(
                    target=sender, args=(addr, f"agent{i}", sid, a.batches, a.batch_events, q, go)
                )
                for i in range(a.agents)
            ]
            for p in procs:
                p.start()
            go.wait(timeout=600)
            t0 = time.monotonic()
            total = sum(q.get(timeout=600) for _ in procs)
            wall = time.monotonic() - t0
            for p in procs:
                p.join()
        finally:
            col.terminate()
            col.wait()
    expected = a.agents * a.batches * a.batch_events
    print(f"agents={a.agents} batch={a.batch_events} events={total} (expected {expected})")
    print(f"ingest over gRPC into DuckDB: {total / wall:,.0f} events/s (wall {wall:.1f}s)")


if __name__ == "__main__":
    main()
