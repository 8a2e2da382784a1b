"""What an fd of a traced process is: a file path or a TCP connection.

Resolved once per (pid, fd) and cached; the cache follows the event stream (open, accept
and connect set an entry, close drops it), so a reused fd number is never confused with
the file it used to be. Fds the kernel did not see created are looked up in /proc and the
kernel is taught their type, so that it can suppress pipes and attribute accepted sockets.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from agent import abi
from agent.netns import NetnsTable, SockInfo, netns_id

AT_FDCWD = -100


@dataclass(slots=True)
class FdEntry:
    fdtype: int
    target: str | None
    created_ns: int = 0  # kernel time the fd came to be (0: found in /proc)


def sockaddr_str(raw: bytes) -> str | None:
    """A raw struct sockaddr (from connect/accept arguments) as ip:port."""
    if len(raw) < 8:
        return None
    family, port = struct.unpack_from("<H", raw)[0], struct.unpack_from(">H", raw, 2)[0]
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{port}"
    if family == socket.AF_INET6 and len(raw) >= 24:
        return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
    return None


class FdResolver:
    def __init__(self, teach: Callable[[int, int, int], None]) -> None:
        self._teach = teach
        self._fds: dict[tuple[int, int], FdEntry] = {}
        self._netns: dict[int, NetnsTable] = {}
        self._refreshed: set[int] = set()  # namespaces dumped during this drain cycle
        # Our side of TCP connections, from the kernel's ESTABLISHED events, which arrive
        # before the accept or connect that returns the socket: by the peer (server side,
        # where the client's port makes it unique) and by thread and peer (client side).
        self._est_peer: dict[str, str] = {}
        self._est_tid: dict[tuple[int, str], str] = {}
        # Flight recorder: what each fd number was since a moment, so that an event read
        # from the recent history seconds later resolves to the file or connection it had
        # then, not to whatever reuses the number now. ``as_of`` set: resolve as of then.
        self.keep_past = False
        self.as_of: int | None = None
        self._past: dict[tuple[int, int], list[FdEntry]] = {}

    def new_cycle(self) -> None:
        self._refreshed.clear()

    # -- sockets -------------------------------------------------------------------------

    def _table(self, pid: int) -> NetnsTable | None:
        ns = netns_id(pid)
        if ns is None:
            return None
        table = self._netns.get(ns)
        if table is None:
            try:
                table = self._netns[ns] = NetnsTable(pid)
            except OSError:
                return None
        return table

    def _sock(self, pid: int, inode: int) -> SockInfo | None:
        table = self._table(pid)
        if table is None:
            return None
        info = table.by_inode.get(inode)
        ns = id(table)
        if info is None and ns not in self._refreshed:
            self._refreshed.add(ns)  # one dump per namespace per cycle, however many misses
            table.refresh()
            info = table.by_inode.get(inode)
        return info

    def listen_ports(self, pid: int) -> set[int]:
        """Listening ports held by pid's sockets (for the kernel's TCP tracepoint filter)."""
        table = self._table(pid)
        if table is None:
            return set()
        table.refresh(force=True)
        ports = set()
        for ino in _socket_inodes(pid):
            info = table.by_inode.get(ino)
            if info and info.listening:
                ports.add(info.local_port)
        return ports

    # -- lookups -------------------------------------------------------------------------

    def _from_proc(self, pid: int, fd: int) -> FdEntry | None:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            link = os.readlink(path)
            st = os.stat(path)
        except OSError:
            return None
        if stat.S_ISSOCK(st.st_mode):
            info = self._sock(pid, st.st_ino)
            if info is None:
                return FdEntry(abi.FD_SOCK, None)
            table = self._table(pid)
            inbound = table is not None and info.local_port in table.listen_ports
            return FdEntry(abi.FD_SOCK_IN if inbound else abi.FD_SOCK_OUT, info.target)
        if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
            return FdEntry(abi.FD_FILE, link)
        return FdEntry(abi.FD_OTHER, link)

    def _remember(self, key: tuple[int, int], entry: FdEntry) -> None:
        if self.keep_past:
            self._past.setdefault(key, []).append(entry)

    def _then(self, key: tuple[int, int], at_ns: int) -> FdEntry | None:
        """What the fd was at ``at_ns``: the latest creation seen before it, else what it
        is now if that was not created later."""
        past = self._past.get(key)
        if past:
            i = bisect.bisect_right([e.created_ns for e in past], at_ns)
            if i:
                return past[i - 1]
        entry = self._fds.get(key)
        if entry is not None and entry.created_ns > at_ns:
            return None
        return entry

    def known(self, pid: int, fd: int) -> str | None:
        """What the fd is known to be now, without asking /proc."""
        entry = self._fds.get((pid, fd))
        return entry.target if entry else None

    def trim(self, before_ns: int) -> None:
        """Forget creations that no history read can ask about any more (but the latest
        of each fd, which may still be what it is)."""
        for key in list(self._past):
            past = self._past[key]
            keep = [e for e in past[:-1] if e.created_ns >= before_ns] + past[-1:]
            if keep[0].created_ns < before_ns and not os.path.exists(f"/proc/{key[0]}"):
                del self._past[key]  # its process is gone: nobody will ask
            else:
                self._past[key] = keep

    def lookup(self, pid: int, fd: int, fdtype: int) -> FdEntry | None:
        key = (pid, fd)
        if self.as_of is not None:
            then = self._then(key, self.as_of)
            if then is not None or key in self._past:
                return then
        entry = self._fds.get(key)
        if entry is None:
            entry = self._from_proc(pid, fd)
            if entry is None:
                return None
            self._fds[key] = entry
            if fdtype == abi.FD_UNKNOWN:
                self._teach(pid, fd, entry.fdtype)
        elif entry.target is None and entry.fdtype in (
            abi.FD_SOCK,
            abi.FD_SOCK_IN,
            abi.FD_SOCK_OUT,
        ):
            # A socket seen before it was connected: try again, it may have a peer now.
            fresh = self._from_proc(pid, fd)
            if fresh is not None and fresh.target is not None:
                entry.target = fresh.target
        return entry

    # -- what events tell us ---------------------------------------------------------------

    def opened(self, pid: int, fd: int, path: str, dirfd: int, at_ns: int = 0) -> str:
        if not path.startswith("/"):
            base = None
            if dirfd == AT_FDCWD:
                with contextlib.suppress(OSError):
                    base = os.readlink(f"/proc/{pid}/cwd")
            else:
                parent = self._fds.get((pid, dirfd))
                base = parent.target if parent else None
            if base:
                path = os.path.normpath(os.path.join(base, path))
        entry = FdEntry(abi.FD_FILE, path, created_ns=at_ns)
        if self.as_of is not None:
            # Read back from the recent history: it was so then, whatever it is now.
            past = self._past.setdefault((pid, fd), [])
            if not any(e.created_ns == at_ns for e in past):
                bisect.insort(past, entry, key=lambda e: e.created_ns)
            return path
        self._fds[(pid, fd)] = entry
        self._remember((pid, fd), entry)
        return path

    def established(self, tid: int, local: str, peer: str) -> None:
        if tid:
            self._est_tid[(tid, peer)] = local
        self._est_peer[peer] = local
        for table in (self._est_tid, self._est_peer):
            if len(table) > 50_000:
                for old in list(table)[:10_000]:
                    del table[old]  # type: ignore[arg-type]

    def connected(
        self,
        pid: int,
        fd: int,
        fdtype: int,
        peer: str | None,
        listener: int | None = None,
        tid: int = 0,
        at_ns: int = 0,
    ) -> str | None:
        """A socket from accept (``listener`` is the listening fd) or connect."""
        self._fds.pop((pid, fd), None)
        if peer:
            local = (
                self._est_tid.pop((tid, peer), None)
                if listener is None
                else self._est_peer.pop(peer, None)
            )
            if local is not None:
                self._fds[(pid, fd)] = new = FdEntry(fdtype, f"{local}->{peer}", created_ns=at_ns)
                self._remember((pid, fd), new)
                return f"{local}->{peer}"
        entry = self._from_proc(pid, fd)
        # By the time we look the fd may already be closed and its number reused: the
        # syscall's own peer address is the truth, /proc and sock_diag only add our side.
        if entry is not None and peer and (entry.target or "").split("->")[-1] != peer:
            entry = None
        if entry is None or entry.target is None:
            # Gone before we looked (short connections): the peer comes from the syscall's
            # arguments, our side from the listening socket, which outlives it.
            local = "?"
            if listener is not None:
                lst = self.lookup(pid, listener, abi.FD_SOCK)
                if lst is not None and lst.target:
                    local = lst.target.split("->", 1)[0]
            entry = FdEntry(fdtype, f"{local}->{peer}" if peer else None)
        else:
            entry.fdtype = fdtype  # the kernel saw accept/connect: it knows the direction
        entry.created_ns = at_ns
        self._fds[(pid, fd)] = entry
        self._remember((pid, fd), entry)
        return entry.target

    def closed(self, pid: int, fd: int, at_ns: int) -> str | None:
        """``at_ns``: when close began. Another thread may have reused the number between
        the close and its event (which is emitted at exit): that newer fd stays."""
        if self.as_of is not None:
            then = self._then((pid, fd), at_ns)
            return then.target if then is not None else None
        entry = self._fds.get((pid, fd))
        if entry is None:
            return None
        if entry.created_ns <= at_ns:
            del self._fds[(pid, fd)]
        return entry.target

    def forget_process(self, pid: int) -> None:
        for key in [k for k in self._fds if k[0] == pid]:
            del self._fds[key]

    def close(self) -> None:
        for table in self._netns.values():
            table.close()
        self._netns.clear()


def _socket_inodes(pid: int) -> list[int]:
    out: list[int] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            if link.startswith("socket:["):
                out.append(int(link[8:-1]))
    return out
