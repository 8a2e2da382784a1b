"""Hostile input: property-based fuzzing of the gRPC ingest, the query-id extractors, the
query-log and capture parsers, and markup in query ids reaching HTML and the terminal.

Bounded for CI by the "ci" hypothesis profile (tests/conftest.py); HYPOTHESIS_PROFILE=fuzz
runs the same properties far longer."""

from __future__ import annotations

import html.parser
import io
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.extract import QueryIdExtractor
from collector.server import MAX_BATCH_EVENTS, MAX_MESSAGE_BYTES, Collector, serve
from qtrace.api.v1 import anomalies_pb2, events_pb2, services_pb2, services_pb2_grpc, sessions_pb2
from qtrace.commands.capture import parse_http
from qtrace.queryid import MAX_ID_LEN, is_valid_query_id
from qtrace.replay.querylog import METHODS, BadLine, Request, Template, read
from tests.procs import QTRACE, qtrace, qtrace_json
from tests.procs import Collector as CollectorProc

INGEST = "/qtrace.api.v1.AgentService/Ingest"
# What the server may answer to bad input: a status saying what is wrong. Never UNKNOWN
# (a handler raised) nor INTERNAL (grpcio's own refusal of bytes that do not parse, which
# leaked the call: collector.server.UNPARSABLE).
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# --------------------------------------------------------------------------------------
# gRPC ingest


@dataclass
class Server:
    collector: Collector
    channel: grpc.Channel
    session_id: str

    def consistent(self) -> int:
        """Events stored; asserts every stored batch has exactly its events, no more, no
        fewer (no batch is ever stored in part)."""
        con = self.collector.store._con
        with self.collector._store_lock, self.collector.store._lock:
            bad = con.execute(
                """
                SELECT count(*) FROM
                  (SELECT agent_id, seq, count(*) AS n FROM events GROUP BY ALL) e
                  FULL JOIN batches b USING (agent_id, seq)
                WHERE coalesce(e.n, 0) <> coalesce(b.n_events, -1)
                """
            ).fetchone()
            n = con.execute("SELECT count(*) FROM events").fetchone()
        assert bad == (0,), "a batch was stored in part, or events without their batch"
        assert n is not None
        return int(n[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("hostile") / "c.duckdb"
    srv, collector, port = serve("127.0.0.1:0", db)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]
    )
    ctl = services_pb2_grpc.ControlServiceStub(channel)
    s = ctl.StartSession(
        services_pb2.StartSessionRequest(
            targets=sessions_pb2.Targets(pids=[1]), duration_ns=3600 * 10**9
        )
    )
    yield Server(collector, channel, s.id)
    channel.close()
    collector.stop()
    # Every call ended: a leaked one (see collector.server.UNPARSABLE) would hold this.
    assert srv.stop(grace=None).wait(30), "the server could not stop"
    assert not srv._state.rpc_states  # type: ignore[attr-defined]
    collector.store.close()


def send_raw(channel: grpc.Channel, payloads: list[bytes]) -> tuple[grpc.StatusCode, str, int]:
    """Raw bytes as Ingest messages: (status, details, acks received)."""
    # No serializers: bytes go out as they are.
    call: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(INGEST)
    acks = 0
    try:
        for _ in call(iter(payloads), timeout=30):
            acks += 1
    except grpc.RpcError as e:
        return e.code(), e.details() or "", acks
    return grpc.StatusCode.OK, "", acks


def send(server: Server, batch: events_pb2.EventBatch) -> events_pb2.BatchAck | grpc.RpcError:
    stub = services_pb2_grpc.AgentServiceStub(server.channel)
    try:
        acks = list(stub.Ingest(iter([events_pb2.AgentMessage(batch=batch)]), timeout=30))
    except grpc.RpcError as e:
        return e
    assert len(acks) == 1
    return acks[0].ack


def check_refusal(code: grpc.StatusCode, details: str) -> None:
    assert code in REFUSALS, f"{code}: {details}"


