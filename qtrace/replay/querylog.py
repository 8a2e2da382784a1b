"""Query logs: JSON lines of requests, or plain query strings with a request template."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from qtrace.errors import QtraceError

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"})


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "path": self.path, "headers": self.headers}
        if self.body is not None:
            d["body"] = self.body.decode("utf-8", "replace")
        if self.id is not None:
            d["id"] = self.id
        return d


class BadLine(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    """``METHOD PATH [BODY]``; ``{query}`` is replaced (URL-quoted in the path, JSON-escaped
    in the body)."""

    method: str
    path: str
    body: str | None

    @classmethod
    def parse(cls, text: str) -> Template:
        parts = text.strip().split(" ", 2)
        if len(parts) < 2 or parts[0].upper() not in METHODS or not parts[1].startswith("/"):
            raise QtraceError(f"invalid --template {text!r}", "use 'METHOD /path?q={query} [BODY]'")
        if "{query}" not in text:
            raise QtraceError(f"--template {text!r} has no {{query}} placeholder")
        return cls(parts[0].upper(), parts[1], parts[2] if len(parts) > 2 else None)

    def render(self, query: str) -> Request:
        path = self.path.replace("{query}", urllib.parse.quote(query, safe=""))
        body = None
        if self.body is not None:
            body = self.body.replace("{query}", json.dumps(query)[1:-1]).encode()
        return Request(self.method, path, {}, body)


def parse_json_line(line: str) -> Request:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BadLine("a JSON line must be an object")
    method = str(obj.get("method", "GET")).upper()
    if method not in METHODS:
        raise BadLine(f"unknown method {method!r}")
    path = obj.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadLine("'path' must be a string starting with '/'")
    headers = obj.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise BadLine("'headers' must be an object of strings")
    if any(c in "\r\n" for kv in headers.items() for c in "".join(kv)):
        raise BadLine("a header contains a line break")
    body = obj.get("body")
    raw: bytes | None
    if body is None:
        raw = None
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = json.dumps(body).encode()
    qid = obj.get("id")
    if qid is not None and not isinstance(qid, str):
        qid = str(qid)
    return Request(method, path, dict(headers), raw, qid)


def read(
    lines: Iterator[str], template: Template | None
) -> Iterator[tuple[int, Request | BadLine]]:
    """(line number, request or the reason the line was skipped); blank lines are skipped."""
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("{"):
            try:
                yield n, parse_json_line(text)
            except BadLine as e:
                yield n, e
        elif template is not None:
            yield n, template.render(text)
        else:
            yield n, BadLine("a plain query line needs --template (or use JSON lines)")
