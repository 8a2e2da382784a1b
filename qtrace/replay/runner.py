"""The replay engine: every query to every target at once, compared, noise cancelled."""

from __future__ import annotations

import http.client
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from qtrace.errors import QtraceError
from qtrace.replay.compare import CompareOptions, Difference, Noise, Response, compare
from qtrace.replay.querylog import BadLine, Request

TARGETS = ("primary", "secondary", "candidate")
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, name: str, url: str) -> Target:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise QtraceError(f"invalid --{name} URL {url!r}", "use http://HOST:PORT")
        return cls(name, u.hostname, u.port or 80, u.path.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.name} {self.host}:{self.port}"


class Pool:
    """Keep-alive connections to one target, shared by the sending threads."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()

    def send(self, req: Request, headers: dict[str, str]) -> Response:
        t = self.target
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=self.timeout)
        t0 = time.monotonic_ns()
        try:
            conn.request(req.method, t.base_path + req.path, body=req.body, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_BODY)
            out = Response(resp.status, body, time.monotonic_ns() - t0)
            if resp.will_close:
                conn.close()
            else:
                self._idle.put(conn)
            return out
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            kind = "timeout" if isinstance(e, TimeoutError) else type(e).__name__
            return Response(None, b"", time.monotonic_ns() - t0, f"{kind}: {e}".strip(": "))


@dataclass
class Outcome:
    line: int
    query_id: str
    request: Request
    responses: dict[str, Response]
    diffs: list[Difference] = field(default_factory=list)
    noise: list[Difference] = field(default_factory=list)


@dataclass
class Summary:
    queries: int = 0
    compared: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    noise: Noise = field(default_factory=Noise)
    interrupted: bool = False
    reported: int = 0
    report_failures: int = 0
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "compared": self.compared,
            "mismatches": self.mismatches,
            "errors": self.errors,
            "malformed_lines": self.malformed,
            "noise_paths": sorted(self.noise.paths),
            "reported": self.reported,
            "report_failures": self.report_failures,
            "interrupted": self.interrupted,
            "elapsed_s": round(self.elapsed_s, 3),
        }


class RateLimiter:
    def __init__(self, qps: float | None) -> None:
        self._interval = 1.0 / qps if qps else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next)
            self._next = at + self._interval
        if at > now:
            stop.wait(at - now)  # pacing the load is the point here


class Replayer:
    def __init__(
        self,
        targets: list[Target],
        options: CompareOptions,
        header: str = "X-Query-Id",
        concurrency: int = 8,
        rate: float | None = None,
        timeout: float = 10.0,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        names = {t.name for t in targets}
        if not {"primary", "candidate"} <= names:
            raise QtraceError("replay needs --primary and --candidate")
        self.targets = targets
        self.options = options
        self.header = header
        self.concurrency = max(1, concurrency)
        self.limiter = RateLimiter(rate)
        self.pools = {t.name: Pool(t, timeout) for t in targets}
        self.on_outcome = on_outcome
        self.summary = Summary()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._run_id = uuid.uuid4().hex[:8]
        self._senders = ThreadPoolExecutor(
            max_workers=self.concurrency * len(targets), thread_name_prefix="replay-send"
        )

    def _query_id(self, req: Request, n: int) -> str:
        return req.id or f"r{self._run_id}-{n:07d}"

    def one(self, line: int, n: int, req: Request) -> Outcome:
        qid = self._query_id(req, n)
        headers = {k: v for k, v in req.headers.items() if k.lower() != self.header.lower()}
        headers[self.header] = qid
        futures: dict[str, Future[Response]] = {
            name: self._senders.submit(pool.send, req, headers) for name, pool in self.pools.items()
        }
        responses = {name: f.result() for name, f in futures.items()}
        out = Outcome(line, qid, req, responses)
        primary, candidate = responses["primary"], responses["candidate"]
        secondary = responses.get("secondary")
        failed = [n for n, r in responses.items() if r.error is not None]
        with self._lock:
            s = self.summary
            s.queries += 1
            for name in failed:
                s.errors.append(
                    {"query_id": qid, "target": name, "error": responses[name].error, "line": line}
                )
            if primary.error is None and candidate.error is None:
                if secondary is not None and secondary.error is None:
                    out.noise = compare(primary, secondary, self.options)
                    s.noise.learn(out.noise)
                s.compared += 1
                out.diffs = s.noise.filter(compare(primary, candidate, self.options))
                if out.diffs:
                    s.mismatches.append(
                        {
                            "query_id": qid,
                            "line": line,
                            "request": req.to_json(),
                            "paths": [d.path for d in out.diffs],
                        }
                    )
        if self.on_outcome is not None:
            self.on_outcome(out)
        return out

    def run(self, items: Iterator[tuple[int, Request | BadLine]]) -> Summary:
        t0 = time.monotonic()
        work: queue.Queue[tuple[int, int, Request] | None] = queue.Queue(self.concurrency * 4)

        def worker() -> None:
            while (item := work.get()) is not None:
                if not self.stop.is_set():
                    self.one(*item)

        workers = [
            threading.Thread(target=worker, name=f"replay-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for w in workers:
            w.start()
        n = 0
        try:
            for line, item in items:
                if self.stop.is_set():
                    break
                if isinstance(item, BadLine):
                    with self._lock:
                        self.summary.malformed.append({"line": line, "error": str(item)})
                    continue
                n += 1
                self.limiter.wait(self.stop)
                while not self.stop.is_set():
                    try:
                        work.put((line, n, item), timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except KeyboardInterrupt:
            self.stop.set()
            self.summary.interrupted = True
        finally:
            for _ in workers:
                work.put(None)
            for w in workers:
                w.join()
            self._senders.shutdown(wait=True)
            self.summary.elapsed_s = time.monotonic() - t0
        return self.summary