I64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(max_size=200)  # hypothesis leaves out surrogates, as protobuf must
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
DETAIL = st.one_of(
    st.just(""),
    st.dictionaries(TEXT, JSON_VALUE, max_size=4).map(json.dumps),
    TEXT,
    # Deep nesting: a JSON parser's recursion, not a data error.
    st.integers(500, 50_000).map(lambda n: '{"a":' + "[" * n + "]" * n + "}"),
)
EVENT = st.builds(
    events_pb2.Event,
    ts_ns=I64 | st.integers(1, 2**62),
    dur_ns=I64 | st.integers(0, 10**9),
    kind=st.sampled_from(["read", "pread64", "sendto", ""]) | st.text(max_size=80),
    pid=U32,
    tid=U32,
    comm=TEXT,
    fd=I32,
    target=TEXT,
    has_target=st.booleans(),
    ret=I64,
    query_id=TEXT,
    has_query_id=st.booleans(),
    request_key=U64,
    inferred=st.booleans(),
    group=TEXT,
    cgroup_id=U64,
    mono_ns=U64,
    detail_json=DETAIL,
    request=st.binary(max_size=300),
)
DROP = st.builds(
    events_pb2.DropCounter,
    kind=TEXT,
    produced=U64,
    received=U64,
    lost_ringbuf=U64,
    lost_mapfull=U64,
    filtered=U64,
    lost_agent=U64,
)
BATCH = st.builds(
    events_pb2.EventBatch,
    agent_id=TEXT,
    node=TEXT,
    session_id=TEXT,
    seq=U64,
    events=st.lists(EVENT, max_size=4),
    drops=st.lists(DROP, max_size=3),
    clock_offset_ns=I64,
    clock_uncertainty_ns=I64,
    sent_ns=I64,
    final=st.booleans(),
    error=TEXT,
)

# Module-scoped fixtures are shared by every example on purpose (one server, one store).
SHARED = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@SHARED
@given(batch=BATCH, live_session=st.booleans())
def test_ingest_structured_garbage(
    server: Server, batch: events_pb2.EventBatch, live_session: bool
) -> None:
    if live_session:
        batch.session_id = server.session_id
    before = server.consistent()
    got = send(server, batch)
    after = server.consistent()
    if isinstance(got, grpc.RpcError):
        check_refusal(got.code(), got.details() or "")
        assert after == before, "a refused batch stored events"
    else:
        assert got.seq == batch.seq
        assert got.stored == (0 if got.duplicate else len(batch.events))
        assert after == before + got.stored


RAW = st.one_of(
    st.binary(max_size=2000),
    # Valid messages cut short or with bytes overwritten: the parser sees real structure.
    st.tuples(BATCH, st.integers(0, 10_000)).map(
        lambda t: events_pb2.AgentMessage(batch=t[0]).SerializeToString()[: t[1]]
    ),
    st.tuples(BATCH, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)))).map(
        lambda t: garble(events_pb2.AgentMessage(batch=t[0]).SerializeToString(), t[1])
    ),
)


