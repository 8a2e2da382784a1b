"""A tiny traced workload, run as its own process: waits for a command on stdin, then does
exactly the syscalls it was asked for, and says so on stdout."""

from __future__ import annotations

import os
import sys


def main() -> None:
    path = sys.argv[1]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "pwrite":
            block = b"x" * 64
            for i in range(int(arg)):
                os.pwrite(fd, block, (i % 64) * 64)
        elif cmd == "pread":
            for i in range(int(arg)):
                os.pread(fd, 64, (i % 64) * 64)
        elif cmd == "quit":
            break
        print("done", flush=True)


if __name__ == "__main__":
    main()
