"""Where decoded events go. One interface: a JSON-lines file now, the collector later."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, Protocol

import orjson

from agent.model import Event


class EventSink(Protocol):
    def write(self, events: Sequence[Event]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line; flushed after every batch so a crash loses at most one."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._f: IO[bytes] = self.path.open("wb")
        self.written = 0

    def write(self, events: Sequence[Event]) -> None:
        if not events:
            return
        # orjson serialises the slotted dataclass directly, ~10x faster than json.dumps.
        dumps, nl = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        self._f.write(b"".join(dumps(e, option=nl) for e in events))
        self._f.flush()
        self.written += len(events)

    def close(self) -> None:
        self._f.close()


class ListSink:
    """Keeps events in memory (the Python API, tests, benchmarks)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    def close(self) -> None:
        pass