def garble(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        if b:
            b[pos % len(b)] = value
    return bytes(b)


@SHARED
@given(payloads=st.lists(RAW, min_size=1, max_size=3))
def test_ingest_raw_bytes(server: Server, payloads: list[bytes]) -> None:
    before = server.consistent()
    code, details, acks = send_raw(server.channel, payloads)
    if code != grpc.StatusCode.OK:
        check_refusal(code, details)
    after = server.consistent()
    if acks == 0:
        assert after == before


def valid_batch(session_id: str, agent_id: str, seq: int, n: int) -> events_pb2.EventBatch:
    now = time.time_ns()
    return events_pb2.EventBatch(
        agent_id=agent_id,
        node="node-ok",
        session_id=session_id,
        seq=seq,
        events=[
            events_pb2.Event(ts_ns=now + i, dur_ns=1, kind="read", pid=1, tid=1, comm="ok")
            for i in range(n)
        ],
    )


def test_oversized_and_unknown_are_refused_then_serving_goes_on(server: Server) -> None:
    before = server.consistent()
    code, _, _ = send_raw(server.channel, [b"\x12" + b"\xff" * (MAX_MESSAGE_BYTES + 1)])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    too_many = valid_batch(server.session_id, "big", 1, MAX_BATCH_EVENTS + 1)
    got = send(server, too_many)
    assert isinstance(got, grpc.RpcError) and got.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    unknown = valid_batch("no-such-session", "lost", 1, 3)
    got = send(server, unknown)
    assert isinstance(got, grpc.RpcError) and got.code() == grpc.StatusCode.NOT_FOUND
    assert server.consistent() == before

    # After all the fuzzing in this module, a valid batch stores exactly once.
    agent = f"after-{uuid.uuid4().hex[:6]}"
    ok = valid_batch(server.session_id, agent, 1, 7)
    first, again = send(server, ok), send(server, ok)
    assert isinstance(first, events_pb2.BatchAck) and isinstance(again, events_pb2.BatchAck)
    assert (first.stored, first.duplicate) == (7, False)
    assert (again.stored, again.duplicate) == (0, True)
    assert server.consistent() == before + 7
    with server.collector.store._lock:
        row = server.collector.store._con.execute(
            "SELECT count(*) FROM events WHERE agent_id = ?", [agent]
        ).fetchone()
    assert row == (7,)


def test_request_bytes_of_a_session_without_capture_are_not_stored(server: Server) -> None:
    """A hostile or broken agent cannot make the collector keep request bytes."""
    b = valid_batch(server.session_id, f"leaky-{uuid.uuid4().hex[:6]}", 1, 1)
    b.events[0].request = b"GET / HTTP/1.1\r\nAuthorization: secret\r\n\r\n"
    got = send(server, b)
    assert isinstance(got, events_pb2.BatchAck) and got.stored == 1
    with server.collector.store._lock:
        row = server.collector.store._con.execute(
            "SELECT count(*) FROM events WHERE request IS NOT NULL AND agent_id = ?",
            [b.agent_id],
        ).fetchone()
    assert row == (0,)


# --------------------------------------------------------------------------------------
# Query-id extractors


def well_formed(qid: str | None) -> bool:
    return qid is None or (
        isinstance(qid, str) and 0 < len(qid) <= MAX_ID_LEN and qid.isprintable()
    )


EXTRACTORS = (
    QueryIdExtractor.header(),
    QueryIdExtractor.header("X-Req"),
    QueryIdExtractor.regex(r"qid=(\S+)"),
    QueryIdExtractor.regex(r"(?s)id:(.*)"),
)
HEADERISH = st.lists(
    st.tuples(st.sampled_from([b"X-Query-Id", b"x-query-id", b"X-Req", b"Host"]), st.binary()),
    max_size=6,
).map(lambda hs: b"".join(k + b": " + v + b"\r\n" for k, v in hs))
REQUESTISH = st.tuples(
    st.sampled_from([b"GET / HTTP/1.1\r\n", b"POST /s HTTP/1.0\r\n", b"", b"\x00\xff"]),
    HEADERISH,
    st.sampled_from([b"\r\n", b"", b"\r\n\r\nqid=1", b"\n"]),
    st.binary(max_size=300),
    st.integers(0, 4096),
).map(lambda t: (t[0] + t[1] + t[2] + t[3])[: t[4]])  # cut anywhere: partial requests


@given(data=st.binary(max_size=4096) | REQUESTISH)
def test_extractors_on_arbitrary_bytes(data: bytes) -> None:
    for x in EXTRACTORS:
        assert well_formed(x.extract(data))


@given(qid=st.text(min_size=1, max_size=MAX_ID_LEN).filter(is_valid_query_id))
def test_header_extractor_returns_any_valid_id_exactly(qid: str) -> None:
    qid = qid.strip(" ")
    req = b"GET / HTTP/1.1\r\nX-Query-Id: " + qid.encode() + b"\r\n\r\n"
    assert QueryIdExtractor.header().extract(req) == (qid or None)


@pytest.mark.parametrize(
    "value",
    [b"a\x1b[31mb", b"a\x00b", b"\xff\xfe", b"x" * (MAX_ID_LEN + 1), b"a\xe2\x80\xaeb", b"\x7f"],
)
def test_ids_with_control_characters_or_too_long_are_none(value: bytes) -> None:
    req = b"GET / HTTP/1.1\r\nX-Query-Id: " + value + b"\r\n\r\n"
    assert QueryIdExtractor.header().extract(req) is None
    assert QueryIdExtractor.regex(r"id: (.+)\r").extract(b"id: " + value + b"\r") is None


def test_header_extractor_is_linear_in_blank_runs() -> None:
    # A lazy group before optional blanks took seconds on a 16 KiB line of blanks (and
    # grows with the square of it); linear is a few ms, so 1 s survives any CI stall.
    req = b"X-Query-Id: a" + b" \t" * 20_000 + b"b\r\n"
    t0 = time.perf_counter()
    assert QueryIdExtractor.header().extract(req) is None  # 40 kB: longer than any id
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------------------
# Query-log parser and capture's HTTP parser

_TCHAR = "!#$%&'*+.^_`|~-"


def sendable(r: Request) -> None:
    """What the replay runner can put on the wire as it is (http.client's own rules)."""
    assert r.method in METHODS
    assert r.path.startswith("/") and r.path.isascii()
    assert not any(ord(c) <= 0x20 or ord(c) == 0x7F for c in r.path)
    for k, v in r.headers.items():
        assert k and all(c.isascii() and (c.isalnum() or c in _TCHAR) for c in k)
        v.encode("latin-1")
        assert not any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in v)
    assert r.body is None or isinstance(r.body, bytes)
    assert r.id is None or (is_valid_query_id(r.id) and r.id.encode("latin-1"))


