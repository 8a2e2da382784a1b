"""Loading, attaching and talking to the BPF programs in bpf/ (through BCC)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agent import abi
from agent.groups import DEFAULT_GROUPS, PROBE_GROUPS
from agent.recorder import History, Summary, harvest

# Syscall kinds share one enter/exit program pair each: qt_e_<name> / qt_x_<name>.
_TRACEPOINT_KINDS = {
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "block_rq",
    "exec",
    "runq",
    "offcpu",
    "page_fault",
    "mmap_lock",
}
SYSCALL_KINDS = tuple(name for name in abi.KINDS if name not in _TRACEPOINT_KINDS)
PROGRAM_PREFIX = "qt_"


_KIND_PROGRAMS = {
    "inet_sock_set_state": ("qt_sockstate", "sock:inet_sock_set_state"),
    "tcp_retransmit_skb": ("qt_retransmit", "tcp:tcp_retransmit_skb"),
}
# Always attached: they keep request keys, followed children and name targets right.
LIFECYCLE = (
    ("qt_fork", "sched:sched_process_fork"),
    ("qt_exit", "sched:sched_process_exit"),
    ("qt_exec", "sched:sched_process_exec"),
)
SCHED = (
    ("qt_wakeup", "sched:sched_wakeup"),
    ("qt_wakeup_new", "sched:sched_wakeup_new"),
    ("qt_switch", "sched:sched_switch"),
)
BLOCK = (
    ("qt_blk_queue", "block:block_bio_queue"),
    ("qt_blk_complete", "block:block_rq_complete"),
)
MMAP_LOCK = (
    ("qt_mm_start", "mmap_lock:mmap_lock_start_locking"),
    ("qt_mm_acquired", "mmap_lock:mmap_lock_acquire_returned"),
    ("qt_mm_released", "mmap_lock:mmap_lock_released"),
)


@dataclass(frozen=True)
class ProbeConfig:
    ring_pages: int = 1024  # 4 MiB: ~40k events between two drains
    capture_bytes: int = abi.DEFAULT_CAP_BYTES
    groups: frozenset[str] = frozenset(DEFAULT_GROUPS)
    max_event_rate: int = 0  # events/s leaving the kernel, per node; 0: no limit
    # Flight recorder: events stay in a per-CPU history of this many slots per CPU and
    # requests are summed in the kernel; 0: full capture (every event leaves the kernel).
    history_slots: int = 0
    # Recorder: the query-id header, found by the kernel itself (lower case); "" when the
    # session extracts ids by regex, which only user space can run.
    qid_header: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset().union(*(PROBE_GROUPS[g] for g in self.groups))

    def attachments(self) -> list[tuple[str, str]]:
        kinds = self.kinds()
        out = [
            (f"qt_{p}_{name}", f"syscalls:sys_{d}_{name}")
            for name in SYSCALL_KINDS
            if name in kinds
            for p, d in (("e", "enter"), ("x", "exit"))
        ]
        out += [_KIND_PROGRAMS[k] for k in sorted(_KIND_PROGRAMS) if k in kinds]
        if "block_rq" in kinds:
            out += BLOCK
        if kinds & {"runq", "offcpu", "page_fault"}:
            out += SCHED  # sleeps end at a wakeup; CPU waits start at one
        if "page_fault" in kinds:
            out.append(("qt_pagefault", "exceptions:page_fault_user"))
        if "mmap_lock" in kinds:
            out += MMAP_LOCK
        return out + list(LIFECYCLE)

    def qid_flags(self) -> list[str]:
        """Recorder sessions with a header extractor find query ids in the kernel: letters,
        digits and '-' only (the kernel folds case by setting bit 0x20, which all of these
        have once lower case), up to 16 bytes."""
        name = self.qid_header.lower()
        if not self.history_slots or not re.fullmatch(r"[a-z0-9-]{1,16}", name):
            return []
        return ["-DQT_QID_KERNEL=1"]

    def cflags(self) -> list[str]:
        return [
            f"-I{abi.BPF_DIR}",
            f"-DQT_RB_PAGES={self.ring_pages}",
            f"-DQT_CAP_BYTES={self.capture_bytes}",
            f"-DQT_SCHED={int('sched' in self.groups)}",
            f"-DQT_MEMORY={int('memory' in self.groups)}",
            f"-DQT_NODE={int('node' in self.groups)}",
            f"-DQT_RECORDER={int(self.history_slots > 0)}",
            f"-DQT_HIST_SLOTS={max(self.history_slots, 1)}",
            f"-DQT_HIST_CPUS={possible_cpus()}",
            *self.qid_flags(),
            "-Wno-macro-redefined",
        ]


def possible_cpus() -> int:
    """CPU ids the kernel may use (bpf_get_smp_processor_id() is below this)."""
    from bcc.utils import get_possible_cpus

    return int(max(get_possible_cpus())) + 1


def history_slots(history_bytes: int) -> int:
    """Slots per CPU for a history of about ``history_bytes`` in all."""
    return max(16, history_bytes // (abi.HSLOT_SIZE * possible_cpus()))


def name_hash(path: str) -> int:
    """FNV-1a of a path's last component, as bpf/qtrace.bpf.c computes it."""
    return abi.fnv1a(path.encode().rsplit(b"/", 1)[-1])


