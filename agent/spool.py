"""The agent's bounded on-disk spool: batches the collector has not acknowledged yet.

Batches are already sequenced EventBatch messages; the spool stores them whole, agent id
included, so batches written by an agent process that died are shipped by the next one
under their original (agent id, seq) and the collector still stores each exactly once.

Layout: append-only segment files ``seg-<n>.qspool`` in one directory, each a run of
records ``magic | payload length | crc32(payload) | payload``. A segment is deleted once
every batch in it is acknowledged. A crash can leave a torn record at the end of the last
segment; opening the spool keeps every whole record before it and cuts the rest off.

One agent owns a directory at a time (an flock on ``lock``): two agents replaying each
other's batches would double-count nothing, but they would fight over deleting segments.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from qtrace.api.v1 import events_pb2

log = logging.getLogger("qtrace.agent")

MAGIC = b"QSP1"
HEADER = struct.Struct("<4sII")  # magic, payload bytes, crc32 of the payload
SUFFIX = ".qspool"
MIN_BYTES = 64 * 1024
MAX_SEGMENT_BYTES = 64 * 1024 * 1024


class SpoolError(Exception):
    """The spool directory cannot be used at all (at startup)."""


@dataclass(eq=False)
class Segment:
    path: Path
    index: int
    size: int = 0
    records: int = 0
    acked: int = 0


@dataclass(eq=False)
class Entry:
    """Where one batch lives on disk, and what the shipper needs to know without reading it."""

    segment: Segment
    offset: int  # of the payload
    length: int
    agent_id: str
    node: str
    session_id: str
    seq: int
    n_events: int
    final: bool


@dataclass
class Recovered:
    """What a previous agent process left behind, in shipping order."""

    entries: list[Entry] = field(default_factory=list)
    torn_bytes: int = 0  # cut off the end of segments: records a crash tore


class Spool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        if max_bytes < MIN_BYTES:
            raise SpoolError(f"the spool needs at least {MIN_BYTES} bytes, not {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        # Several segments per spool, so acknowledged data is freed while the rest waits.
        self.segment_bytes = segment_bytes or max(
            MIN_BYTES // 4, min(MAX_SEGMENT_BYTES, max_bytes // 8)
        )
        self.error: str | None = None  # why the spool refuses batches, until space is freed
        self.refused = 0  # batches refused, ever
        self._lock_fd = self._take(directory)
        self._segments: list[Segment] = []
        self._writer: tuple[Segment, int] | None = None  # the segment being appended, its fd
        self.recovered = self._recover()

    # -- opening -----------------------------------------------------------------------------

    @staticmethod
    def _take(directory: Path) -> int:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(f"cannot use spool directory {directory}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"spool directory {directory} is in use by another agent") from None
        try:  # a directory we can lock but not write into would fail on the first spill
            probe = directory / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            os.close(fd)
            raise SpoolError(f"cannot write to spool directory {directory}: {e.strerror}") from e
        return fd

    def _recover(self) -> Recovered:
        found = Recovered()
        paths = sorted(self.directory.glob(f"seg-*{SUFFIX}"))
        for path in paths:
            try:
                index = int(path.name[4 : -len(SUFFIX)])
            except ValueError:
                continue
            seg = Segment(path, index)
            entries, good = self._scan(seg)
            seg.size = path.stat().st_size
            if good < seg.size:
                found.torn_bytes += seg.size - good
                log.warning(
                    "spool: %s has %d unreadable bytes at offset %d (a write torn by a crash);"
                    " keeping the %d whole batches before them",
                    path, seg.size - good, good, len(entries),
                )  # fmt: skip
                os.truncate(path, good)
                seg.size = good
            if not entries:
                path.unlink()
                continue
            seg.records = len(entries)
            self._segments.append(seg)
            found.entries.extend(entries)
        # One agent process writes its seqs in order, but batches spilled at a disconnect
        # can land after newer ones: ship each old agent's batches in seq order again.
        first_seen: dict[str, int] = {}
        for e in found.entries:
            first_seen.setdefault(e.agent_id, len(first_seen))
        found.entries.sort(key=lambda e: (first_seen[e.agent_id], e.seq))
        return found

    @staticmethod
    def _scan(seg: Segment) -> tuple[list[Entry], int]:
        return _parse(seg, seg.path.read_bytes())[:2]

    # -- writing -----------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def append(self, batch: events_pb2.EventBatch) -> Entry | None:
        """Writes one batch; None when it does not fit in the bound or the disk refused it
        (the caller counts it as lost; ``error`` says why)."""
        payload = batch.SerializeToString()
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        if self.used_bytes + len(record) > self.max_bytes:
            self._failed(f"spool {self.directory} is full ({self.max_bytes} bytes)")
            return None
        try:
            seg, fd = self._segment_for(len(record))
            before = seg.size
            try:
                written = os.write(fd, record)
                if written != len(record):  # a short write: the disk filled up mid-record
                    raise OSError(28, os.strerror(28))
            except OSError:
                os.ftruncate(fd, before)  # never leave a torn record behind a good one
                raise
        except OSError as e:
            self._failed(f"cannot write to spool {self.directory}: {e.strerror or e}")
            return None
        seg.size += len(record)
        seg.records += 1
        return Entry(
            seg, before + HEADER.size, len(payload), batch.agent_id, batch.node,
            batch.session_id, batch.seq, len(batch.events), batch.final,
        )  # fmt: skip

    def _failed(self, why: str) -> None:
        # One line per episode, not one per batch: small batches may still fit where large
        # ones do not, so a success does not end it; freeing space (an ack) does.
        if self.error is None:
            log.error("%s: dropping batches (counted per session as lost_spool)", why)
        self.error = why
        self.refused += 1

    def _segment_for(self, size: int) -> tuple[Segment, int]:
        if self._writer is not None:
            seg, fd = self._writer
            if seg.size == 0 or seg.size + size <= self.segment_bytes:
                return self._writer
            self._close_writer()
        index = self._segments[-1].index + 1 if self._segments else 1
        seg = Segment(self.directory / f"seg-{index:012d}{SUFFIX}", index)
        fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append(seg)
        self._writer = (seg, fd)
        return self._writer

    def _close_writer(self) -> None:
        """fsync policy: once per segment, when it is finished (and at close).

        A killed agent loses nothing by skipping fsync — written data is in the page cache
        and survives the process. Only a crash of the whole machine loses the unsynced tail,
        and that takes the traced processes' own state with it. An fsync per batch would
        cost milliseconds exactly when the agent is busiest (the collector away, everything
        spilling), so it is paid once per segment instead."""
        if self._writer is None:
            return
        _seg, fd = self._writer
        self._writer = None
        try:
            os.fsync(fd)
        except OSError as e:
            log.warning("spool: fsync of a segment failed: %s", e.strerror)
        finally:
            os.close(fd)

    # -- reading and acknowledging -----------------------------------------------------------

    def read(self, entry: Entry) -> events_pb2.EventBatch | None:
        """The batch an entry points at; None if it can no longer be read."""
        try:
            with entry.segment.path.open("rb") as f:
                f.seek(entry.offset)
                payload = f.read(entry.length)
            return events_pb2.EventBatch.FromString(payload)
        except Exception as e:  # gone, unreadable or undecodable: the caller counts it
            log.error(
                "spool: cannot read batch %d back from %s: %s", entry.seq, entry.segment.path, e
            )
            return None

    def ack(self, entry: Entry) -> None:
        """The collector has the batch; its segment goes once all of its batches are acked."""
        seg = entry.segment
        seg.acked += 1
        if seg.acked < seg.records:
            return
        if self._writer is not None and self._writer[0] is seg:
            self._close_writer()
        seg.path.unlink(missing_ok=True)
        self._segments.remove(seg)
        if self.error is not None:
            log.warning("spool %s has room again (%d batches refused so far)",
                        self.directory, self.refused)  # fmt: skip
            self.error = None

    def close(self) -> None:
        self._close_writer()
        os.close(self._lock_fd)


def read_batches(directory: Path) -> list[events_pb2.EventBatch]:
    """Every whole batch in a spool directory, without taking it over (for inspection)."""
    out: list[events_pb2.EventBatch] = []
    for path in sorted(directory.glob(f"seg-*{SUFFIX}")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # acknowledged and deleted meanwhile
            continue
        out += _parse(Segment(path, 0), data)[2]
    return out


def _parse(seg: Segment, data: bytes) -> tuple[list[Entry], int, list[events_pb2.EventBatch]]:
    """The whole records of a segment's bytes, the offset just after the last of them, and
    the batches themselves."""
    entries: list[Entry] = []
    batches: list[events_pb2.EventBatch] = []
    pos = 0
    while pos + HEADER.size <= len(data):
        magic, length, crc = HEADER.unpack_from(data, pos)
        start = pos + HEADER.size
        payload = data[start : start + length]
        if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            b = events_pb2.EventBatch.FromString(payload)
        except Exception:  # protobuf's DecodeError; a CRC collision is not worth more
            break
        batches.append(b)
        entries.append(
            Entry(seg, start, length, b.agent_id, b.node, b.session_id, b.seq,
                  len(b.events), b.final)
        )  # fmt: skip
        pos = start + length
    return entries, pos, batches
