"""TCP socket tables of network namespaces, through sock_diag (pyroute2)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from dataclasses import dataclass

from pyroute2 import DiagSocket
from pyroute2.netlink import NETLINK_SOCK_DIAG
from pyroute2.netlink.diag import MarshalDiag
from pyroute2.netlink.nlsocket import NetlinkSocket

_CLONE_NEWNET = 0x40000000
_TCP_LISTEN = 10
# Live states only: a busy server holds tens of thousands of TIME_WAIT sockets, which have
# no inode (nothing to resolve) and would make every dump slow.
_LIVE_STATES = sum(1 << s for s in (1, 2, 3, 4, 5, 8, 9, 10, 11))


@dataclass(frozen=True, slots=True)
class SockInfo:
    local: str
    remote: str
    local_port: int
    listening: bool

    @property
    def target(self) -> str:
        return f"{self.local}->{self.remote}"


def _fmt(addr: str, port: int, family: int) -> str:
    return f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"


def netns_id(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class _DiagOver(DiagSocket):  # type: ignore[misc]
    """pyroute2's sock_diag client over a netlink socket made elsewhere. pyroute2 makes its
    own socket lazily, per thread, in the namespace of whichever thread asks first."""

    def __init__(self, sock: socket.socket) -> None:
        NetlinkSocket.__init__(self, NETLINK_SOCK_DIAG, use_socket=sock)
        self.set_marshal(MarshalDiag())


def _open_diag(pid: int) -> DiagSocket:
    """A sock_diag socket inside pid's network namespace (a pod's, say).

    A netlink socket belongs to the namespace it was created in, so it is created by a
    short-lived thread that first joins the namespace (setns only moves that thread)."""
    if netns_id(pid) == netns_id(os.getpid()):
        ds = DiagSocket()
        ds.bind()
        return ds
    result: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=enter, name="qtrace-netns")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    ds = _DiagOver(result[0])
    ds.bind()
    return ds


class NetnsTable:
    """inode -> SockInfo for one network namespace, refreshed by full dumps on a miss."""

    def __init__(self, pid: int, min_interval: float = 0.05) -> None:
        self._diag = _open_diag(pid)
        self.by_inode: dict[int, SockInfo] = {}
        self.listen_ports: set[int] = set()
        self._min_interval = min_interval
        self._last = -1.0

    def refresh(self, force: bool = False) -> None:
        """Dump the namespace's sockets, at most every ``min_interval`` unless forced:
        decoding a dump costs far more than a miss, which falls back to syscall args."""
        now = time.monotonic()
        if not force and now - self._last < self._min_interval:
            return
        self._last = now
        table: dict[int, SockInfo] = {}
        ports: set[int] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in self._diag.get_sock_stats(family=family, states=_LIVE_STATES):
                ino = m.get("idiag_inode")
                sport = m.get("idiag_sport")
                listening = m.get("idiag_state") == _TCP_LISTEN
                if listening:
                    ports.add(sport)
                if not ino:
                    continue  # TIME_WAIT and friends have no inode
                table[ino] = SockInfo(
                    local=_fmt(m.get("idiag_src"), sport, family),
                    remote=_fmt(m.get("idiag_dst"), m.get("idiag_dport"), family),
                    local_port=sport,
                    listening=listening,
                )
        self.by_inode = table
        self.listen_ports = ports

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._diag.close()
