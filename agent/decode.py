"""Kernel records -> attributed, resolved, wall-clock Events."""

from __future__ import annotations

import re
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from agent import abi
from agent.clock import WallClock
from agent.extract import QueryIdExtractor
from agent.fdresolve import FdResolver, sockaddr_str
from agent.groups import NET_KINDS
from agent.memmaps import MemoryMaps
from agent.model import Event

_TCP_STATES = (
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
)
_SOCK_TYPES = (abi.FD_SOCK_IN, abi.FD_SOCK_OUT, abi.FD_SOCK)
_K = abi.KINDS
_NEW_CONN = (_K["accept"], _K["accept4"], _K["connect"])
_PATH_ONLY = (_K["unlink"], _K["unlinkat"])
_RENAMES = (_K["rename"], _K["renameat2"])
_TCP = (_K["inet_sock_set_state"], _K["tcp_retransmit_skb"])
_MEMORY = (_K["page_fault"], _K["mmap_lock"])
_LOCKS = (_K["flock"], _K["fcntl"])
_PROC_PID = re.compile(r"^/proc/(\d+)(/|$)")


MAX_PATHS = 200_000


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def _tuple_target(payload: bytes) -> str:
    family, sport, dport, _pad, saddr, daddr = abi.TUPLE.unpack_from(payload)
    if family == socket.AF_INET:
        s, d = socket.inet_ntop(family, saddr[:4]), socket.inet_ntop(family, daddr[:4])
        return f"{s}:{sport}->{d}:{dport}"
    s, d = socket.inet_ntop(socket.AF_INET6, saddr), socket.inet_ntop(socket.AF_INET6, daddr)
    return f"[{s}]:{sport}->[{d}]:{dport}"


_CONTENT_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*(\d+)")


def request_complete(buf: bytes, limit: int) -> bool:
    """Whether a captured request needs no more reads: a whole HTTP request (headers and
    Content-Length body), anything that is not HTTP, or the capture limit reached."""
    if len(buf) >= limit:
        return True
    first = buf.split(b"\r\n", 1)[0]
    if b" HTTP/1." not in first:
        return b"\n" in buf or len(buf) > 64  # not HTTP: the first read is what we get
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    m = _CONTENT_LENGTH.search(buf, 0, end)
    return m is None or len(buf) - (end + 4) >= int(m.group(1))


def headers_only(request: bytes) -> bytes:
    """A captured request without its body: bodies leave the node only when asked for."""
    end = request.find(b"\r\n\r\n")
    return request if end < 0 else request[: end + 4]


