#!/usr/bin/env python3
"""merge-archives.py OUT IN...: join docker-archive tarballs into one, storing each shared
layer once, so that a node's containerd reads the common base a single time on import."""

from __future__ import annotations

import io
import json
import sys
import tarfile


def main(out: str, inputs: list[str]) -> int:
    manifest: list[object] = []
    seen: set[str] = set()
    with tarfile.open(out, "w") as dst:
        for path in inputs:
            with tarfile.open(path) as src:
                for member in src:
                    if member.name == "manifest.json":
                        f = src.extractfile(member)
                        assert f is not None
                        manifest.extend(json.load(f))
                    elif member.name == "repositories" or member.name in seen:
                        continue  # optional legacy index; layers are named by digest
                    else:
                        seen.add(member.name)
                        dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: merge-archives.py OUT IN...")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
