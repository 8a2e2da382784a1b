"""Node clocks refined by happens-before pairs: a node whose stored clock puts receives
before their sends is moved, on a real DuckDB store, and the explanation carries it."""

from __future__ import annotations

from pathlib import Path

from collector.clocks import Aligner, solve
from collector.explain import explain
from collector.store import Store
from qtrace.api.v1.events_pb2 import Event
from tests.test_store import batch, event

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
ROOT, LEAF = "10.0.0.1:5000", "10.0.0.2:80"


def exchange(qid: str, t: int, skew: int) -> tuple[list[Event], list[Event]]:
    """One root->leaf sub-request: the root writes at t and reads the answer at t+3ms; the
    leaf reads the request at t+1ms and answers at t+2ms, on a clock ``skew`` off."""
    fwd, back = f"{ROOT}->{LEAF}", f"{LEAF}->{ROOT}"
    common = {"query_id": qid, "group": "net", "fd": 5}
    root = [
        event(ts_ns=t - 5 * MS, dur_ns=1000, kind="read", target="1.1.1.1:9->10.0.0.1:8080",
              pid=1, tid=1, comm="root", **common),
        event(ts_ns=t, dur_ns=10_000, kind="write", target=fwd, pid=1, tid=1, comm="root",
              **common),
        event(ts_ns=t + 10_000, dur_ns=3 * MS - 10_000, kind="read", target=fwd, pid=1, tid=1,
              comm="root", **common),
    ]  # fmt: skip
    leaf = [
        event(ts_ns=t + skew, dur_ns=1 * MS, kind="read", target=back, pid=2, tid=2,
              comm="leaf", **common),
        event(ts_ns=t + 2 * MS + skew, dur_ns=10_000, kind="write", target=back, pid=2, tid=2,
              comm="leaf", **common),
    ]  # fmt: skip
    return root, leaf


def test_solve_moves_a_node_to_the_nearest_consistent_shift() -> None:
    # root -> leaf: shift(leaf) > 4 ms; leaf -> root: shift(root) - shift(leaf) > -6 ms.
    a = solve([("root", "leaf", 4 * MS), ("leaf", "root", -6 * MS)])
    assert 4 * MS < relative(a.shifts, "leaf", "root") < 6 * MS
    assert a.uncertainty_ns == 2 * MS
    # Consistent already: nothing moves.
    a = solve([("root", "leaf", -1 * MS), ("leaf", "root", -1 * MS)])
    assert not any(a.shifts.values())
    # Contradictory (a clock stepped mid-session): left alone.
    assert not any(solve([("root", "leaf", 5 * MS), ("leaf", "root", 5 * MS)]).shifts.values())


def test_solve_follows_chains_of_nodes() -> None:
    # The root talks to two mid-tier nodes; "deep" talks only to mid-a, whose clock is
    # 3 ms behind the root's; deep's is 7 ms behind mid-a's (10 ms behind the root's).
    bounds = [
        ("root", "mid-a", 2 * MS), ("mid-a", "root", -4 * MS),
        ("root", "mid-b", -1 * MS), ("mid-b", "root", -1 * MS),
        ("root", "mid-c", -1 * MS), ("mid-c", "root", -1 * MS),
        ("mid-a", "deep", 6 * MS), ("deep", "mid-a", -8 * MS),
    ]  # fmt: skip
    a = solve(bounds)
    assert a.reference == "root"
    assert 2 * MS < relative(a.shifts, "mid-a", "root") < 4 * MS
    assert 6 * MS < relative(a.shifts, "deep", "mid-a") < 8 * MS, a.shifts
    assert 8 * MS < relative(a.shifts, "deep", "root") < 12 * MS
    assert relative(a.shifts, "mid-b", "root") == 0
    for x, y, b in bounds:  # every pair's bound holds after the shifts
        assert relative(a.shifts, y, x) > b, (x, y)
    assert 4 * MS - 10 <= a.uncertainty_ns <= 4 * MS  # deep, through mid-a: (8 ms, 12 ms)
    # A contradiction along a chain (each pair fine alone): nothing moves.
    cycle = [("root", "mid-a", 2 * MS), ("mid-a", "deep", 2 * MS), ("deep", "root", 2 * MS)]
    assert not any(solve(cycle).shifts.values())


def relative(shifts: dict[str, int], node: str, ref: str) -> int:
    return shifts.get(node, 0) - shifts.get(ref, 0)


