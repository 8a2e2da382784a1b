"""Query-id extractors: find the id in a request's first bytes."""

from __future__ import annotations

import re

from qtrace.errors import QtraceError
from qtrace.queryid import query_id_from_bytes

DEFAULT_HEADER = "X-Query-Id"


class QueryIdExtractor:
    """One regex over the first bytes; its first group is the query id.

    A header name becomes a case-insensitive header-line regex, so HTTP and any text
    protocol (``/* qid=42 */`` in SQL, say) go through the same path."""

    def __init__(
        self, pattern: bytes, description: str, trim: bool = False, header: str | None = None
    ) -> None:
        self._re = re.compile(pattern)
        self.description = description
        self._trim = trim
        # A header extractor's name: the flight recorder finds such ids in the kernel.
        self.header_name = header

    @classmethod
    def header(cls, name: str = DEFAULT_HEADER) -> QueryIdExtractor:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise QtraceError(f"invalid HTTP header name {name!r}", "use letters, digits and '-'")
        # The value runs to the end of its line and is trimmed afterwards: a lazy group
        # followed by optional blanks makes the regex quadratic in a line of blanks, which
        # any client could send.
        pat = rb"(?im)^" + re.escape(name.encode()) + rb"[ \t]*:[ \t]*([^\r\n]*)"
        return cls(pat, f"header {name}", trim=True, header=name)

    @classmethod
    def regex(cls, pattern: str) -> QueryIdExtractor:
        try:
            compiled = re.compile(pattern.encode())
        except re.error as e:
            raise QtraceError(f"invalid --query-id-regex {pattern!r} ({e})", "fix the regex") from e
        if compiled.groups < 1:
            raise QtraceError(
                f"--query-id-regex {pattern!r} has no group",
                "wrap the id in parentheses, e.g. 'qid=(\\w+)'",
            )
        return cls(pattern.encode(), f"regex {pattern}")

    def extract(self, data: bytes) -> str | None:
        """The id, or None; an id that is not valid (``qtrace.queryid``: not UTF-8, too
        long, or with control characters) is none, never a truncated or mangled one."""
        m = self._re.search(data)
        if not m or not m.group(1):
            return None
        return query_id_from_bytes(m.group(1).rstrip(b" \t") if self._trim else m.group(1))