JSONISH = st.dictionaries(
    st.sampled_from(["method", "path", "headers", "body", "id", "x"]),
    JSON_VALUE
    | st.sampled_from(["GET", "post", "/", "/s?q=ü", "/a b", "/\x00", "\ud800", "/\ud800"])
    | st.dictionaries(st.text(max_size=10), st.text(max_size=10) | st.just("\ud800"), max_size=3),
    max_size=6,
).map(lambda d: json.dumps(d, ensure_ascii=bool(len(d) % 2)))
LINE = st.one_of(
    st.text(max_size=300),  # any text, surrogates included
    JSONISH,
    st.integers(1, 5000).map(lambda n: '{"path": "/", "x": ' + "[" * n + "]" * n + "}"),
    st.just('{"path": "/", "id": ' + "9" * 5000 + "}"),
)


@given(lines=st.lists(LINE, max_size=8), templated=st.booleans())
def test_query_log_lines(lines: list[str], templated: bool) -> None:
    tpl = Template.parse("POST /s?q={query} {query}") if templated else None
    seen = []
    for n, item in read(iter(lines), tpl):
        seen.append(n)
        assert 1 <= n <= len(lines)
        if isinstance(item, BadLine):
            assert str(item)  # says why
        else:
            sendable(item)
    assert seen == sorted(set(seen))


@given(data=st.binary(max_size=3000))
def test_query_log_bytes_as_the_replay_command_reads_them(data: bytes) -> None:
    lines = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace")
    for _n, item in read(iter(lines), Template.parse("GET /s?q={query}")):
        if not isinstance(item, BadLine):
            sendable(item)


