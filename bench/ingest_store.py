"""Ingest rate of the collector's store, and its lookup time by query id afterwards.

Synthetic batches of --batch events are built up front, so the figure covers only
Store.ingest (protobuf -> Arrow -> DuckDB, one commit per batch) into a fresh file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from collector.store import Store
from qtrace.api.v1 import events_pb2

EVENTS_PER_QUERY = 40
KINDS = ("pread64", "pwrite64", "sendto", "recvfrom", "block_rq", "fsync")


def query_id(n: int) -> str:
    # Random-looking, like real ids: sequential ones would let DuckDB's per-row-group
    # min/max skip the scan and flatter the lookup.
    return hashlib.blake2b(n.to_bytes(8), digest_size=16).hexdigest()


def make_batches(n_events: int, batch_size: int, agents: int) -> list[events_pb2.EventBatch]:
    rng = random.Random(1)
    batches = []
    t0 = time.time_ns()
    for i in range(0, n_events, batch_size):
        agent = (i // batch_size) % agents
        events = []
        for j in range(i, min(i + batch_size, n_events)):
            # Most events carry the query being served; the rest (background I/O) none.
            has_query = j % 10 != 0
            events.append(
                events_pb2.Event(
                    ts_ns=t0 + j * 1000,
                    dur_ns=rng.randrange(1000, 1_000_000),
                    kind=KINDS[j % len(KINDS)],
                    pid=1000 + agent,
                    tid=1000 + j % 16,
                    comm="searchd",
                    fd=3 + j % 50,
                    target=f"/data/shard-{j % 8}/seg-{j % 97}.idx",
                    has_target=j % 7 != 0,
                    ret=4096,
                    query_id=query_id(j // EVENTS_PER_QUERY) if has_query else "",
                    has_query_id=has_query,
                    request_key=j // EVENTS_PER_QUERY,
                    inferred=j % 3 == 0,
                    group="storage" if j % 2 else "net",
                    cgroup_id=4242,
                    mono_ns=j * 1000,
                    detail_json=json.dumps({"bytes": 4096}) if j % 5 == 0 else "",
                )
            )
        batches.append(
            events_pb2.EventBatch(
                agent_id=f"agent-{agent}",
                node=f"node-{agent}",
                session_id="bench",
                seq=i // batch_size // agents + 1,
                events=events,
                drops=[events_pb2.DropCounter(kind=k, produced=i, received=i) for k in KINDS],
            )
        )
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--lookups", type=int, default=20)
    a = ap.parse_args()

    batches = make_batches(a.events, a.batch, a.agents)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        with Store(path) as store:
            start = time.perf_counter()
            for b in batches:
                store.ingest(b, time.time_ns())
            elapsed = time.perf_counter() - start
            assert store.events_stored() == a.events
            print(
                f"ingest: {a.events} events in {len(batches)} batches of {a.batch}: "
                f"{elapsed:.2f} s, {a.events / elapsed:,.0f} rows/s"
            )

            rng = random.Random(2)
            n_queries = a.events // EVENTS_PER_QUERY
            times = []
            found = 0
            for _ in range(a.lookups):
                qid = query_id(rng.randrange(n_queries))
                start = time.perf_counter()
                events, _ = store.query_events(qid, 1000)
                times.append(time.perf_counter() - start)
                found += len(events)
            print(
                f"lookup by query_id: median {statistics.median(times) * 1e3:.2f} ms, "
                f"max {max(times) * 1e3:.2f} ms over {a.lookups} lookups "
                f"({found / a.lookups:.0f} events each)"
            )
        size = path.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob("*.wal"))
        print(f"file: {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
