"""The Python mirror of bpf/qtrace.h matches what a C compiler makes of the header."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

from agent import abi

STRUCTS = {
    "qt_event": abi.EVENT_FIELDS,
    "qt_tuple": abi.TUPLE_FIELDS,
    "qt_fdkey": abi.FDKEY_FIELDS,
    "qt_fdinfo": abi.FDINFO_FIELDS,
    "qt_hslot": abi.HSLOT_FIELDS,
    "qt_reqsum": abi.REQSUM_FIELDS,
}


def _c_layout(tmp_path: Path) -> dict[str, dict[str, int]]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{abi.HEADER}"']
    lines += ["int main(void) {", 'printf("{");']
    for i, (name, fields) in enumerate(STRUCTS.items()):
        sep = "," if i else ""
        lines.append(f'printf("{sep}\\"{name}\\": {{\\"sizeof\\": %zu", sizeof(struct {name}));')
        for field, _fmt in fields:
            lines.append(f'printf(", \\"{field}\\": %zu", offsetof(struct {name}, {field}));')
        lines.append('printf("}");')
    lines += ['printf("}\\n");', "return 0; }"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    layout: dict[str, dict[str, int]] = json.loads(out)
    return layout


def test_struct_layouts_match_header(tmp_path: Path) -> None:
    layout = _c_layout(tmp_path)
    for name, fields in STRUCTS.items():
        offset = 0
        for field, fmt in fields:
            assert layout[name][field] == offset, f"{name}.{field}"
            offset += struct.calcsize("<" + fmt)
        assert layout[name]["sizeof"] == offset, f"sizeof {name}"
    assert abi.EVENT.size == layout["qt_event"]["sizeof"]
    assert layout["qt_hslot"]["sizeof"] == abi.HSLOT_SIZE
    assert abi.REQSUM.size == layout["qt_reqsum"]["sizeof"]


def test_enums_parsed_from_header() -> None:
    assert abi.KINDS["pread64"] == 16
    assert abi.KIND_NAMES[abi.KINDS["block_rq"]] == "block_rq"
    assert len(abi.KINDS) == abi.KIND_MAX - 1
    assert set(abi.COUNTERS) == {
        "produced", "lost_ringbuf", "lost_mapfull", "filtered", "shed", "recorded"
    }  # fmt: skip
    assert abi.FD_OTHER == 5