@given(
    data=st.binary(max_size=3000)
    | st.tuples(
        REQUESTISH, st.sampled_from([b"Content-Length: \xb2\r\n", b"Content-Length: 9" * 3])
    ).map(lambda t: b"GET / HTTP/1.1\r\n" + t[1] + t[0]),
)
def test_capture_parser_on_arbitrary_bytes(data: bytes) -> None:
    entry = parse_http(data, "X-Query-Id")
    if entry is not None:
        json.dumps(entry)


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"path": "/", "body": "\\ud800"}', "'body' is not valid Unicode"),
        ('{"path": "/", "id": "a\\u001bb"}', "'id'"),
        ('{"path": "/", "headers": {"A B": "x"}}', "invalid header name"),
        ('{"path": "/", "headers": {"A": "\\u20ac"}}', "not Latin-1"),
        ('{"path": "/", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "not usable JSON"),
        ('{"path": "/\\u0000"}', "control character"),
    ],
)
def test_query_log_errors_are_clear(line: str, why: str) -> None:
    ((n, item),) = list(read(iter(["", line]), None))
    assert n == 2 and isinstance(item, BadLine) and why in str(item)


def test_query_log_percent_encodes_paths() -> None:
    ((_, item),) = list(read(iter(['{"path": "/s?q=caf\u00e9 au lait"}']), None))
    assert isinstance(item, Request) and item.path == "/s?q=caf%C3%A9%20au%20lait"


# --------------------------------------------------------------------------------------
# Markup in query ids and traced names: HTML and terminal output

MARKUP_IDS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "[bold red]x[/] [link=http://example.invalid]y[/link] :thumbs_up:",
]


