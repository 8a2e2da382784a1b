"""Query logs: JSON lines of requests, or plain query strings with a request template."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from qtrace.errors import QtraceError
from qtrace.queryid import PROBLEM, is_valid_query_id

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Kept as they are in a path: printable ASCII but the space (percent-encoding is idempotent
# on what is already encoded, since '%' is kept).
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


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
        try:
            quoted = urllib.parse.quote(query, safe="")
        except UnicodeEncodeError:
            raise BadLine("the query is not valid Unicode") from None
        path = self.path.replace("{query}", quoted)
        body = None
        if self.body is not None:
            body = self.body.replace("{query}", json.dumps(query)[1:-1]).encode()
        return Request(self.method, path, {}, body)


def _control(text: str, allowed: str = "") -> bool:
    return any((ord(c) < 0x20 or ord(c) == 0x7F) and c not in allowed for c in text)


def _latin1(text: str) -> bool:
    # http.client sends header values as Latin-1, as `qtrace capture` reads them.
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise BadLine("'path' must be a string starting with '/'")
    if _control(value):
        raise BadLine("'path' contains a control character")
    try:
        # Spaces and non-ASCII text are sent percent-encoded (UTF-8), as a browser would.
        return urllib.parse.quote(value, safe=_PATH_SAFE)
    except UnicodeEncodeError:
        raise BadLine("'path' is not valid Unicode") from None


def _headers(value: object) -> dict[str, str]:
    headers = value or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise BadLine("'headers' must be an object of strings")
    for k, v in headers.items():
        if not _TOKEN.fullmatch(k):
            raise BadLine(f"invalid header name {k[:64]!r}")
        if _control(v, allowed="\t"):
            raise BadLine(f"header {k} contains a line break or control character")
        if not _latin1(v):
            raise BadLine(f"header {k} is not Latin-1 text")
    return dict(headers)


def parse_json_line(line: str) -> Request:
    """One JSON line as a request that can be sent as it is; BadLine says what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # integers past the digit limit, deep nesting
        raise BadLine(f"not usable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadLine("a JSON line must be an object")
    method = str(obj.get("method", "GET")).upper()
    if method not in METHODS:
        raise BadLine(f"unknown method {method[:16]!r}")
    path = _path(obj.get("path"))
    headers = _headers(obj.get("headers"))
    body = obj.get("body")
    raw: bytes | None
    try:
        if body is None:
            raw = None
        elif isinstance(body, str):
            raw = body.encode()
        else:
            raw = json.dumps(body).encode()
    except UnicodeEncodeError:
        raise BadLine("'body' is not valid Unicode") from None
    qid = obj.get("id")
    if qid is not None:
        if isinstance(qid, bool) or not isinstance(qid, str | int):
            raise BadLine("'id' must be a string")
        qid = str(qid)
        if not is_valid_query_id(qid) or not _latin1(qid):
            raise BadLine(f"'id': {PROBLEM} (Latin-1, as it is sent in a header)")
    return Request(method, path, headers, raw, qid)


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
            try:
                yield n, template.render(text)
            except BadLine as e:
                yield n, e
        else:
            yield n, BadLine("a plain query line needs --template (or use JSON lines)")
