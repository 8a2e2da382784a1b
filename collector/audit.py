"""The audit log: one JSON line per session start, stop, expiry or refusal.

Append-only and fsync'd line by line, so what it says survives a crash of the collector
or the machine; a line is written before the caller is told it succeeded."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from qtrace.errors import QtraceError


def default_path(db: Path) -> Path:
    return db.with_name(db.stem + ".audit.jsonl")


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise QtraceError(
                f"cannot open the audit log {path} ({e.strerror})",
                "pick a writable file with --audit-log",
            ) from None
        self._lock = threading.Lock()

    def record(self, event: str, outcome: str, **fields: Any) -> None:
        """Raises OSError if the line could not be made durable."""
        now = time.time_ns()
        line = {
            "time": dt.datetime.fromtimestamp(now / 1e9, dt.UTC).isoformat(),
            "ts_ns": now,
            "event": event,
            "outcome": outcome,
            **{k: v for k, v in fields.items() if v is not None},
        }
        data = (json.dumps(line, sort_keys=False) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise OSError(f"audit log {self.path} is closed")
            # One write of a whole line on an O_APPEND descriptor: lines never interleave.
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write to the audit log {self.path} (disk full?)")
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