class RequestTable:
    """Kernel request key -> query id (None when the request carried none)."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self._ids: dict[int, str | None] = {}
        self._limit = limit

    def set(self, key: int, query_id: str | None) -> None:
        self._ids[key] = query_id
        if len(self._ids) > self._limit:
            for old in list(self._ids)[: self._limit // 10]:
                del self._ids[old]

    def get(self, key: int) -> str | None:
        return self._ids.get(key) if key else None


class Decoder:
    def __init__(
        self,
        extractor: QueryIdExtractor,
        resolver: FdResolver,
        clock: WallClock,
        capture: tuple[bool, bool] = (False, False),
        capture_limit: int = abi.DEFAULT_CAP_BYTES,
    ) -> None:
        """``capture``: (keep request bytes, keep their bodies too)."""
        self.capture_requests, self.capture_bodies = capture
        self.capture_limit = capture_limit
        self._partial: dict[int, bytes] = {}
        self.lock_paths: set[str] = set()
        self.context_skipped = 0
        self.is_target: Callable[[int, int], bool] = lambda tgid, cgroup_id: True
        # Node group: the targets' files are taught to the kernel as they show up, and
        # what neighbours did to them is kept (what merely shares a base name is not).
        self.node_context = False
        self.watch_file: Callable[[str], None] = lambda path: None
        self.unwatch_fd: Callable[[int, int], None] = lambda tgid, fd: None
        self.watched: set[str] = set()
        self.maps = MemoryMaps()
        self._tgids: dict[int, int] = {}
        self.extractor = extractor
        self.resolver = resolver
        self.clock = clock
        self.requests = RequestTable()
        self.received: Counter[str] = Counter()
        # Flight recorder: each request's first read (its thread, name and connection),
        # for the summary the kernel hands over once the request is done.
        self.starts: dict[int, Event] | None = None
        # Flight recorder: absolute paths sent once per process, later opens of them
        # carrying only their hash; and whether events are being read back from the
        # recent history (a request's id is then known from its summary already).
        self.paths: dict[tuple[int, int], str] = {}
        self.replaying = False

    def decode(self, rec: bytes) -> Event | None:
        (
            ts_enter,
            ts_exit,
            cgroup_id,
            req_key,
            ret,
            arg0,
            arg1,
            tgid,
            tid,
            fd,
            kind,
            fdtype,
            flags,
            plen,
            pkind,
            _record,
            comm,
        ) = abi.EVENT.unpack_from(rec)
        name = abi.KIND_NAMES.get(kind)
        if name is None:
            return None
        self.received[name] += 1
        payload = rec[abi.EVENT.size : abi.EVENT.size + plen] if plen else b""
        detail: dict[str, Any] | None = None

        request: bytes | None = None
        if flags & abi.F_REQ_START and self.replaying:
            pass  # its id came with its summary; the bytes kept are cut short
        elif flags & abi.F_REQ_START:
            self.requests.set(req_key, self.extractor.extract(payload))
            if self.capture_requests:
                request = self._capture(req_key, payload, start=True)
        elif flags & abi.F_REQ_CONT and self.capture_requests:
            request = self._capture(req_key, payload, start=False)

        target: str | None = None
        res = self.resolver
        if kind in _TCP:
            target = _tuple_target(payload) if pkind == abi.P_TUPLE else None
            if kind == _K["inet_sock_set_state"]:
                detail = {"old": _TCP_STATES[arg0 % 13], "new": _TCP_STATES[arg1 % 13]}
                if arg1 == 1 and target:  # ESTABLISHED: our side of the coming accept/connect
                    ours, theirs = target.split("->", 1)
                    res.established(tid, ours, theirs)
                if arg1 == 7:  # TCP_CLOSE: ret carries how long the connection lived
                    detail["lifetime_ns"] = ret
                    ret = 0
            else:
                detail = {"state": _TCP_STATES[arg0 % 13]}
        elif kind == _K["runq"]:
            running = _cstr(payload)
            target = f"cpu {arg1} (running {running} {arg0})"
            detail = {
                "cpu": arg1,
                "running_pid": self._tgid_of(int(arg0)),
                "running_tid": arg0,
                "running_comm": running,
            }
        elif kind == _K["page_fault"]:
            target = self.maps.name_at(tgid, int(arg0))
            detail = {"address": hex(arg0), "fault_ns": self.clock.to_wall(int(arg1))}
        elif kind == _K["mmap_lock"]:
            holder_tid = int(arg0) & 0xFFFFFFFF
            target = f"mmap_lock of pid {tgid}"
            detail = {"write": bool(arg1 & 1)}
            if holder_tid:
                detail |= {
                    "holder_pid": int(arg0) >> 32,
                    "holder_tid": holder_tid,
                    "holder_comm": _cstr(payload),
                    "holder_write": bool(arg1 & 2),
                }
        elif kind == _K["block_rq"]:
            dev = arg1 >> 32
            major, minor = dev >> 20, dev & 0xFFFFF
            target = f"dev {major}:{minor}"
            detail = {"sector": arg0, "sectors": arg1 & 0xFFFFFFFF}
        elif kind == _K["openat"]:
            if pkind == abi.P_PATH_HASH:
                h = int.from_bytes(payload[:4], "little")
                path = self.paths.get((tgid, h), f"?path#{h:08x}")
            else:
                path = _cstr(payload)
                if path.startswith("/") and self.starts is not None:
                    self.paths[(tgid, abi.fnv1a(path.encode()))] = path
                    if len(self.paths) > MAX_PATHS:  # the kernel sends evicted ones again
                        for old in list(self.paths)[: MAX_PATHS // 10]:
                            del self.paths[old]
            dirfd = ((int(arg0) & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000  # an int: AT_FDCWD < 0
            target = res.opened(tgid, fd, path, dirfd, ts_exit) if ret >= 0 else path
        elif kind in _NEW_CONN:
            peer = sockaddr_str(payload) if pkind == abi.P_SOCKADDR else None
            if ret >= 0 or ret == -115:
                listener = int(arg0) if kind != _K["connect"] and arg0 < 1 << 31 else None
                target = res.connected(tgid, fd, fdtype, peer, listener, tid, ts_exit)
            else:
                target = f"?->{peer}" if peer else None
        elif kind == _K["close"]:
            target = res.closed(tgid, fd, ts_enter)
        elif kind in _PATH_ONLY:
            target = _cstr(payload)
        elif kind in _RENAMES:
            half = len(payload) // 2
            target = f"{_cstr(payload[:half])} => {_cstr(payload[half:])}"
        elif fd >= 0:
            entry = res.lookup(tgid, fd, fdtype)
            if entry is not None:
                target = entry.target
                fdtype = entry.fdtype if fdtype == abi.FD_UNKNOWN else fdtype
            if kind in _LOCKS:
                # Node-wide: a neighbour's lock matters only on a file our targets lock.
                if self.is_target(tgid, cgroup_id):
                    if target:
                        self.lock_paths.add(target)
                elif target not in self.lock_paths:
                    self.context_skipped += 1  # received, deliberately not kept
                    return None
                op = int(arg0)
                if kind == _K["flock"]:
                    what = {1: "LOCK_SH", 2: "LOCK_EX", 8: "LOCK_UN"}.get(op & 11, str(op))
                    detail = {"op": what + ("|LOCK_NB" if op & 4 else "")}
                else:  # the command, and the lock type as an exclusive/shared word
                    cmd = {6: "F_SETLK", 7: "F_SETLKW", 37: "F_OFD_SETLK", 38: "F_OFD_SETLKW"}
                    lock = {0: "LOCK_SH", 1: "LOCK_EX", 2: "LOCK_UN"}.get(int(arg1), "?")
                    detail = {"op": f"{lock}|{cmd.get(op, str(op))}"}
            if kind in (_K["sendfile64"], _K["splice"]):
                src = res.lookup(tgid, int(arg0), abi.FD_FILE)
                detail = {"in_fd": int(arg0), "in_target": src.target if src else None}

        if name in NET_KINDS or fdtype in _SOCK_TYPES:
            group = "net"
        elif name in ("runq", "offcpu"):
            group = "sched"
        elif kind in _MEMORY:
            group = "memory"
        elif kind in _LOCKS:
            group = "lock"
        elif fdtype == abi.FD_OTHER:
            group = "other"  # pipes, eventfds, ttys: neither network nor storage
        else:
            group = "storage"
            if (
                self.node_context
                and kind != _K["block_rq"]
                and not self._node_kept(tgid, cgroup_id, fd, kind, target)
            ):
                return None
        event = Event(
            ts_ns=self.clock.to_wall(ts_enter),
            dur_ns=ts_exit - ts_enter,
            kind=name,
            pid=tgid,
            tid=tid,
            comm=_cstr(comm),
            fd=fd,
            target=target,
            ret=ret,
            query_id=self.requests.get(req_key),
            request_key=req_key,
            inferred=bool(flags & abi.F_INFERRED),
            group=group,
            cgroup_id=cgroup_id,
            mono_ns=ts_enter,
            detail=detail,
            request=request,
        )
        if self.starts is not None and flags & abi.F_REQ_START and not self.replaying:
            self.starts[req_key] = event
        return event

    def decode_past(self, records: Sequence[bytes], counts: Counter[str]) -> list[Event]:
        """Records read back from the recent history (flight recorder): fds resolve to
        what they were when each event ended, request ids come from the summaries, and
        what is decoded is counted in ``counts`` (``received`` is what normal operation
        costs per event)."""
        live, self.received = self.received, counts
        self.replaying = True
        try:
            out = []
            for rec in records:
                self.resolver.as_of = abi.EVENT.unpack_from(rec)[0]
                e = self.decode(rec)
                if e is not None:
                    out.append(e)
            return out
        finally:
            self.resolver.as_of = None
            self.received = live
            self.replaying = False

    def _node_kept(self, tgid: int, cgroup_id: int, fd: int, kind: int, target: str | None) -> bool:
        """Node group: a target's file becomes watched; a neighbour's event stays only if
        it touched a watched file or a traced process's /proc entry."""
        if not target:
            return True
        paths = target.split(" => ") if kind in _RENAMES else [target]
        if self.is_target(tgid, cgroup_id):
            for path in paths:
                if path.startswith("/") and path not in self.watched and "/proc/" not in path:
                    self.watched.add(path)
                    self.watch_file(path)
            return True
        if kind in _LOCKS:
            return True  # lock context filters itself
        for path in paths:
            m = _PROC_PID.match(path)
            if path in self.watched or (m and self.is_target(int(m.group(1)), -1)):
                return True
        if kind == _K["openat"] and fd >= 0:
            self.unwatch_fd(tgid, fd)  # same base name, another file: stop following it
        self.context_skipped += 1
        return False

    def _capture(self, key: int, payload: bytes, start: bool) -> bytes | None:
        """Assemble a request from its reads; the whole of it rides on the event of the
        read that completes it (or that reaches the capture limit)."""
        if start:
            buf = payload
        elif key in self._partial:
            buf = self._partial.pop(key) + payload
        else:
            return None  # complete already, or its start was not seen
        if self.requests.get(key) is None:
            self.requests.set(key, self.extractor.extract(buf))
        if not request_complete(buf, self.capture_limit):
            self._partial[key] = buf
            if len(self._partial) > 10_000:  # requests that never completed
                self._partial.pop(next(iter(self._partial)))
            return None
        return buf if self.capture_bodies else headers_only(buf)

    def _tgid_of(self, tid: int) -> int:
        """The process of a thread the kernel named only by its task id (cached)."""
        tgid = self._tgids.get(tid)
        if tgid is None:
            tgid = tid
            try:
                with open(f"/proc/{tid}/status") as f:
                    for line in f:
                        if line.startswith("Tgid:"):
                            tgid = int(line.split()[1])
                            break
            except OSError:
                pass
            if len(self._tgids) > 100_000:
                self._tgids.clear()
            self._tgids[tid] = tgid
        return tgid

    def decode_exec(self, rec: bytes) -> tuple[int, str]:
        fields = abi.EVENT.unpack_from(rec)
        return fields[7], _cstr(fields[16])
