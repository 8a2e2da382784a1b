"""Deterministic on-disk inverted index, split over shard files.

Layout of each ``shard-<i>.idx`` (little endian, all blocks BLOCK_SIZE bytes):

* block 0: header ``MAGIC, version, leaf_id, shard, shards, n_buckets, block_size``
* block 1 + b: posting block of bucket ``b``: ``u16 count, u16 0`` then
  ``count`` entries of ``u32 doc, f32 score``, zero padded.

A term lookup is therefore exactly one ``os.pread`` per shard file, which is
what the tracer tests count.

In "new deployment" mode a leaf also keeps a twin ``shard-<i>.idx.next`` of each
shard: same layout and header, but every posting's doc id shifted by +1, so a
lookup answered from the twins returns different hits (the stale-index fault).
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from pathlib import Path

MAGIC = b"QTIDX001"
VERSION = 1
BLOCK_SIZE = 512
_HEADER = struct.Struct("<8sIIIIII")
_BLOCK_HEAD = struct.Struct("<HH")
_ENTRY = struct.Struct("<If")
MAX_ENTRIES = (BLOCK_SIZE - _BLOCK_HEAD.size) // _ENTRY.size
MIN_ENTRIES = 8

# Doc ids carry their origin so merged results stay traceable to a leaf/shard.
LEAF_SHIFT = 24
SHARD_SHIFT = 20


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard}.idx"


def twin_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard}.idx.next"


def term_bucket(term: str, n_buckets: int) -> int:
    # crc32 rather than hash(): str hashing is randomised per process.
    return zlib.crc32(term.encode("utf-8")) % n_buckets


def doc_leaf(doc: int) -> int:
    return doc >> LEAF_SHIFT


def _header(leaf_id: int, shard: int, shards: int, n_buckets: int) -> bytes:
    raw = _HEADER.pack(MAGIC, VERSION, leaf_id, shard, shards, n_buckets, BLOCK_SIZE)
    return raw.ljust(BLOCK_SIZE, b"\0")


def _posting_block(leaf_id: int, shard: int, bucket: int) -> bytes:
    rng = random.Random(f"{leaf_id}/{shard}/{bucket}")
    count = rng.randint(MIN_ENTRIES, MAX_ENTRIES)
    base = (leaf_id << LEAF_SHIFT) | (shard << SHARD_SHIFT)
    locals_ = rng.sample(range(1 << SHARD_SHIFT), count)
    parts = [_BLOCK_HEAD.pack(count, 0)]
    parts.extend(_ENTRY.pack(base | d, rng.random()) for d in locals_)
    return b"".join(parts).ljust(BLOCK_SIZE, b"\0")


def _is_current(path: Path, header: bytes, n_buckets: int) -> bool:
    try:
        if path.stat().st_size != BLOCK_SIZE * (1 + n_buckets):
            return False
        with path.open("rb") as f:
            return f.read(BLOCK_SIZE) == header
    except FileNotFoundError:
        return False


def build_index(directory: Path, leaf_id: int, n_buckets: int = 1024, shards: int = 4) -> None:
    """Create (or keep, if already identical) the shard files for one leaf."""
    if not 0 <= leaf_id < 256 or not 0 < shards <= 1 << (LEAF_SHIFT - SHARD_SHIFT):
        raise ValueError("leaf_id or shards out of range for doc id encoding")
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        path = shard_path(directory, shard)
        header = _header(leaf_id, shard, shards, n_buckets)
        if _is_current(path, header, n_buckets):
            continue
        # Write aside and rename so a concurrent reader never sees a torn file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            f.write(header)
            for bucket in range(n_buckets):
                f.write(_posting_block(leaf_id, shard, bucket))
        os.replace(tmp, path)


def shift_block(block: bytes, delta: int = 1) -> bytes:
    """A posting block with every doc id moved by ``delta`` (scores unchanged)."""
    (count, pad) = _BLOCK_HEAD.unpack_from(block)
    end = _BLOCK_HEAD.size + count * _ENTRY.size
    parts = [_BLOCK_HEAD.pack(count, pad)]
    parts.extend(
        _ENTRY.pack((doc + delta) & 0xFFFFFFFF, score)
        for doc, score in _ENTRY.iter_unpack(block[_BLOCK_HEAD.size : end])
    )
    return b"".join(parts).ljust(BLOCK_SIZE, b"\0")


def build_twins(directory: Path) -> list[bytes]:
    """Write ``shard-<i>.idx.next`` for every shard of ``directory``'s index.

    Returns each twin's full content, which a refresher can keep rewriting.
    """
    contents = []
    for shard in range(_shard_count(directory)):
        live = shard_path(directory, shard).read_bytes()
        if len(live) % BLOCK_SIZE:
            raise ValueError(f"{directory}: shard {shard} is not whole blocks")
        blocks = [live[:BLOCK_SIZE]]
        blocks.extend(
            shift_block(live[off : off + BLOCK_SIZE])
            for off in range(BLOCK_SIZE, len(live), BLOCK_SIZE)
        )
        content = b"".join(blocks)
        path = twin_path(directory, shard)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
        contents.append(content)
    return contents


def _shard_count(directory: Path) -> int:
    with shard_path(directory, 0).open("rb") as f:
        magic, version, _, _, shards, _, block = _HEADER.unpack(f.read(_HEADER.size))
    if magic != MAGIC or version != VERSION or block != BLOCK_SIZE:
        raise ValueError(f"{directory}: not a version {VERSION} index")
    return int(shards)


class Index:
    """Read-only view of one leaf's shard files, fds held open for its lifetime."""

    def __init__(self, fds: list[int], leaf_id: int, n_buckets: int) -> None:
        self._fds = fds
        self.leaf_id = leaf_id
        self.n_buckets = n_buckets

    @property
    def shards(self) -> int:
        return len(self._fds)

    @classmethod
    def open(cls, directory: Path, twin: bool = False) -> Index:
        """Open the live shards, or with ``twin`` their ``.idx.next`` twins."""
        path_of = twin_path if twin else shard_path
        fd0 = os.open(path_of(directory, 0), os.O_RDONLY)
        fds = [fd0]
        try:
            magic, version, leaf_id, _, shards, n_buckets, block = _HEADER.unpack(
                os.pread(fd0, _HEADER.size, 0)
            )
            if magic != MAGIC or version != VERSION or block != BLOCK_SIZE:
                raise ValueError(f"{directory}: not a version {VERSION} index")
            for shard in range(1, shards):
                fd = os.open(path_of(directory, shard), os.O_RDONLY)
                fds.append(fd)
                if os.pread(fd, BLOCK_SIZE, 0) != _header(leaf_id, shard, shards, n_buckets):
                    raise ValueError(f"{directory}: shard {shard} does not match")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(fds, leaf_id, n_buckets)

    def lookup(self, term: str) -> tuple[list[tuple[int, float]], int]:
        """Return the postings of ``term`` over all shards and the preads done."""
        results, preads, _ = self.timed_lookup(term)
        return results, preads

    def timed_lookup(self, term: str) -> tuple[list[tuple[int, float]], int, int]:
        """Like :meth:`lookup`, plus the nanoseconds spent inside the preads."""
        offset = BLOCK_SIZE * (1 + term_bucket(term, self.n_buckets))
        results: list[tuple[int, float]] = []
        preads = 0
        pread_ns = 0
        for fd in self._fds:
            start = time.monotonic_ns()
            block = os.pread(fd, BLOCK_SIZE, offset)
            pread_ns += time.monotonic_ns() - start
            preads += 1
            (count, _) = _BLOCK_HEAD.unpack_from(block)
            end = _BLOCK_HEAD.size + count * _ENTRY.size
            results.extend(_ENTRY.iter_unpack(block[_BLOCK_HEAD.size : end]))
        return results, preads, pread_ns

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