def test_a_skewed_node_is_aligned_in_explanations(tmp_path: Path) -> None:
    skew = -4 * MS  # the leaf's stored clock is 4 ms behind: it reads before root wrote
    with Store(tmp_path / "q.duckdb") as store:
        roots, leaves = [], []
        for i in range(30):
            r, lf = exchange(f"q{i}", T0 + i * 10 * MS, skew)
            roots += r
            leaves += lf
        store.ingest(batch(1, roots, agent_id="a", node="node-root"), 0)
        store.ingest(batch(1, leaves, agent_id="b", node="node-leaf"), 0)
        a = Aligner(store).alignment("s1")
        # Bytes must arrive after they were sent and answers before they are read.
        assert 3 * MS < relative(a.shifts, "node-leaf", "node-root") < 5 * MS
        x = explain(store, "q7", [])
        root = next(h for h in x["hops"] if h["comm"] == "root")
        leaf = next(h for h in x["hops"] if h["comm"] == "leaf")
        assert root["start_ns"] <= leaf["start_ns"] and leaf["end_ns"] <= root["end_ns"]
        assert x["completeness"]["clock_uncertainty_ns"] <= 30
        # The query's events come back aligned too: the request arrives after it was sent.
        events, _, _ = Aligner(store).events("q7", 100)
        at = {(ne.node, ne.event.kind): ne.event for ne in events}
        sent, received = at[("node-root", "write")], at[("node-leaf", "read")]
        assert sent.ts_ns < received.ts_ns + received.dur_ns
        assert [ne.event.ts_ns for ne in events] == sorted(ne.event.ts_ns for ne in events)


def test_agent_wall_clock_slews_small_differences_and_steps_big_ones() -> None:
    from agent.clock import MAX_SLEW_NS, STEP_NS, WallClock

    clock = WallClock(refresh_s=3600)
    base = clock.offset_ns
    # A 370 µs disagreement (a loose bracket on a loaded machine, or a real slew) moves
    # the offset by at most the slew per refresh, so a hop's events stay in order.
    clock.follow(base + 370_000, 1_000)
    assert clock.offset_ns == base + MAX_SLEW_NS
    assert clock.uncertainty_ns == 1_000 + 370_000 - MAX_SLEW_NS
    clock.follow(base - 10_000, 1_000)
    assert clock.offset_ns == base
    # A measurement looser than the slew says nothing.
    clock.follow(base + 30_000, MAX_SLEW_NS + 1)
    assert clock.offset_ns == base
    # A clock that was set is followed at once.
    clock.follow(base + 2 * STEP_NS, 1_000)
    assert (clock.offset_ns, clock.uncertainty_ns) == (base + 2 * STEP_NS, 1_000)


def test_collector_offset_estimate_slews_as_round_trips_come_and_go() -> None:
    from agent.clock import MAX_SLEW_NS
    from agent.shipper import ClockEstimate
    from qtrace.api.v1 import events_pb2

    est = ClockEstimate(keep=2)
    s = 10**9

    def ack(sent: int, offset: int, rtt: int) -> events_pb2.BatchAck:
        t1 = sent + rtt // 2 + offset
        return events_pb2.BatchAck(batch_sent_ns=sent, received_ns=t1, sent_ns=t1)

    est.add(ack(1 * s, 0, 100_000), 1 * s + 100_000)
    assert est.offset_ns == 0
    # A sample whose lopsided round trip says +300 µs becomes the tightest one a second
    # later: the offset applied to batches moves by the slew, not by the whole 300 µs.
    est.add(ack(2 * s, 300_000, 10_000), 2 * s + 10_000)
    assert 0 < est.offset_ns <= MAX_SLEW_NS + 1
    assert est.uncertainty_ns >= 300_000 - est.offset_ns


def test_collector_offset_estimate_steps_when_provably_wrong() -> None:
    from agent.shipper import WRONG_NS, ClockEstimate
    from qtrace.api.v1 import events_pb2

    est = ClockEstimate(keep=32)
    s = 10**9

    def ack(sent: int, forward: int, back: int, offset: int) -> events_pb2.BatchAck:
        t1 = sent + forward + offset
        return events_pb2.BatchAck(batch_sent_ns=sent, received_ns=t1, sent_ns=t1)

    # The first ack waited 7 ms on the way back (a loaded CPU): the estimate is 3.5 ms off.
    est.add(ack(1 * s, 50_000, 7_000_000, 8_000_000), 1 * s + 7_050_000)
    assert abs(est.offset_ns - 8_000_000) > 3 * WRONG_NS
    # A tight round trip a second later proves it wrong by more than WRONG_NS: step.
    est.add(ack(2 * s, 50_000, 50_000, 8_000_000), 2 * s + 100_000)
    assert abs(est.offset_ns - 8_000_000) <= 50_000
    assert est.uncertainty_ns <= 50_001
