"""Redaction of captured requests: secrets masked on the node, before anything ships.

A session that captures requests may name headers to mask and regexes to blank out. The
agent applies them to every captured request before it becomes a shipped event, and
`qtrace capture` can apply more of them when it writes a query log. The query id itself is
never redacted here: it is the key that joins the trace to the comparator's verdict.

Regexes run on bytes, one line at a time in the request line and headers (so a match can
never swallow the line breaks that make the headers readable), and over the body as a
whole. The body's Content-Length follows the body's new length, so a redacted request
still parses and replays as a whole request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qtrace.api.v1 import sessions_pb2
from qtrace.errors import QtraceError

MARK = b"[REDACTED]"
MAX_RULES = 64
MAX_RULE_CHARS = 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_LINE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+)([ \t]*:[ \t]*)(.*)$", re.DOTALL)
_CONTENT_LENGTH = re.compile(rb"(?i)^(content-length[ \t]*:[ \t]*)(\d{1,18})([ \t]*)$")


class RedactionError(QtraceError):
    """A rule that cannot be applied (maps to INVALID_ARGUMENT at the collector)."""


def _mark(m: re.Match[bytes]) -> bytes:
    # A match of nothing (a lookahead, say) has nothing to hide: inserting the marker there
    # would only garble the request.
    return MARK if m.group(0) else b""


class Redactor:
    def __init__(self, headers: Sequence[str] = (), regexes: Sequence[str] = ()) -> None:
        if len(headers) + len(regexes) > MAX_RULES:
            raise RedactionError(f"at most {MAX_RULES} redaction rules")
        for name in headers:
            if not _TOKEN.fullmatch(name):
                raise RedactionError(
                    f"invalid --redact-header {name[:64]!r}",
                    "use a header name: letters, digits, '-'",
                )
        compiled = []
        for rx in regexes:
            if not rx or len(rx) > MAX_RULE_CHARS:
                raise RedactionError(f"a --redact regex must be 1-{MAX_RULE_CHARS} characters")
            try:
                c = re.compile(rx.encode())
            except (re.error, OverflowError, RecursionError) as e:
                raise RedactionError(f"invalid --redact regex {rx!r} ({e})", "fix the regex") from e
            if c.fullmatch(b"") is not None:
                raise RedactionError(
                    f"--redact regex {rx!r} matches the empty string", "make it match the secret"
                )
            compiled.append(c)
        self.headers = frozenset(h.lower().encode() for h in headers)
        self.regexes = tuple(compiled)

    @classmethod
    def from_pb(cls, r: sessions_pb2.Redaction) -> Redactor:
        return cls(list(r.headers), list(r.regexes))

    def __bool__(self) -> bool:
        return bool(self.headers or self.regexes)

    def _line(self, line: bytes) -> bytes:
        if self.headers:
            m = _HEADER_LINE.match(line)
            if m and m.group(1).lower() in self.headers:
                line = m.group(1) + m.group(2) + MARK
        return self._sub(line)

    def _sub(self, data: bytes) -> bytes:
        for rx in self.regexes:
            data = rx.sub(_mark, data)
        return data

    def request(self, raw: bytes) -> bytes:
        """The request with its secrets masked (unchanged when there are no rules)."""
        if not self:
            return raw
        head, sep, body = raw.partition(b"\r\n\r\n")
        lines = [self._line(line) for line in head.split(b"\r\n")]
        if not sep:  # not HTTP, or the headers were cut short: all of it is "head"
            return b"\r\n".join(lines)
        new_body = self._sub(body)
        if len(new_body) != len(body):
            grow = len(new_body) - len(body)
            for i, line in enumerate(lines):
                m = _CONTENT_LENGTH.match(line)
                if m:
                    # The capture limit may have cut the body: the length still says how
                    # much was sent, less what redaction took away.
                    n = max(0, int(m.group(2)) + grow)
                    lines[i] = m.group(1) + str(n).encode() + m.group(3)
        return b"\r\n".join(lines) + sep + new_body


def redaction_pb(headers: Sequence[str], regexes: Sequence[str]) -> sessions_pb2.Redaction:
    """The wire form of rules, checked first (RedactionError says what is wrong)."""
    Redactor(headers, regexes)
    return sessions_pb2.Redaction(headers=list(headers), regexes=list(regexes))
