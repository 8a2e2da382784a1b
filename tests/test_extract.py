"""Query-id extractors, alone and on a real non-HTTP protocol through the kernel."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.extract import QueryIdExtractor
from agent.targets import TargetSpec
from qtrace.errors import QtraceError
from tests.conftest import background_tracer


def test_header_is_case_insensitive_and_trimmed() -> None:
    x = QueryIdExtractor.header()
    req = b"GET /s?q=a HTTP/1.1\r\nHost: h\r\nx-query-id:   abc-1  \r\n\r\n"
    assert x.extract(req) == "abc-1"
    assert x.extract(b"GET / HTTP/1.1\r\nX-Query-Idx: no\r\n\r\n") is None
    assert x.extract(b"GET / HTTP/1.1\r\nX-Query-Id:\r\n\r\n") is None
    assert QueryIdExtractor.header("X-Req").extract(b"POST / HTTP/1.1\r\nX-Req: 7\r\n") == "7"


def test_regex_first_group() -> None:
    x = QueryIdExtractor.regex(r"/\* qid=(\w+) \*/")
    assert x.extract(b"SELECT 1 /* qid=42 */") == "42"
    assert x.extract(b"SELECT 1") is None


@pytest.mark.parametrize("bad", ["qid=\\d+", "qid=(", "(?P<x"])
def test_bad_regex_is_a_user_error(bad: str) -> None:
    with pytest.raises(QtraceError):
        QueryIdExtractor.regex(bad)


def test_bad_header_name_is_a_user_error() -> None:
    with pytest.raises(QtraceError):
        QueryIdExtractor.header("X Query\r\n")


@given(st.binary(max_size=512))
def test_extractors_never_fail_on_arbitrary_bytes(data: bytes) -> None:
    for x in (QueryIdExtractor.header(), QueryIdExtractor.regex(r"qid=(\S+)")):
        out = x.extract(data)
        assert out is None or (isinstance(out, str) and 0 < len(out) <= 256)


SQLISH_SERVER = r"""
import socket, sys, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
print(srv.getsockname()[1], flush=True)
def serve(c):
    f = c.makefile("rb")
    for line in f:
        c.sendall(b"ok " + line)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,)).start()
"""


def test_regex_extractor_on_a_text_protocol() -> None:
    cmd = [sys.executable, "-c", SQLISH_SERVER]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout
        port = int(proc.stdout.readline())
        extractor = QueryIdExtractor.regex(r"/\* qid=(\w+) \*/")
        with background_tracer(TargetSpec(pids=[proc.pid]), extractor) as (_t, sink):
            with socket.create_connection(("127.0.0.1", port)) as c:
                f = c.makefile("rb")
                for i in range(20):
                    c.sendall(f"SELECT * FROM t WHERE x={i} /* qid=sql{i} */\n".encode())
                    assert f.readline().startswith(b"ok ")
        sends = [e for e in sink.events if e.kind == "sendto" and e.pid == proc.pid]
        assert [e.query_id for e in sends] == [f"sql{i}" for i in range(20)]
    finally:
        proc.kill()
        proc.wait()


def test_capture_assembles_requests_split_over_reads() -> None:
    from agent.clock import WallClock
    from agent.decode import Decoder, request_complete
    from agent.fdresolve import FdResolver

    d = Decoder(
        QueryIdExtractor.header(),
        FdResolver(teach=lambda *_: None),
        WallClock(),
        capture=(True, True),
        capture_limit=1024,
    )
    head = b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
    assert d._capture(1, head, start=True) is None  # headers not finished
    assert d._capture(1, b"X-Query-Id: q7\r\n\r\nhello", start=False) is None  # body short
    whole = d._capture(1, b" world", start=False)
    assert whole == head + b"X-Query-Id: q7\r\n\r\nhello world"
    assert d.requests.get(1) == "q7"  # the id was in a later read
    assert d._capture(1, b"more", start=False) is None  # complete already
    assert request_complete(b"SELECT 1 /* qid=4 */\n", 1024)
    assert request_complete(b"GET / HTTP/1.1\r\n\r\n", 1024)
    assert request_complete(b"x" * 16, 16)
    headers_only = Decoder(
        QueryIdExtractor.header(), FdResolver(teach=lambda *_: None), WallClock(),
        capture=(True, False),
    )  # fmt: skip
    got = headers_only._capture(2, b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi", start=True)
    assert got == b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n"
