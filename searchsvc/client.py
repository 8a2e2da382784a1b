"""Load generator for the root: fixed query lists and a throughput driver."""

from __future__ import annotations

import http.client
import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

_WORDS = """
    alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima
    mike november oscar papa quebec romeo sierra tango uniform victor whiskey
    xray yankee zulu kernel socket thread buffer latency tracer probe packet
    cache page inode block queue shard index query search leaf root fanout
    merge score vector signal mutex futex epoll sched cgroup memory disk
"""
VOCABULARY: tuple[str, ...] = tuple(_WORDS.split())


def make_queries(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` deterministic ``(query_id, q)`` pairs, ids ``q-000001``..."""
    rng = random.Random(seed)
    return [
        (f"q-{i:06d}", " ".join(rng.sample(VOCABULARY, rng.randint(1, 3)))) for i in range(1, n + 1)
    ]


class _RootClient:
    """One worker's connection; reconnects after errors or when not keep-alive."""

    def __init__(
        self, root_url: str, keepalive: bool, timeout_s: float, method: str = "GET"
    ) -> None:
        if method not in ("GET", "POST"):
            raise ValueError(f"method must be GET or POST, got {method!r}")
        parts = urlsplit(root_url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._keepalive = keepalive
        self._method = method
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def query(self, query_id: str, q: str) -> dict[str, Any]:
        headers = {"X-Query-Id": query_id}
        if not self._keepalive:
            headers["Connection"] = "close"
        result: dict[str, Any] = {"query_id": query_id}
        start = time.monotonic_ns()
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout_s
                )
            if self._method == "POST":
                headers["Content-Type"] = "application/json"
                payload = json.dumps({"q": q}).encode()
                self._conn.request("POST", "/search", body=payload, headers=headers)
            else:
                self._conn.request("GET", "/search?" + urlencode({"q": q}), headers=headers)
            resp = self._conn.getresponse()
            body = json.loads(resp.read())
            result["status"] = resp.status
            if not self._keepalive:
                self.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.close()
            body = {}
            result["status"] = 0
            result["error"] = repr(exc)
        result["latency_ns"] = time.monotonic_ns() - start
        result["hits"] = body.get("hits", [])
        result["leaves"] = body.get("leaves", 0)
        result["leaf_hits"] = body.get("leaf_hits", [])
        result["body"] = body
        return result

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _run_workers(concurrency: int, work: Callable[[int], None]) -> None:
    threads = [
        threading.Thread(target=work, args=(w,), name=f"client-{w}") for w in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_queries(
    root_url: str,
    queries: list[tuple[str, str]],
    concurrency: int = 1,
    keepalive: bool = True,
    timeout_s: float = 30.0,
    method: str = "GET",
) -> list[dict[str, Any]]:
    """Send every query once; results are in the order of ``queries``.

    Each result has ``query_id, status, latency_ns, hits`` plus the root's
    ``leaves`` and ``leaf_hits``, its whole JSON answer as ``body`` (``{}`` on
    errors) and ``error`` when status is 0.  ``method`` "POST" sends the query as
    a JSON body ``{"q": ...}`` instead of ``?q=``.
    """
    results: list[dict[str, Any]] = [{} for _ in queries]
    lock = threading.Lock()
    pending = iter(range(len(queries)))

    def work(_: int) -> None:
        client = _RootClient(root_url, keepalive, timeout_s, method)
        try:
            while True:
                with lock:
                    i = next(pending, None)
                if i is None:
                    return
                results[i] = client.query(*queries[i])
        finally:
            client.close()

    _run_workers(max(1, concurrency), work)
    return results


def drive(root_url: str, duration_s: float, concurrency: int, keepalive: bool = True) -> int:
    """Query as fast as possible for ``duration_s``; return the 200 responses."""
    deadline = time.monotonic() + duration_s
    done = [0] * concurrency

    def work(w: int) -> None:
        client = _RootClient(root_url, keepalive, 30.0)
        queries: Iterator[tuple[str, str]] = itertools.cycle(make_queries(256, w))
        try:
            for n in itertools.count(1):
                if time.monotonic() >= deadline:
                    return
                _, q = next(queries)
                if client.query(f"d{w}-{n:08d}", q)["status"] == 200:
                    done[w] += 1
        finally:
            client.close()

    _run_workers(concurrency, work)
    return sum(done)