class Elements(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [k for k, _ in attrs]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_html(page: str) -> Elements:
    p = Elements()
    p.feed(page)
    p.close()
    return p


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A collector holding events and anomalies whose query ids, names and paths carry
    markup, as a hostile client or traced process could make them."""
    tmp = tmp_path_factory.mktemp("markup")
    col = CollectorProc(tmp / "m.duckdb")
    channel = grpc.insecure_channel(col.addr)
    try:
        ctl = services_pb2_grpc.ControlServiceStub(channel)
        sid = ctl.StartSession(
            services_pb2.StartSessionRequest(targets=sessions_pb2.Targets(comms=["x"]))
        ).id
        now = time.time_ns()
        events = []
        for i, qid in enumerate(MARKUP_IDS):
            t = now + i * 10_000_000
            common: dict[str, Any] = {"pid": 4242, "tid": 4242, "comm": "<b>[red]c", "fd": 5}
            common |= {"query_id": qid, "has_query_id": True, "has_target": True}
            events += [
                events_pb2.Event(ts_ns=t, dur_ns=50_000, kind="recvfrom", group="net",
                                 target="10.0.0.1:80->10.0.0.2:5000", ret=100, **common),
                events_pb2.Event(ts_ns=t + 60_000, dur_ns=3_000_000, kind="pread64",
                                 group="storage", target="/data/<script>x</script>[bold]",
                                 ret=4096, **common),
                events_pb2.Event(ts_ns=t + 3_100_000, dur_ns=40_000, kind="sendto", group="net",
                                 target="10.0.0.1:80->10.0.0.2:5000", ret=100, **common),
                # A file a traced process named to clear the screen of whoever looks.
                events_pb2.Event(ts_ns=t + 3_200_000, dur_ns=1_000, kind="openat",
                                 group="storage", target="/tmp/a\x1b[2Jb\u202e", ret=3, **common),
            ]  # fmt: skip
        stub = services_pb2_grpc.AgentServiceStub(channel)
        batch = events_pb2.EventBatch(
            agent_id="<i>agent</i>", node="[blink]node</td>", session_id=sid, seq=1, events=events
        )
        acks = list(stub.Ingest(iter([events_pb2.AgentMessage(batch=batch)]), timeout=30))
        assert acks[0].ack.stored == len(events)
        detail = json.dumps({"why": "<script>alert(2)</script> [bold]d[/]"})
        ctl.ReportAnomalies(
            anomalies_pb2.ReportAnomaliesRequest(
                anomalies=[
                    anomalies_pb2.Anomaly(
                        query_id=q, type=anomalies_pb2.ANOMALY_TYPE_LATENCY, session_id=sid,
                        detail_json=detail, source="<svg onload=alert(3)>",
                    )
                    for q in MARKUP_IDS
                ]
            )
        )  # fmt: skip
        yield col.addr, sid
    finally:
        channel.close()
        col.stop()


WIDE = {"COLUMNS": "400"}  # so no table cell wraps the literal text we look for


def cli(*args: str) -> str:
    r = subprocess.run(
        [QTRACE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **WIDE},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("qid", MARKUP_IDS)
def test_markup_in_html_is_inert(marked: tuple[str, str], qid: str, tmp_path: Path) -> None:
    addr, _sid = marked
    pages = {
        "timeline": tmp_path / "t.html",
        "explain": tmp_path / "e.html",
    }
    qtrace("timeline", qid, "--format", "html", "-o", str(pages["timeline"]), "--collector", addr)
    qtrace("explain", qid, "--format", "html", "-o", str(pages["explain"]), "--collector", addr)
    for page in pages.values():
        text = page.read_text(encoding="utf-8")
        found = parse_html(text)
        # The template has no scripts, images or event handlers: any would be injected.
        assert not {"script", "img", "iframe", "object", "blink", "i"} & set(found.tags)
        assert found.tags.count("svg") == 1
        assert not [a for a in found.attrs if a.startswith("on")]
        shown = "".join(found.text)
        assert qid in shown  # the id is there, as text
        assert "/data/<script>x</script>[bold]" in shown
        assert "[blink]node</td>" in shown and "<b>[red]c" in shown
    dom = chromium_dom(pages["timeline"], tmp_path / "profile")
    assert "<script" not in dom and "<img" not in dom
    assert "onerror" not in parse_html(dom).attrs


def chromium_dom(page: Path, profile: Path) -> str:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=1000",
    ]  # fmt: skip
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return dom.stdout


def test_markup_in_terminal_output_is_literal(marked: tuple[str, str]) -> None:
    addr, sid = marked
    listed = cli("anomalies", "--collector", addr)
    for qid in MARKUP_IDS:
        assert qid in listed
    assert "<svg onload=alert(3)>" in listed
    for qid in MARKUP_IDS:
        explained = cli("explain", qid, "--collector", addr)
        assert f"query {qid}" in explained
        assert "[blink]node</td>" in explained and "<b>[red]c" in explained
        shown = cli("query", "show", qid, "--collector", addr)
        assert f"query {qid}:" in shown and "/data/<script>x</script>[bold]" in shown
    status = cli("session", "status", sid, "--collector", addr)
    assert "[blink]node</td>" in status and "<i>agent</i>" in status
    # An error that quotes the id quotes it literally too.
    r = subprocess.run(
        [QTRACE, "explain", "[bold]nope[/]", "--collector", addr],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **WIDE},
    )  # fmt: skip
    assert r.returncode != 0 and "[bold]nope[/]" in r.stderr
    # Control characters never reach the terminal raw.
    assert "\x1b" not in listed


def test_control_characters_are_shown_as_escapes(marked: tuple[str, str]) -> None:
    addr, _ = marked
    shown = cli("query", "show", MARKUP_IDS[0], "--collector", addr)
    assert "\x1b" not in shown and "\u202e" not in shown
    assert "/tmp/a\\x1b[2Jb\\u202e" in shown


def test_anomaly_ids_must_be_printable(marked: tuple[str, str]) -> None:
    addr, _ = marked
    got = qtrace_json("anomalies", "--collector", addr)["anomalies"]
    assert {a["query_id"] for a in got} == set(MARKUP_IDS)
    r = qtrace("anomaly", "report", "--query-id", "a\x07b", "--type", "error",
               "--collector", addr, check=False)  # fmt: skip
    assert r.returncode != 0 and "printable" in r.stderr
