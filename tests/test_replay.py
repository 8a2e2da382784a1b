"""Replay and compare: the comparison rules, the query log, and the CLI under trouble."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qtrace.errors import QtraceError
from qtrace.replay.compare import CompareOptions, Difference, Noise, Response, compare, diff
from qtrace.replay.querylog import BadLine, Template, read
from tests.httpstub import http_stub, json_answer
from tests.procs import QTRACE


def paths(a: object, b: object, **kw: object) -> list[str]:
    return [d.path for d in diff(a, b, CompareOptions(**kw))]  # type: ignore[arg-type]


def test_structural_diff() -> None:
    a = {"hits": [[1, 0.5], [2, 0.25]], "n": 2, "meta": {"took": 3}}
    b = {"hits": [[1, 0.5], [3, 0.25]], "n": 2, "meta": {"took": 9}, "extra": True}
    assert paths(a, b) == ["$.extra", "$.hits[1][0]", "$.meta.took"]
    assert paths(a, b, ignore=("meta.took", "$.extra")) == ["$.hits[1][0]"]
    assert paths([1, 2, 3], [3, 2, 1]) == ["$[0]", "$[2]"]
    assert paths({"s": [1, 2, 2]}, {"s": [2, 1, 2]}, sets=("$.s",)) == []
    assert paths({"s": [1, 2]}, {"s": [2, 2]}, sets=("$.s",)) == ["$.s"]
    assert paths({"x": 1.0}, {"x": 1.0000001}, tolerance=1e-6) == []
    assert paths({"x": 1.0}, {"x": 1.1}, tolerance=1e-6) == ["$.x"]
    assert paths({"x": True}, {"x": 1}) == ["$.x"]
    assert paths({"hits": [{"s": 1}, {"s": 2}]}, {"hits": [{"s": 1}, {"s": 5}]},
                 ignore=("$.hits[*].s",)) == []  # fmt: skip


def test_status_and_non_json_bodies() -> None:
    ok = Response(200, b'{"a": 1}')
    assert compare(ok, Response(500, b'{"a": 1}'), CompareOptions())[0].path == "$status"
    d = compare(ok, Response(200, b"<html>oops</html>"), CompareOptions())
    assert [x.path for x in d] == ["$body"] and "sha256:" in d[0].right


def test_noise_is_learned_per_generic_path() -> None:
    noise = Noise()
    noise.learn([Difference("$.server_time_ns", 1, 2), Difference("$.hits[3].ts", 1, 2)])
    kept = noise.filter(
        [
            Difference("$.server_time_ns", 5, 6),
            Difference("$.hits[7].ts", 1, 2),
            Difference("$.hits[7].doc", 1, 2),
        ]
    )
    assert [d.path for d in kept] == ["$.hits[7].doc"]


def test_query_log_lines() -> None:
    lines = [
        '{"method": "post", "path": "/s", "headers": {"A": "b"}, "body": {"q": 1}, "id": "x1"}',
        "",
        "red shoes",
        "{not json",
        '{"path": "relative"}',
        '{"path": "/ok", "headers": {"H": "a\\r\\nInjected: 1"}}',
    ]
    tpl = Template.parse("GET /search?q={query}")
    got = list(read(iter(lines), tpl))
    assert [n for n, _ in got] == [1, 3, 4, 5, 6]
    first = got[0][1]
    assert not isinstance(first, BadLine)
    assert (first.method, first.path, first.headers, first.body, first.id) == (
        "POST", "/s", {"A": "b"}, b'{"q": 1}', "x1",
    )  # fmt: skip
    plain = got[1][1]
    assert not isinstance(plain, BadLine) and plain.path == "/search?q=red%20shoes"
    assert all(isinstance(item, BadLine) for _, item in got[2:])
    assert "needs --template" in str(next(read(iter(["plain"]), None))[1])
    with pytest.raises(QtraceError):
        Template.parse("FETCH nowhere")
    body = Template.parse('POST /s {"q": "{query}"}').render('say "hi"')
    assert json.loads(body.body or b"") == {"q": 'say "hi"'}


def replay(args: list[str]) -> tuple[int, dict[str, Any], str]:
    r = subprocess.run(
        [QTRACE, "replay", "--format", "json", "--no-report", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return r.returncode, json.loads(r.stdout) if r.stdout else {}, r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_trouble_is_counted_and_the_replay_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "q.jsonl"
    log.write_text(
        "\n".join(
            [json.dumps({"path": f"/s?q={i}", "id": f"q{i}"}) for i in range(5)]
            + ["{broken", json.dumps({"path": "/html", "id": "qh"})]
        )
        + "\n"
    )

    def candidate(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if path == "/html":
            return 200, b"<html>not json</html>"
        return 200, json.dumps({"q": path, "v": 2 if path.endswith("3") else 1}).encode()

    def primary(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        return 200, json.dumps({"q": path, "v": 1}).encode()

    down = f"http://127.0.0.1:{free_port()}"
    with http_stub(primary) as (p_url, p_stub), http_stub(candidate) as (c_url, _c):
        code, summary, stderr = replay(
            ["--queries", str(log), "--primary", p_url, "--candidate", c_url,
             "--secondary", down, "--concurrency", "2"]
        )  # fmt: skip
    assert code == 0, stderr
    assert summary["queries"] == 6
    assert summary["malformed_lines"] == [
        {"line": 6, "error": "not JSON (Expecting property name enclosed in double quotes)"}
    ]
    mism = {m["query_id"]: m["paths"] for m in summary["mismatches"]}
    assert mism == {"q3": ["$.v"], "qh": ["$body"]}
    errors = summary["errors"]
    assert len(errors) == 6 and {e["target"] for e in errors} == {"secondary"}
    assert all(
        "Connection refused" in e["error"] or "ConnectionRefused" in e["error"] for e in errors
    )
    # Every request carried its id in the query-id header.
    assert sorted(h["X-Query-Id"] for _m, _p, h, _b in p_stub.requests) == sorted(
        [f"q{i}" for i in range(5)] + ["qh"]
    )


def test_ctrl_c_prints_the_summary_so_far(tmp_path: Path) -> None:
    log = tmp_path / "q.txt"
    log.write_text("".join(f"query {i}\n" for i in range(100000)))
    with http_stub(json_answer({"ok": 1})) as (url, stub):
        proc = subprocess.Popen(
            [QTRACE, "replay", "--format", "json", "--no-report", "--queries", str(log),
             "--template", "GET /s?q={query}", "--primary", url, "--candidate", url,
             "--concurrency", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert stub.wait_requests(50, timeout=60)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    assert 25 <= summary["queries"] < 100000
    assert summary["mismatches"] == []


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    targets = ["--primary", "http://a:1", "--candidate", "http://b:1"]
    for args, says in [
        (["--queries", str(tmp_path / "none"), *targets], "cannot read"),
        (["--queries", "x", *targets[:1], "ftp://a", *targets[2:]], "invalid --primary URL"),
    ]:
        code, _summary, stderr = replay(args)
        assert code == 2
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and says in lines[0], stderr