class Probes:
    """The loaded programs and their maps. Detached by ``close()`` or by process death
    (every attachment is held by a file descriptor of this process)."""

    def __init__(self, config: ProbeConfig | None = None) -> None:
        from bcc import BPF  # imported late: preflight explains a missing bcc first

        self.config = config or ProbeConfig()
        self._bpf = BPF(src_file=str(abi.PROGRAM).encode(), cflags=self.config.cflags())
        self._attached: list[str] = []
        if self.config.qid_flags():  # before any program runs
            table = self._bpf[b"qid_name"]
            leaf = table.Leaf()
            name = self.config.qid_header.lower().encode().ljust(16, b"\0")
            mask = bytes(0xFF if c else 0 for c in name)
            for i in range(2):
                leaf.w[i] = int.from_bytes(name[8 * i : 8 * i + 8], "little")
                leaf.mask[i] = int.from_bytes(mask[8 * i : 8 * i + 8], "little")
            leaf.len = len(self.config.qid_header)
            table[ctypes.c_int(0)] = leaf
            from bcc import BPF as _BPF

            tail = self._bpf.load_func(b"qt_request", _BPF.TRACEPOINT)
            self._bpf[b"request_prog"][ctypes.c_int(0)] = ctypes.c_int(tail.fd)
        try:
            for fn, tp in self.config.attachments():
                self._bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
                self._attached.append(tp)
        except Exception:
            self._bpf.cleanup()
            raise
        self._records: list[bytes] = []
        self._control: list[bytes] = []
        self._bpf[b"events"].open_ring_buffer(self._on_event)
        self._bpf[b"control"].open_ring_buffer(self._on_control)
        self._tgids = self._bpf[b"traced_tgids"]
        self._cgroups = self._bpf[b"traced_cgroups"]
        self._ports = self._bpf[b"traced_ports"]
        self._fds = self._bpf[b"fds"]
        self._closed = False

    # -- ring buffers ------------------------------------------------------------------

    def _on_event(self, _ctx: object, data: int, size: int) -> None:
        self._records.append(ctypes.string_at(data, size))

    def _on_control(self, _ctx: object, data: int, size: int) -> None:
        self._control.append(ctypes.string_at(data, size))

    def drain(self) -> tuple[list[bytes], list[bytes]]:
        """Everything submitted so far: (event records, control records)."""
        self._bpf.ring_buffer_consume()
        records, self._records = self._records, []
        control, self._control = self._control, []
        return records, control

    # -- targets, updated live -----------------------------------------------------------

    def add_tgid(self, tgid: int) -> None:
        self._tgids[ctypes.c_uint32(tgid)] = ctypes.c_uint8(1)

    def remove_tgid(self, tgid: int) -> None:
        with contextlib.suppress(KeyError):
            del self._tgids[ctypes.c_uint32(tgid)]

    def add_cgroup(self, cgroup_id: int) -> None:
        self._cgroups[ctypes.c_uint64(cgroup_id)] = ctypes.c_uint8(1)

    def remove_cgroup(self, cgroup_id: int) -> None:
        with contextlib.suppress(KeyError):
            del self._cgroups[ctypes.c_uint64(cgroup_id)]

    def add_port(self, port: int) -> None:
        # The tracepoint reports ports in host order.
        self._ports[ctypes.c_uint16(port)] = ctypes.c_uint8(1)

    def watch_exec(self, on: bool) -> None:
        self._bpf[b"config"][ctypes.c_int(0)] = ctypes.c_uint64(1 if on else 0)

    def lock_context(self, on: bool) -> None:
        """Trace file locks of every process on the node (holders are neighbours)."""
        self._bpf[b"config"][ctypes.c_int(2)] = ctypes.c_uint64(1 if on else 0)

    def watch_file(self, path: str, st_dev: int) -> None:
        """Node group: neighbours touching this file (by base name, checked in user space
        against the full path), and every process's I/O on its disk, become events."""
        self._bpf[b"watched_names"][ctypes.c_uint32(name_hash(path))] = ctypes.c_uint8(1)
        dev = (os.major(st_dev) << 20) | os.minor(st_dev)  # the kernel's dev_t encoding
        with contextlib.suppress(Exception):  # a full map: that disk's I/O is not seen
            self._bpf[b"watched_devs"][ctypes.c_uint32(dev)] = ctypes.c_uint8(1)

    def in_traced_cgroup(self, tgid: int) -> bool:
        """Node group: whether the kernel has seen this process make a syscall from a
        traced cgroup (a pod's), so that its /proc entries are the targets'."""
        try:
            self._bpf[b"cgroup_tgids"][ctypes.c_uint32(tgid)]
        except KeyError:  # not seen, or no node group (then the map does not exist)
            return False
        return True

    def unwatch_fd(self, tgid: int, fd: int) -> None:
        """A neighbour's fd whose base name matched but whose file is not a target's."""
        leaf = self._fds.Leaf()
        leaf.type = abi.FD_OTHER
        with contextlib.suppress(Exception):
            self._fds[self._fds.Key(tgid, fd)] = leaf

    def limit_rate(self, events_per_s: int) -> None:
        """Cap what leaves the kernel (0: no cap), spread evenly over the CPUs; the rest
        is counted as ``shed``, with one in 64 still shipped as a sample."""
        per_cpu = -(-events_per_s // (os.cpu_count() or 1)) if events_per_s > 0 else 0
        self._bpf[b"config"][ctypes.c_int(3)] = ctypes.c_uint64(per_cpu)

    def capture_requests(self, on: bool) -> None:
        """Follow requests past their first read until QT_CAP_BYTES are shipped."""
        self._bpf[b"config"][ctypes.c_int(1)] = ctypes.c_uint64(1 if on else 0)

    def set_fd_type(self, tgid: int, fd: int, fdtype: int) -> None:
        """Teach the kernel what an fd it has not seen created is (``abi.FD_*``)."""
        key = self._fds.Key(tgid, fd)
        if self._fds.get(key) is not None:
            return  # the kernel saw it created (or already learned it): its state wins
        leaf = self._fds.Leaf()
        leaf.type = fdtype
        with contextlib.suppress(Exception):  # a full map only costs filtering
            self._fds[key] = leaf

    # -- flight recorder -----------------------------------------------------------------

    def open_history(self) -> History:
        """The recent history, mapped (recorder sessions only)."""
        return History(
            self._bpf[b"history"],
            self._bpf[b"hist_head"],
            self.config.history_slots,
            possible_cpus(),
        )

    def harvest(self, idle_ns: int) -> list[Summary]:
        """Summaries of the requests that are over (no event for ``idle_ns``)."""
        return harvest(self._bpf[b"reqsums"], idle_ns)

    # -- counters ------------------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        """Per kind, the counters summed over CPUs; kinds with all zeros are left out."""
        table = self._bpf[b"counters"]
        out: dict[str, dict[str, int]] = {}
        for kind, kname in abi.KIND_NAMES.items():
            row = {}
            for cname, c in abi.COUNTERS.items():
                row[cname] = sum(table.getvalue(kind * abi.COUNTER_MAX + c))
            if any(row.values()):
                out[kname] = row
        return out

    def detach(self) -> None:
        """Stop producing events; maps and buffers stay readable for a final drain.

        Each tracepoint detach waits for an RCU grace period (~75 ms here, 4.5 s for all
        of them in a row), so the perf fds are closed from parallel threads, whose waits
        overlap. BCC's own detach_tracepoint does the same close, one at a time."""
        from bcc.libbcc import lib

        fds: dict[bytes, int] = dict(self._bpf.tracepoint_fds)
        if fds:
            with ThreadPoolExecutor(max_workers=len(fds)) as pool:
                list(pool.map(lib.bpf_close_perf_event_fd, fds.values()))
        self._bpf.tracepoint_fds.clear()
        self._attached.clear()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bpf.cleanup()
