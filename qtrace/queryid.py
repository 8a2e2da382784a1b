"""What a query id may be, wherever one comes from (request bytes, query logs, reports).

An id travels into SQL parameters, terminal tables, HTML pages and HTTP headers, and is
the key that joins a comparator's verdict to kernel events: it must survive all of them
unchanged. So an id is 1 to MAX_ID_LEN characters of valid UTF-8, every one printable
(no control, format or line-separator characters: nothing that can move a terminal's
cursor, end an HTTP header or reorder text). Anything else is no id at all, rather than a
mangled one that would join to the wrong query.
"""

from __future__ import annotations

MAX_ID_LEN = 256
# A UTF-8 character is at most 4 bytes: longer input cannot be a valid id.
MAX_ID_BYTES = 4 * MAX_ID_LEN


def is_valid_query_id(text: str) -> bool:
    return 0 < len(text) <= MAX_ID_LEN and text.isprintable()


def query_id_from_bytes(raw: bytes) -> str | None:
    """The id these bytes spell, or None when they spell none (see the module doc)."""
    if not raw or len(raw) > MAX_ID_BYTES:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if is_valid_query_id(text) else None


PROBLEM = f"a query id must be 1-{MAX_ID_LEN} printable characters"
