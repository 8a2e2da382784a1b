"""The event ABI shared with the BPF programs, derived from bpf/qtrace.h.

Enum values are parsed from the header, so there is one definition of them. The struct
layouts are mirrored here as ``struct`` formats and checked against the header by
tests/test_abi.py (which compiles it with the host C compiler).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

BPF_DIR = Path(os.environ.get("QTRACE_BPF_DIR", Path(__file__).resolve().parent.parent / "bpf"))
HEADER = BPF_DIR / "qtrace.h"
PROGRAM = BPF_DIR / "qtrace.bpf.c"


def _parse_enums(text: str) -> dict[str, dict[str, int]]:
    enums: dict[str, dict[str, int]] = {}
    for name, raw in re.findall(r"enum\s+(\w+)\s*\{(.*?)\};", text, re.S):
        body = re.sub(r"/\*.*?\*/", "", raw, flags=re.S)
        enums[name] = {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    return enums


def _strip(prefix: str, values: dict[str, int]) -> dict[str, int]:
    return {k.removeprefix(prefix).lower(): v for k, v in values.items()}


_ENUMS = _parse_enums(HEADER.read_text())

#: kind name (as reported, e.g. ``pread64``) -> number, and back.
KINDS: dict[str, int] = {
    k: v for k, v in _strip("QT_K_", _ENUMS["qt_kind"]).items() if k not in ("none", "max")
}
KIND_NAMES: dict[int, str] = {v: k for k, v in KINDS.items()}
KIND_MAX = _ENUMS["qt_kind"]["QT_K_MAX"]

FDTYPES: dict[str, int] = _strip("QT_FD_", _ENUMS["qt_fdtype"])
FD_UNKNOWN, FD_SOCK_IN, FD_SOCK_OUT, FD_SOCK, FD_FILE, FD_OTHER = (
    FDTYPES[n] for n in ("unknown", "sock_in", "sock_out", "sock", "file", "other")
)

_FLAGS = _strip("QT_F_", _ENUMS["qt_flag"])
F_REQ_START, F_INFERRED, F_NO_ENTER, F_REQ_CONT = (
    _FLAGS[n] for n in ("req_start", "inferred", "no_enter", "req_cont")
)

_PAYLOADS = _strip("QT_P_", _ENUMS["qt_payload"])
P_NONE, P_REQUEST, P_PATH, P_PATH2, P_SOCKADDR, P_TUPLE, P_PATH_HASH = (
    _PAYLOADS[n] for n in ("none", "request", "path", "path2", "sockaddr", "tuple", "path_hash")
)

COUNTERS: dict[str, int] = {
    k: v for k, v in _strip("QT_C_", _ENUMS["qt_counter"]).items() if k != "max"
}
COUNTER_MAX = _ENUMS["qt_counter"]["QT_C_MAX"]

_hp = re.search(r"#define\s+QT_HIST_PAYLOAD\s+(\d+)", HEADER.read_text())
assert _hp is not None, "QT_HIST_PAYLOAD missing from qtrace.h"
HIST_PAYLOAD = int(_hp.group(1))

_qm = re.search(r"#define\s+QT_QID_MAX\s+(\d+)", HEADER.read_text())
assert _qm is not None, "QT_QID_MAX missing from qtrace.h"
QID_MAX = int(_qm.group(1))

#: request summary categories (flight recorder), name -> index in qt_reqsum.ns
SUMCATS: dict[str, int] = {
    k: v for k, v in _strip("QT_S_", _ENUMS["qt_sumcat"]).items() if k != "max"
}
SUMCAT_MAX = _ENUMS["qt_sumcat"]["QT_S_MAX"]

_cap = re.search(r"#define\s+QT_CAP_BYTES\s+(\d+)", HEADER.read_text())
assert _cap is not None, "QT_CAP_BYTES missing from qtrace.h"
DEFAULT_CAP_BYTES = int(_cap.group(1))

# struct qt_event, field by field (little-endian, no implicit padding: the header is laid
# out so that none is needed).
EVENT_FIELDS = (
    ("ts_enter", "Q"),
    ("ts_exit", "Q"),
    ("cgroup_id", "Q"),
    ("req_key", "Q"),
    ("ret", "q"),
    ("arg0", "Q"),
    ("arg1", "Q"),
    ("tgid", "I"),
    ("tid", "I"),
    ("fd", "i"),
    ("kind", "H"),
    ("fdtype", "B"),
    ("flags", "B"),
    ("payload_len", "H"),
    ("payload_kind", "H"),
    ("record", "I"),
    ("comm", "16s"),
)
EVENT = struct.Struct("<" + "".join(f for _, f in EVENT_FIELDS))

TUPLE_FIELDS = (
    ("family", "H"),
    ("sport", "H"),
    ("dport", "H"),
    ("_pad", "H"),
    ("saddr", "16s"),
    ("daddr", "16s"),
)
TUPLE = struct.Struct("<" + "".join(f for _, f in TUPLE_FIELDS))

FDKEY_FIELDS = (("tgid", "I"), ("fd", "i"))
FDINFO_FIELDS = (
    ("req_key", "Q"),
    ("type", "B"),
    ("last_dir", "B"),
    ("node", "B"),
    ("_pad", "B"),
    ("captured", "I"),
)

# struct qt_hslot: an event and the first HIST_PAYLOAD bytes of its payload.
HSLOT_FIELDS = (("e", f"{EVENT.size}s"), ("payload", f"{HIST_PAYLOAD}s"))
HSLOT_SIZE = EVENT.size + HIST_PAYLOAD

REQSUM_FIELDS = (
    ("start", "Q"),
    ("end", "Q"),
    ("last", "Q"),
    ("ns", f"{SUMCAT_MAX}Q"),
    ("at_end", f"{SUMCAT_MAX}Q"),
    ("tgid", "I"),
    ("tid", "I"),
    ("fd", "i"),
    ("events", "I"),
    ("events_at_end", "I"),
    ("qid_len", "I"),
    ("qid", f"{QID_MAX}s"),
)
REQSUM = struct.Struct("<" + "".join(f for _, f in REQSUM_FIELDS))


def fnv1a(data: bytes) -> int:
    """32-bit FNV-1a, as bpf/qtrace.bpf.c hashes names (name_hash) and paths (path_hash)."""
    h = 2166136261
    for c in data:
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return h
